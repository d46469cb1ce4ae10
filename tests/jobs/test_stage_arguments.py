"""One argument set for every stage (shared/core/config.py ``add_config_arguments``): ``--config``,
``--base-model`` and ``--set`` on preprocess, finetune, evaluate, publish and fetch-model, each
tested here through the stage's own ``main()``.

Stages that use a fine-tuned adapter (evaluate, publish, fetch-model) always use the base model
finetune recorded; an explicitly requested other one is refused (exit 2) before anything runs.
The artifacts they read are real committed folders (``commit_dir``, a manifest written last)
whose manifests record the base model, as finetune's and publish's do.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

from shared.cluster.driver import plan
from shared.core.config import load_config
from shared.core.errors import ConfigError
from shared.core.settings import Settings
from shared.store.artifacts import commit_dir, now_iso
from shared.store.storage import open_location

STAGES = {"preprocess": "jobs.preprocess", "finetune": "jobs.finetune", "evaluate": "jobs.evaluate",
          "publish": "jobs.publish", "fetch-model": "jobs.fetch_model"}
RECORDED = "bundled:smollm2-135m-instruct"
OTHER = "Qwen/Qwen2.5-7B-Instruct"


class _Parsed(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a stage's main() builds (caught as it starts parsing)."""
    seen = {}

    def capture(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main([])
    return seen["parser"]


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    """runs/r1/{data,finetune,evaluate} and models/m/v1 + PROMOTED, committed; the adapter's base is RECORDED."""
    settings = Settings(artifact_root=f"file://{tmp_path / 'root'}", cache_dir=tmp_path / "cache", run_id="r1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text(json.dumps({"id": "0", "conversations": []}) + "\n", encoding="utf-8")

    def commit(uri: str, stage: str, inputs: dict, extra: dict):
        return commit_dir(src, open_location(uri, settings), stage=stage, inputs=inputs, started_at=now_iso(), run_id="r1",
                          extra=extra)

    commit(settings.run_uri("data"), "data", {}, {"files": {"train": "train.jsonl", "dev": "train.jsonl", "test": "train.jsonl"}})
    finetune = commit(settings.run_uri("finetune"), "finetune", {}, {"base_model": RECORDED})
    commit(settings.run_uri("evaluate"), "evaluate", {"finetune": finetune.digest}, {"gate": {"passed": True}})
    models = open_location(settings.models_uri("m"), settings)
    commit(f"{settings.models_uri('m')}/v1", "publish", {}, {"base_model": RECORDED})
    models.write_text("PROMOTED", "v1\n")
    (tmp_path / "c.yaml").write_text("training_args:\n  max_steps: 2\n", encoding="utf-8")
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", settings.artifact_root)
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    monkeypatch.setenv("LAWTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LAWTUNE_BASE_MODEL", raising=False)
    return {"tmp": tmp_path, "settings": settings, "config": str(tmp_path / "c.yaml")}


def stage_args(stage: str, root: dict) -> list[str]:
    """What each stage needs besides the shared arguments to get as far as its config."""
    return {
        "preprocess": ["--input", str(root["tmp"] / "src" / "train.jsonl"), "--config", root["config"]],
        "finetune": ["--config", root["config"]],
        "evaluate": ["--config", root["config"]],
        "publish": ["--model-name", "m", "--config", root["config"]],
        "fetch-model": [f"{root['settings'].models_uri('m')}", str(root["tmp"] / "target"), "--config", root["config"]],
    }[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_takes_the_same_config_arguments(stage, monkeypatch):
    options = {o for action in parser_of(STAGES[stage], monkeypatch)._actions for o in action.option_strings}
    assert {"--config", "--base-model", "--set"} <= options


@pytest.mark.parametrize("stage", STAGES)
def test_a_bad_set_stops_every_stage_with_one_sentence_naming_it(stage, run_root, capsys):
    module = importlib.import_module(STAGES[stage])
    assert module.main([*stage_args(stage, run_root), "--set", "training_args.max_steps=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [f"lawtune {stage}: error: {run_root['config']}: 1 invalid setting:",
                        "  - training_args.max_steps: got 'abc' (from --set training_args.max_steps=abc); expected a whole number"]


@pytest.mark.parametrize("how", ["--base-model", "LAWTUNE_BASE_MODEL", "--set base_model="])
@pytest.mark.parametrize("stage", ["evaluate", "publish", "fetch-model"])
def test_another_base_model_than_finetune_recorded_is_refused(stage, how, run_root, capsys, monkeypatch):
    args = stage_args(stage, run_root)
    if how == "--base-model":
        args += ["--base-model", OTHER]
    elif how == "LAWTUNE_BASE_MODEL":
        monkeypatch.setenv("LAWTUNE_BASE_MODEL", OTHER)
    else:
        args += ["--set", f"base_model={OTHER}"]
    assert importlib.import_module(STAGES[stage]).main(args) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if ": error: " in l]
    origin = how.split()[0]
    assert line.startswith(f"lawtune {stage}: error: {origin} names base model '{OTHER}', but the adapter in ")
    assert line.endswith(f" was trained on '{RECORDED}'; an adapter only works on its own base model: drop {origin}, "
                         "or re-run finetune with it")
    assert not (run_root["tmp"] / "target").exists()  # fetch-model refused before downloading


def test_the_recorded_base_model_named_again_is_accepted(run_root, capsys):
    from jobs import fetch_model

    target = run_root["tmp"] / "target"
    assert fetch_model.main([run_root["settings"].models_uri("m"), str(target), "--base-model", RECORDED]) == 0
    assert (target / "train.jsonl").is_file()


def test_a_base_model_is_the_same_however_a_local_folder_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    load_config(None, base_model="./model/").expect_base_model(str(tmp_path / "model"), "runs/r1/finetune")
    with pytest.raises(ConfigError, match="--base-model names base model './other'"):
        load_config(None, base_model="./other").expect_base_model(str(tmp_path / "model"), "runs/r1/finetune")


def test_the_config_files_own_base_model_is_no_request(tmp_path):
    """A config whose base_model differs (finetune ran with --base-model) evaluates on the recorded one."""
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {OTHER}\n", encoding="utf-8")
    load_config(path).expect_base_model(RECORDED, "runs/r1/finetune")


def test_the_driver_hands_every_stage_the_config_and_the_overrides():
    steps = plan("/c.yaml", ["/a.csv"], "m", base_model="./model", sets=("training_args.max_steps=5",))
    assert [s.stage for s in steps] == ["preprocess", "finetune", "evaluate", "publish"]
    for step in steps:
        args = " ".join(step.args)
        assert "--config /c.yaml --base-model ./model --set training_args.max_steps=5" in args, step
