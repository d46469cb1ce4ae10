"""shared/publish/merge.py: merged = base + adapter (logits), the saved folder, and what it refuses."""

from __future__ import annotations

import json

import pytest

from shared.core.errors import ConfigError, LawtuneError
from shared.publish.merge import LOGIT_ATOL, merge_adapter
from tests.lora_fixtures import make_adapter, make_tiny_model


@pytest.fixture(scope="module")
def tiny(bundled_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-merge")
    model = make_tiny_model(bundled_model_dir, root / "model")
    return model, make_adapter(model, root / "adapter", std=0.5)


def test_merged_model_reproduces_base_plus_adapter(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = tiny
    out = tmp_path / "merged"
    result = merge_adapter(model_dir, adapter_dir, out, max_shard_size="1MB")
    assert result.max_abs_diff <= LOGIT_ATOL and result.saved_max_abs_diff <= LOGIT_ATOL
    assert result.saved_dtype == "float32"
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in result.files, "sharded safetensors"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json"} <= set(result.files)
    assert not any(f.startswith("adapter") for f in result.files), "no LoRA leftovers: a plain model"

    # Independently of the module's own check: the adapter changes the output, the merge keeps the change.
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "合同是什么？"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (tuned - plain).abs().max() > 100 * LOGIT_ATOL, "the test adapter must matter, else the check proves nothing"
    assert torch.allclose(merged, tuned, atol=LOGIT_ATOL)


def test_quantised_base_is_refused_before_anything_is_written(tiny, tmp_path):
    import shutil

    model_dir, adapter_dir = tiny
    quantised = tmp_path / "quantised"
    shutil.copytree(model_dir, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantised \\(bitsandbytes\\); merging into a quantised base is refused"):
        merge_adapter(quantised, adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused(tiny, tmp_path):
    model_dir, adapter_dir = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"x")
    with pytest.raises(LawtuneError, match="is not empty"):
        merge_adapter(model_dir, adapter_dir, out)
