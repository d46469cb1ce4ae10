"""The ChatGLM3 finetune_demo's own lora.yaml, unchanged, through the whole pipeline (make train's driver).

The demo passes its model on the command line (``finetune_hf.py data ./model lora.yaml``); here
``--base-model`` names the bundled model instead. Its 3,000 steps would take hours on 2 CPU
cores, so ``--set`` (the user-facing override, ``make train SET=...``) shortens training to 4
steps and the evaluation to 3 questions of at most 16 new tokens; nothing else changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.core.config import load_config
from shared.core.errors import ConfigError
from tests.conftest import REPO
from tests.shared.core.test_config import CHATGLM3_LORA

SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
SHORTER = ("training_args.max_steps=4", "evaluation.max_examples=3", "evaluation.generation.max_new_tokens=16")


@pytest.mark.integration
def test_demo_lora_yaml_runs_preprocess_finetune_evaluate_publish(tmp_path, model_cache_dir, bundled_model_dir):
    config = CHATGLM3_LORA  # the fixture file itself, as a user passes theirs
    root = tmp_path / "artifacts"
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": f"file://{root}", "LAWTUNE_CACHE_DIR": str(model_cache_dir),
           "LAWTUNE_BASE_MODEL": "/env/loses/to/the/flag"}
    cmd = [sys.executable, "-m", "shared.cluster.driver", "--config", str(config), "--input", str(SAMPLE),
           "--run-id", "demo", "--model-name", "demo", "--base-model", "bundled:smollm2-135m-instruct"]
    for assignment in SHORTER:
        cmd += ["--set", assignment]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base model bundled:smollm2-135m-instruct (from --base-model)" in result.stderr

    run = root / "runs" / "demo"
    data = json.loads((run / "data" / "MANIFEST.json").read_text())
    # preprocess wrote what data_config names; the demo's test_file is its val_file, so they share dev.json
    assert data["extra"]["files"] == {"train": "train.json", "dev": "dev.json", "test": "dev.json"}
    assert sorted(f["path"] for f in data["files"]) == ["dev.json", "rejected.csv", "rejected.jsonl", "report.json", "train.json"]
    dev_rows = len((run / "data" / "dev.json").read_text(encoding="utf-8").splitlines())
    assert dev_rows == data["extra"]["splits"]["dev"] + data["extra"]["splits"]["test"]

    finetune = json.loads((run / "finetune" / "MANIFEST.json").read_text())
    assert finetune["extra"]["base_model"] == "bundled:smollm2-135m-instruct"
    assert finetune["extra"]["base_model_from"] == "--base-model"
    summary = json.loads((run / "finetune" / "training_summary.json").read_text())
    assert summary["steps_completed"] == 4
    used = (run / "finetune" / "config.yaml").read_text()
    assert "learning_rate: 5.0e-05" in used and "max_input_length: 256" in used  # the demo's values, not ours

    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["examples"] == 3 and "passed" in metrics["gate"]
    published = list((root / "models" / "demo").glob("*/MANIFEST.json"))
    assert len(published) == 1
    assert json.loads(published[0].read_text())["extra"]["base_model"] == "bundled:smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("flag", "env", "want", "origin"),
    [
        pytest.param("./from-flag", "./from-env", "./from-flag", "--base-model", id="flag-beats-env"),
        pytest.param(None, "./from-env", "./from-env", "LAWTUNE_BASE_MODEL", id="env-beats-config"),
        pytest.param(None, None, "THUDM/chatglm3-6b", "config", id="config"),
    ],
)
def test_base_model_precedence_flag_env_config(tmp_path, flag, env, want, origin):
    path = tmp_path / "c.yaml"
    path.write_text("base_model: THUDM/chatglm3-6b\n")
    config = load_config(path, base_model=flag, env={"LAWTUNE_BASE_MODEL": env} if env else {})
    assert (config.base_model, config.origin("base_model")) == (want, origin)
    assert load_config(None).origin("base_model") == "default"


def test_set_overrides_dotted_keys_and_errors_name_the_key(tmp_path):
    path = CHATGLM3_LORA
    config = load_config(path, overrides=["training_args.max_steps=20", "evaluation.generation.do_sample=true"])
    assert config.training_args.max_steps == 20 and config.evaluation.generation.do_sample is True
    assert config.training_args.learning_rate == pytest.approx(5e-5)  # the rest of the file stays
    with pytest.raises(ConfigError, match="training_args.max_stepz: not a key lawtune knows"):
        load_config(path, overrides=["training_args.max_stepz=20"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, overrides=["training_args.max_steps"])
    with pytest.raises(ConfigError, match="max_input_length is a value, not a section"):
        load_config(path, overrides=["max_input_length.x=1"])


@pytest.mark.parametrize(
    ("data_config", "needle"),
    [
        pytest.param({"train_file": "../train.json"}, "data_config.train_file: got '../train.json'; expected a plain file name", id="path"),
        pytest.param({"val_file": "report.json"}, "data_config.val_file: got 'report.json'", id="reserved-name"),
        pytest.param({"train_file": "a.json", "test_file": "a.json"}, "train_file and test_file both name 'a.json'", id="train-is-test"),
    ],
)
def test_split_names_that_cannot_work_fail_at_config_load(tmp_path, data_config, needle):
    from shared.core.config import parse_config

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        parse_config({"data_config": data_config})


def test_a_data_artifact_written_under_other_names_fails_naming_the_key():
    from shared.core.config import DataConfig
    from shared.data.split_files import split_file

    extra = {"files": {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}}
    assert split_file(extra, DataConfig(), "train", "file:///d") == "train.jsonl"
    with pytest.raises(ConfigError, match=r"data_config\.train_file is 'train\.json' but the data artifact file:///d holds"):
        split_file(extra, DataConfig(train_file="train.json"), "train", "file:///d")
