"""jobs/fetch_model.py checks a version against its serving contract (shared/store/serving_contract.py), on both backends.

A version whose files match their manifest but not its contract (a publish that wrote one template and
recorded another) must never reach a server: fetch-model exits 2 naming the file, and leaves no target.
"""

from __future__ import annotations

import shutil

import pytest

from jobs import fetch_model
from shared.core.errors import ConfigError
from shared.core.settings import load_settings
from shared.store.artifacts import commit_dir, now_iso
from shared.store.serving_contract import build, write_vllm_config
from shared.store.storage import open_location

pytestmark = pytest.mark.integration
EVALUATED = {"generation": {"max_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.1}, "dtype": "float32",
             "max_input_length": 64, "stop_tokens": ["<|im_end|>"]}


def _version(bundled_model_dir, tmp_path, settings, name: str, tamper=None) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json"):
        shutil.copy(bundled_model_dir / file, folder / file)
    contract = build(folder, EVALUATED)
    write_vllm_config(folder, contract)
    if tamper:
        tamper(folder)
    uri = f"{settings.models_uri('m')}/{name}"
    commit_dir(folder, open_location(uri, settings), stage="publish", inputs={}, started_at=now_iso(), extra={"serving": contract})
    return uri


def test_a_version_that_keeps_its_contract_is_fetched(artifact_root, bundled_model_dir, tmp_path):
    settings = load_settings()
    uri = _version(bundled_model_dir, tmp_path, settings, "good")
    result = fetch_model.run(settings, uri, tmp_path / "serving" / "model")
    assert result.downloaded and (result.target / "lawtune-vllm.yaml").is_file()
    assert not fetch_model.run(settings, uri, tmp_path / "serving" / "model").downloaded, "verified again, not downloaded"


def test_a_version_that_breaks_its_contract_is_refused_and_removed(artifact_root, bundled_model_dir, tmp_path, capsys):
    settings = load_settings()
    uri = _version(bundled_model_dir, tmp_path, settings, "bad",
                   tamper=lambda f: (f / "chat_template.jinja").write_text("{{ messages[0]['content'] }}"))
    target = tmp_path / "serving" / "model"
    with pytest.raises(ConfigError, match="breaks its serving contract: chat template: chat_template.jinja"):
        fetch_model.run(settings, uri, target)
    assert not target.exists(), "serving must never start on it"
    assert fetch_model.main([uri, str(target)]) == 2
    assert "breaks its serving contract" in capsys.readouterr().err.strip().splitlines()[-1]
