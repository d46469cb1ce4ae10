"""shared/cluster/driver.py (`make train`): several inputs reach preprocess, weights kept, paths absolute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.cluster.driver import _absolute, main, plan

REPO = Path(__file__).resolve().parents[3]


def test_several_inputs_reach_preprocess_in_order_with_their_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.csv").write_text("title,reply\n问,答\n", encoding="utf-8")
    inputs = [_absolute("a.csv"), _absolute("b.jsonl:0.5"), _absolute("s3://bucket/c.parquet")]
    assert inputs == [str(tmp_path / "a.csv"), f"{tmp_path / 'b.jsonl'}:0.5", "s3://bucket/c.parquet"]
    (preprocess, *_) = plan("/c.yaml", inputs, "m")
    assert preprocess.args == ("--input", inputs[0], "--input", inputs[1], "--input", inputs[2], "--config", "/c.yaml")
    assert plan("/c.yaml", [], "m")[0].args == ("--config", "/c.yaml")  # the config's preprocess.inputs


def test_make_train_passes_every_input_of_INPUT(tmp_path):
    dry = subprocess.run(["make", "-n", "train", "INPUT=a.csv b.jsonl:2", f"VENV={sys.prefix}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    line = next(s for s in dry.stdout.splitlines() if " train --target" in s)
    assert "--input a.csv --input b.jsonl:2 --run-id" in " ".join(line.split())


def test_k8s_takes_one_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path}")
    assert main(["--target", "k8s", "--config", "c.yaml", "--input", "a.csv", "--input", "b.csv"]) == 2
    assert "takes one --input (got 2)" in capsys.readouterr().err


def test_publish_gets_the_configs_trust_remote_code_as_its_flag():
    """publish reads only base_model of the config it is given: the driver hands it the config's
    trust_remote_code (the operator's switch) as its own flag (issue 24 item 2)."""
    assert plan("/c.yaml", [], "m")[-1].args == ("--config", "/c.yaml", "--model-name", "m")
    assert plan("/c.yaml", [], "m", trust_remote_code=True)[-1].args == ("--config", "/c.yaml", "--model-name", "m",
                                                                        "--trust-remote-code")
