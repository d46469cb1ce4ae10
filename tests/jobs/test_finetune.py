"""jobs/finetune.py: the stage on the real bundled model, through both artifact backends.

Integration tests keep the model real and the work tiny (8 short examples, 48-token budgets,
a handful of optimizer steps), ~2 s per step on 2 cores. The DDP test uses a
config-initialised tiny Llama (tests/tiny.py) under torchrun with the gloo backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared.store.artifacts import MANIFEST, commit_dir, now_iso, read_manifest
from shared.core.settings import Settings
from shared.store.stage import fetch_stage
from shared.store.storage import open_location
from tests.conftest import FIXTURES, REPO
from tests.lora_fixtures import RESUME_TOLERANCE as TOLERANCE  # max |Δ| of an adapter weight, resumed vs not: why there

BUNDLED_CONFIG = {
    "max_input_length": 48,
    "max_output_length": 48,
    "training_args": {
        "max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
        "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
    },
    "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}


def write_config(path: Path, data: dict) -> Path:
    path.write_text("# python -m jobs.finetune --config " + str(path) + "\n" + yaml.safe_dump(data), encoding="utf-8")
    return path


def commit_data(settings: Settings, train_rows: int = 8) -> str:
    """The fixture splits (first ``train_rows`` training rows) committed as a run's data artifact."""
    folder = settings.cache_dir / "fixture-data"
    folder.mkdir(parents=True, exist_ok=True)
    lines = (FIXTURES / "chat" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:train_rows]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "dev.jsonl").write_text((FIXTURES / "chat" / "dev.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    uri = settings.run_uri("data")
    commit_dir(folder, open_location(uri, settings), stage="data", inputs={"fixture": train_rows}, started_at=now_iso())
    return uri


def start_until_checkpoint(config: Path, env: dict[str, str], settings: Settings, step: int = 1):
    """``python -m jobs.finetune`` started, returned once checkpoint ``step`` is committed: (process, output location)."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = open_location(settings.run_uri("finetune"), settings)
    deadline = time.monotonic() + 300
    while not out.exists(f"checkpoints/step-{step}/{MANIFEST}") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert out.exists(f"checkpoints/step-{step}/{MANIFEST}"), "no checkpoint committed in time"
    return proc, out


def adapter_tensors(settings: Settings, finetune_uri: str, dest: Path):
    from safetensors.torch import load_file

    fetch_stage(settings, finetune_uri, dest)
    return load_file(dest / "adapter" / "adapter_model.safetensors")


def test_missing_base_model_fails_with_one_line_before_reading_data(tmp_path, monkeypatch, capsys):
    from jobs.finetune import main

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'art'}")
    settings = Settings()
    commit_data(settings)
    config = write_config(tmp_path / "c.yaml", {**BUNDLED_CONFIG, "base_model": str(tmp_path / "no-such-model")})
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune finetune: error: base_model") and "no such directory" in err[-1]
    assert not open_location(settings.run_uri("finetune"), settings).exists(MANIFEST)
    assert not list((settings.cache_dir / "work").glob("finetune-data-*")), "no data was fetched"


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        pytest.param("no-data", "has no MANIFEST.json", id="data-stage-not-committed"),
        pytest.param("bad-config", "training_args.max_steps", id="invalid-config"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys, setup, needle):
    from jobs.finetune import main

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'art'}")
    data = dict(BUNDLED_CONFIG)
    if setup == "bad-config":
        data = {**data, "training_args": {**data["training_args"], "max_steps": 0}}
    config = write_config(tmp_path / "c.yaml", data)
    assert main(["--config", str(config)]) == 2
    assert needle in capsys.readouterr().err


REFERENCE = {**BUNDLED_CONFIG, "training_args": {**BUNDLED_CONFIG["training_args"], "save_steps": 1}}


@pytest.fixture(scope="module")
def reference_run(seaweedfs, bundled_model_dir, model_cache_dir):
    """One uninterrupted run on SeaweedFS S3 that the tests below inspect and compare against."""
    from jobs.finetune import run
    from shared.core.config import parse_config

    bucket = f"ft-{os.getpid()}-{int(time.time())}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in seaweedfs.env().items():
            if not key.startswith("LAWTUNE_"):
                mp.setenv(key, value)  # AWS credentials, read by boto3
        settings = Settings(artifact_root=f"s3://{bucket}/lawtune", s3_endpoint_url=seaweedfs.endpoint,
                            cache_dir=model_cache_dir, run_id="reference")
        commit_data(settings, train_rows=6)
        result = run(settings, parse_config(REFERENCE))
        yield settings, result


@pytest.mark.integration
def test_finetune_on_s3_lowers_the_loss_commits_every_artifact_and_skips_a_rerun(reference_run, bundled_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from jobs.finetune import run
    from shared.core.config import parse_config
    from shared.train.tokenization import ChatEncoder, load_split

    settings, result = reference_run
    assert not result.skipped and result.steps_completed == 4 and result.resumed_from is None
    out = open_location(settings.run_uri("finetune"), settings)
    manifest = read_manifest(out)
    assert manifest.extra["base_model"] == "bundled:smollm2-135m-instruct" and manifest.extra["best_step"] == result.best_step
    assert len(manifest.extra["base_model_digest"]) == 64, "the base model's identity includes its weights' digest"
    assert manifest.extra["config_digest"] == manifest.inputs["config"] and manifest.extra["data_uri"] == settings.run_uri("data")
    files = {f.path for f in manifest.files}
    assert {f for f in files if not f.startswith("tensorboard/")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "metrics.jsonl", "training_summary.json",
    }
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    for step in (1, 2, 3, 4):
        checkpoint = read_manifest(out.child(f"checkpoints/step-{step}"))
        assert checkpoint.extra["step"] == step
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
            f.path for f in checkpoint.files
        }

    local = tmp_path / "finetune"
    fetch_stage(settings, settings.run_uri("finetune"), local)  # verified round trip through SeaweedFS
    summary = json.loads((local / "training_summary.json").read_text())
    assert summary["best_step"] == result.best_step
    assert summary["best_dev_loss"] == min(loss for _, loss in summary["dev_loss_curve"])
    assert [s for s, _ in summary["dev_loss_curve"]] == [1, 2, 3, 4]  # every checkpoint gets a dev loss
    assert summary["tokens_seen"] > 0 and summary["tokenization"]["train"]["kept"] == 6
    metrics = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s", "eta_s"} <= metrics[0].keys()
    assert any("eval_loss" in m for m in metrics)
    # TensorBoard has the same curves, by step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(local / "tensorboard")).Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "dev/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("dev/loss")] == [1, 2, 3, 4]
    assert yaml.safe_load((local / "config.yaml").read_text())["training_args"]["max_steps"] == 4

    # The exported adapter fits the training slice better than the base model does.
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    rows, _ = ChatEncoder(tok, 48, 48).encode_all(load_split(settings.cache_dir / "fixture-data" / "train.jsonl"))
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows)
    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir).eval()
    with torch.no_grad():
        before = base(**batch).loss.item()
        after = PeftModel.from_pretrained(base, local / "adapter").eval()(**batch).loss.item()
    assert after < before - 0.05, (before, after)

    again = run(settings, parse_config(REFERENCE))
    assert again.skipped and again.best_step == result.best_step


@pytest.mark.integration
def test_sigterm_after_a_checkpoint_then_restart_resumes_to_the_same_adapter(reference_run, seaweedfs, tmp_path):
    from jobs.finetune import run
    from shared.core.config import parse_config

    reference, _ = reference_run
    settings = reference.model_copy(update={"run_id": "preempted"})
    commit_data(settings, train_rows=6)
    config_path = write_config(tmp_path / "c.yaml", REFERENCE)
    env = {**os.environ, **seaweedfs.env(), "LAWTUNE_ARTIFACT_ROOT": settings.artifact_root, "LAWTUNE_RUN_ID": "preempted",
           "LAWTUNE_CACHE_DIR": str(settings.cache_dir)}
    proc, out = start_until_checkpoint(config_path, env, settings)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends on eviction or preemption
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lawtune finetune: error: SIGTERM: checkpoint step-") and "Job retries" in last
    killed_at = int(last.split("step-")[1].split()[0])
    assert 1 <= killed_at < 4
    assert not out.exists(MANIFEST), "a preempted stage commits no manifest"

    resumed = run(settings, parse_config(REFERENCE))
    assert resumed.resumed_from == killed_at, "the restart resumes from the newest committed checkpoint, not step 0"
    assert resumed.steps_completed == 4

    a = adapter_tensors(reference, reference.run_uri("finetune"), tmp_path / "a")
    b = adapter_tensors(settings, settings.run_uri("finetune"), tmp_path / "b")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, f"resumed adapter differs from the uninterrupted one by {worst}"
    whole = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    cut = json.loads((tmp_path / "b" / "training_summary.json").read_text())
    assert cut["best_step"] == whole["best_step"]
    assert [s for s, _ in cut["train_loss_curve"]] == [1, 2, 3, 4]
    assert [loss for _, loss in cut["train_loss_curve"]] == pytest.approx([loss for _, loss in whole["train_loss_curve"]], abs=TOLERANCE)


@pytest.mark.integration
def test_a_kill_after_the_last_checkpoint_resumes_to_the_same_adapter_without_training_past_max_steps(reference_run, tmp_path):
    """Killed between the final uploads and the stage's manifest (the commit:finetune failpoint's gap):
    the rerun resumes at step 4 of 4. The Trainer resumed there trained a fifth step."""
    from jobs.finetune import run
    from shared.core.config import parse_config

    reference, _ = reference_run
    settings = reference.model_copy(update={"run_id": "killed-at-commit"})
    commit_data(settings, train_rows=6)
    first = run(settings, parse_config(REFERENCE))
    out = open_location(settings.run_uri("finetune"), settings)
    before = out.read_bytes("adapter/adapter_model.safetensors")
    out.delete(MANIFEST)

    again = run(settings, parse_config(REFERENCE))
    assert not again.skipped and again.resumed_from == 4 and again.steps_completed == 4
    assert again.best_step == first.best_step
    assert out.read_bytes("adapter/adapter_model.safetensors") == before
    steps = sorted({rel.split("/")[1] for rel in out.list_files() if rel.startswith("checkpoints/")})
    assert steps == ["step-1", "step-2", "step-3", "step-4"]


def test_a_checkpoint_that_ended_training_is_recognised_by_max_steps_or_spent_patience(tmp_path):
    from transformers import TrainerState

    from shared.train.training import _finished_state, patience_spent

    def checkpoint(global_step, max_steps, losses):
        folder = tmp_path / f"c-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        TrainerState(global_step=global_step, max_steps=max_steps,
                     log_history=[{"eval_loss": x, "step": i + 1} for i, x in enumerate(losses)]).save_to_json(str(folder / "trainer_state.json"))
        return folder

    assert _finished_state(checkpoint(4, 4, [2.0, 1.9, 1.8, 1.7]), None).global_step == 4
    assert _finished_state(checkpoint(3, 4, [2.0, 1.9, 1.8]), None) is None
    assert _finished_state(checkpoint(3, 8, [2.0, 2.1, 2.2]), 2) is not None, "two evaluations without a lower dev loss"
    assert _finished_state(checkpoint(3, 8, [2.0, 2.1, 1.9]), 2) is None
    assert patience_spent([1.0, 1.0], 1) and not patience_spent([1.0], 1) and not patience_spent([3.0, 1.0, 2.0], None)


@pytest.mark.integration
@pytest.mark.parametrize("fast", [
    pytest.param({}, id="plain"),
    # The GPU recipe's code path on CPU/gloo: packed rows, and the frozen layers switched to FP8
    # at the first forward, after Trainer has wrapped the model in DDP.
    pytest.param({"fast_path": "on", "fp8": "on", "tokens_per_batch": 128}, id="fast-path-fp8"),
])
def test_torchrun_two_processes_train_with_ddp_and_rank_0_commits_once(tmp_path, fast):
    from tests.tiny import tiny_data_dir, tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    root = tmp_path / "art"
    settings = Settings(artifact_root=f"file://{root}", run_id="ddp", cache_dir=tmp_path / "cache")
    data = tiny_data_dir(tmp_path / "data", 8, 3)
    commit_dir(data, open_location(settings.run_uri("data"), settings), stage="data", inputs={}, started_at=now_iso())
    config = write_config(tmp_path / "c.yaml", {
        "base_model": str(model), "max_input_length": 32, "max_output_length": 16,
        "training_args": {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
                          **fast},
        "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    })
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": f"file://{root}", "LAWTUNE_RUN_ID": "ddp", "LAWTUNE_CACHE_DIR": str(tmp_path / "cache")}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "jobs.finetune", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "runs" / "ddp" / "finetune"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_completed"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if not fast:
        # 2 ranks x batch 2 = 4 of the 8 examples per step: 4 steps are 2 epochs
        assert max(m.get("epoch", 0) for m in metrics) == pytest.approx(2.0)
    else:
        # each rank converts its own replica: 2 layers' SwiGLU MLPs fused (gate/up/down), their 4 attention linears each
        assert proc.stderr.count("FP8 fused SwiGLU on 2 frozen MLPs") == 2, "each rank converts its own replica"
        assert proc.stderr.count("FP8 forward/backward on 8 frozen linear layers") == 2, "each rank converts its own replica"
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) >= 4 and all(loss == loss for loss in losses)
    assert proc.stderr.count("finetune: committed") == 1, "only rank 0 writes the artifact"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
