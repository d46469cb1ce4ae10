"""Every shipped config loads, is headed by the command that runs it, and bad training keys fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from shared.core.config import load_config, parse_config
from shared.core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-135m-cpu.yaml", "qwen2.5-7b-instruct-lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_names_its_command(path):
    config = load_config(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and ("python -m " in first or "make " in first), first
    assert config.training_args.save_steps <= config.training_args.max_steps
    assert config.max_input_length + config.max_output_length >= 64


def test_embedded_default_is_the_bundled_model_sized_for_cpu():
    from shared.train.models import BUNDLED_DEFAULT

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-cpu.yaml")
    assert config.base_model == BUNDLED_DEFAULT
    args = config.training_args
    # ~100 tokens/s on 2 cores: the tokens trained must stay within a few minutes' worth
    worst_tokens = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * (
        config.max_input_length + config.max_output_length
    )
    assert worst_tokens <= 30_000
    assert args.bf16 in (None, False)


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        pytest.param({"training_args": {"max_steps": 0}}, ["training_args.max_steps", "expected a number of at least 1"], id="max-steps-zero"),
        pytest.param({"training_args": {"lr_scheduler_type": "cosin"}}, ["training_args.lr_scheduler_type", "'cosine'"], id="scheduler-typo"),
        pytest.param({"training_args": {"learning_rate": -1}}, ["training_args.learning_rate"], id="negative-lr"),
        pytest.param({"training_args": {"per_device_batch_size": 4}}, ["training_args.per_device_batch_size", "not a key lawtune knows"], id="unknown-key"),
        pytest.param({"peft_config": {"target_modules": []}}, ["peft_config", "target_modules is empty"], id="no-targets"),
        pytest.param({"peft_config": {"target_modules": "all"}}, ["peft_config.target_modules"], id="targets-not-all-linear"),
        pytest.param({"peft_config": {"lora_dropout": 1.5}}, ["peft_config.lora_dropout"], id="dropout-above-1"),
        pytest.param({"peft_config": {"peft_type": "PREFIX_TUNING"}}, ["peft_config.peft_type", "'LORA'"], id="not-lora"),
        pytest.param(
            {"training_args": {"max_steps": 0}, "peft_config": {"r": 0}},
            ["2 invalid settings", "training_args.max_steps", "peft_config.r"],
            id="all-errors-at-once",
        ),
    ],
)
def test_bad_training_settings_name_the_key(data, needles):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "x.yaml")
    for needle in needles:
        assert needle in str(info.value)


def test_chatglm3_lora_yaml_keys_load_unchanged():
    # the finetune_demo lora.yaml's keys (values shortened)
    data = {
        "data_config": {"train_file": "train.json", "val_file": "dev.json", "test_file": "dev.json", "num_proc": 16},
        "max_input_length": 256,
        "max_output_length": 512,
        "training_args": {
            "output_dir": "./output", "max_steps": 3000, "learning_rate": 5e-5, "per_device_train_batch_size": 4,
            "dataloader_num_workers": 16, "remove_unused_columns": False, "save_strategy": "steps", "save_steps": 500,
            "log_level": "info", "logging_strategy": "steps", "logging_steps": 10, "per_device_eval_batch_size": 16,
            "evaluation_strategy": "steps", "eval_steps": 500, "predict_with_generate": True,
            "generation_config": {"max_new_tokens": 512}, "use_cpu": False,
        },
        "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
    }
    config = parse_config(data)
    assert config.training_args.max_steps == 3000 and config.peft_config.lora_alpha == 32


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


# `key: value` in prose; a path (lora.yaml: ...) or a URL is no claim.
# A lookahead, so "card: memory_profile: true" yields both "card" and "memory_profile".
_CLAIM = re.compile(r"(?<![\w./-])(?=((?:[a-z_][a-z0-9_]*\.)*[a-z_][a-z0-9_]*): (\"[^\"]*\"|[\w.-]+))")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_config_header_states_the_values_the_file_sets(path):
    """Every `key: value` the header comment states about a config key is the file's value (advice
    for another setup reads "set key: value"; the command lines are left out)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    leaves = dict(_leaves(load_config(path).model_dump(mode="json")))
    for line in lines:
        if re.search(r"\b(make|python -m|torchrun)\b", line):
            continue
        for claim in _CLAIM.finditer(line):
            key, stated = claim.groups()
            if line[: claim.start()].rstrip().endswith("set"):
                continue
            values = [v for k, v in leaves.items() if k == key or k.endswith("." + key)]
            if not values:
                continue  # prose, not a config key
            assert yaml.safe_load(stated) in values, f"{path.name} header says {key}: {stated}; the file sets {values}"


def test_header_claims_are_found_where_headers_make_them():
    found = [m.groups() for m in _CLAIM.finditer("# runs the frozen weights' matmuls in FP8 (training_args.fp8: auto).")]
    assert found == [("training_args.fp8", "auto")]
    assert not list(_CLAIM.finditer("# (finetune_demo/configs/lora.yaml: LoRA r8)"))
    assert ("memory_profile", "true") in [m.groups() for m in _CLAIM.finditer("# On a 24 GB card: memory_profile: true")]
