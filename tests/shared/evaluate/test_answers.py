"""shared/evaluate/answers.py: when two evaluations may share answers."""

from __future__ import annotations

import json

from shared.evaluate.answers import adapter_key


def _adapter(folder, modules):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": modules}, indent=2))
    return folder


def test_bit_identical_weights_share_a_key_whatever_order_peft_wrote_target_modules_in(tmp_path):
    """Seen on two `make train` runs (2026-12-07): the same adapter_model.safetensors, but adapter_config.json's
    target_modules (a set inside peft) in another order, so the second run generated every candidate answer again."""
    first, second = _adapter(tmp_path / "a", ["q_proj", "v_proj", "k_proj", "o_proj"]), _adapter(tmp_path / "b", ["q_proj", "k_proj", "o_proj", "v_proj"])
    files = {"adapter/adapter_model.safetensors": "d0178d088cf4"}
    key = {name: adapter_key("base", {**files, "adapter/adapter_config.json": digest}, folder)
           for name, digest, folder in (("a", "5e3dfdff5c3f", first), ("b", "1ed2ed2dcb45", second))}
    assert key["a"] == key["b"]
    other = _adapter(tmp_path / "c", ["q_proj", "k_proj"])
    assert adapter_key("base", {**files, "adapter/adapter_config.json": "x"}, other) != key["a"], "other modules: another adapter"
    assert adapter_key("base", {"adapter/adapter_model.safetensors": "other"}, first) != key["a"], "other weights: another adapter"
