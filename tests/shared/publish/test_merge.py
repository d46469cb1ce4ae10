"""shared/publish/merge.py: merged = base + adapter (logits), the saved folder, and what it refuses."""

from __future__ import annotations

import json

import pytest

from shared.core.errors import ConfigError, LawtuneError
from shared.publish.merge import LOGIT_ATOL, merge_adapter
from tests.lora_fixtures import make_adapter, make_tiny_model


@pytest.fixture(scope="module")
def tiny(bundled_model_dir, module_tmp):
    root = module_tmp("tiny-merge")
    model = make_tiny_model(bundled_model_dir, root / "model")
    return model, make_adapter(model, root / "adapter", std=0.5)


def test_merged_model_reproduces_base_plus_adapter(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = tiny
    out = tmp_path / "merged"
    result = merge_adapter(model_dir, adapter_dir, out, max_shard_size="1MB", method="memory")
    assert result.method == "memory"
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


@pytest.fixture(scope="module")
def sharded_bundled(bundled_model_dir, module_tmp):
    """The bundled model re-saved in small shards (as a 7B base comes: several safetensors files)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    root = module_tmp("sharded-bundled")
    base = root / "base"
    AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).save_pretrained(base, max_shard_size="100MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (bundled_model_dir / name).is_file():
            shutil.copy(bundled_model_dir / name, base / name)
    return base, make_adapter(base, root / "adapter", std=0.05)


@pytest.mark.integration
def test_sharded_merge_of_the_bundled_model_writes_the_same_weights_as_the_in_memory_merge(sharded_bundled, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, adapter = sharded_bundled
    memory = merge_adapter(base, adapter, tmp_path / "memory", method="memory")
    sharded = merge_adapter(base, adapter, tmp_path / "sharded", max_shard_size="100MB")  # auto picks the sharded merge
    assert sharded.method == "sharded" and memory.method == "memory"
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1, "sharded at max_shard_size"
    assert sharded.saved_max_abs_diff is not None and sharded.saved_max_abs_diff <= LOGIT_ATOL, "small: logits checked too"
    assert sharded.max_forward_rel_err < 1e-5

    def weights(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "memory"), weights(tmp_path / "sharded")
    assert a.keys() == b.keys()
    changed = [k for k in a if "q_proj" in k or "v_proj" in k]
    assert changed and all(a[k].dtype == b[k].dtype for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"sharded merge differs from the in-memory merge by {worst}"
    original = weights(base)
    assert min((b[k] - original[k]).abs().max().item() for k in changed) > 1e-4, "the adapter changed every target"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")  # a plain model transformers loads
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json",
            "model.safetensors.index.json"} <= set(sharded.files)


def test_sharded_merge_refuses_a_wrong_delta_before_writing_its_shard(tiny, tmp_path, monkeypatch):
    from shared.publish import sharded_merge
    from shared.publish.merge import MergeCheckError

    model_dir, adapter_dir = tiny
    original = sharded_merge.LoraPair.delta
    monkeypatch.setattr(sharded_merge.LoraPair, "delta", lambda self: original(self).T)  # a transposition bug
    with pytest.raises(MergeCheckError, match="does not reproduce base\\+adapter"):
        merge_adapter(model_dir, adapter_dir, tmp_path / "out", method="sharded")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_adapter_the_sharded_merge_cannot_do_falls_back_to_memory(tiny, tmp_path):
    import shutil

    model_dir, adapter_dir = tiny
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="sharded merge .* is not possible: adapter: use_dora=True"):
        merge_adapter(model_dir, dora, tmp_path / "a", method="sharded")
    assert merge_adapter(model_dir, adapter_dir, tmp_path / "b").method == "sharded"


def test_sharded_merge_writes_shards_of_at_most_max_shard_size_whatever_the_base_layout(tiny, tmp_path):
    """A one-file base published with a small max_shard_size comes out as several indexed shards
    (publish's --max-shard-size), and the folder loads as the same model."""
    from safetensors import safe_open

    model_dir, adapter_dir = tiny
    assert len(list(model_dir.glob("*.safetensors"))) == 1
    result = merge_adapter(model_dir, adapter_dir, tmp_path / "out", max_shard_size="1MB", method="sharded")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert result.method == "sharded" and len(shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert size <= 10**6 or len(keys) == 1, (shard.name, size)  # one tensor larger than the limit gets a file of its own
    assert result.saved_max_abs_diff is not None and result.saved_max_abs_diff <= LOGIT_ATOL
