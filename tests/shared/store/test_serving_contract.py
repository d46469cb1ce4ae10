"""shared/store/serving_contract.py: what a model folder is served with, checked from its files alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from shared.store.serving_contract import VLLM_CONFIG, ContractError, build, describe, verify, vllm_args, write_vllm_config

EVALUATED = {"generation": {"max_new_tokens": 96, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                            "repetition_penalty": 1.1},
             "dtype": "float32", "engine": {"engine": "transformers"}, "max_input_length": 96, "stop_tokens": ["<|im_end|>"]}


@pytest.fixture
def folder(bundled_model_dir, tmp_path) -> Path:
    """The bundled model's serving files (no weights: the contract never reads them)."""
    out = tmp_path / "version"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json"):
        shutil.copy(bundled_model_dir / name, out / name)
    return out


@pytest.mark.integration
def test_a_folder_matches_the_contract_built_from_it(folder):
    contract = build(folder, EVALUATED)
    write_vllm_config(folder, contract)
    verify(folder, contract)
    assert contract["eos_token_ids"] == [2] and contract["special_tokens"]["eos"] == "<|im_end|>"
    assert contract["special_tokens"]["pad"] == "<|im_end|>" and contract["stop_tokens"] == ["<|im_end|>"]
    assert contract["chat_template"]["file"] == "chat_template.jinja" and len(contract["chat_template"]["sha256"]) == 64
    assert set(contract["tokenizer_files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert contract["max_model_len"] == 192 and contract["dtype"] == "float32"
    # What vLLM gets: the same files, evaluate's decoding as its defaults (greedy: temperature 0), the dtype.
    args = vllm_args(folder, contract)
    assert args == ["--config", str(folder / VLLM_CONFIG), "--chat-template", str(folder / "chat_template.jinja"),
                    "--generation-config", str(folder)]
    assert yaml.safe_load((folder / VLLM_CONFIG).read_text()) == {
        "dtype": "float32", "override-generation-config": {"repetition_penalty": 1.1, "temperature": 0.0}}


@pytest.mark.integration
@pytest.mark.parametrize(("change", "needle"), [
    pytest.param(lambda f: (f / "chat_template.jinja").write_text("{{ messages }}"), "chat template: chat_template.jinja",
                 id="template"),
    pytest.param(lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text().replace('"system"', '"sys"', 1)),
                 "tokenizer file tokenizer.json", id="tokenizer-file"),
    pytest.param(lambda f: (f / "generation_config.json").write_text(json.dumps({"bos_token_id": 1})),
                 "generation_config.json: eos_token_id is missing; it must hold 2 (<|im_end|>)", id="eos-dropped"),
    pytest.param(lambda f: (f / VLLM_CONFIG).write_text("dtype: bfloat16\n"), "lawtune-vllm.yaml", id="engine-settings"),
    pytest.param(lambda f: (f / "tokenizer_config.json").unlink(), "tokenizer file tokenizer_config.json: missing",
                 id="file-missing"),
])
def test_each_difference_is_named(folder, change, needle):
    contract = build(folder, EVALUATED)
    write_vllm_config(folder, contract)
    change(folder)
    with pytest.raises(ContractError) as info:
        verify(folder, contract)
    assert needle in str(info.value)


def test_a_template_inside_tokenizer_config_is_found(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}", "eos_token": {"content": "</s>"}}))
    described = describe(tmp_path)
    assert described["chat_template"]["file"] == "tokenizer_config.json"
    assert described["special_tokens"]["eos"] == "</s>" and described["eos_token_ids"] == []
    contract = build(tmp_path, {})
    assert vllm_args(tmp_path, contract)[2:4] == ["--chat-template", str(tmp_path / "chat_template.jinja")]
    assert (tmp_path / "chat_template.jinja").read_text() == "{{ x }}", "vLLM's --chat-template needs a file"


def test_no_contract_is_an_error_not_a_pass(tmp_path):
    with pytest.raises(ContractError, match="missing or not lawtune.serving/v1"):
        verify(tmp_path, {})


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "a/../../b"])
def test_a_tokenizer_file_name_from_the_store_never_reaches_outside_the_folder(tmp_path, name):
    """The contract comes from a manifest in the store: its file names are checked like the manifest's own paths
    (shared/store/paths.py) before anything is read."""
    (tmp_path / "outside.json").write_text("{}")
    folder = tmp_path / "version"
    folder.mkdir()
    contract = {"schema": "lawtune.serving/v1", "tokenizer_files": {name: "0" * 64}}
    with pytest.raises(ContractError, match=r"tokenizer file .* refused"):
        verify(folder, contract)
