"""The sample pipeline, stage by stage, as subprocesses: what the kill tests cut and re-run.

Tiny on purpose (2 cores): the real bundled model and the real sample CSV, 4 optimizer steps
of 48-token budgets with a checkpoint after each, 2 questions evaluated with 4 new tokens.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.core.settings import Settings
from shared.store.artifacts import MANIFEST, Manifest, find_manifest
from shared.store.storage import open_location
from tests.conftest import REPO

SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
MODEL_NAME = "fault-model"
RUN_ID = "faults"
STAGES = ("preprocess", "finetune", "evaluate", "publish", "fetch_model")
CONFIG = {
    "base_model": "bundled:smollm2-135m-instruct",
    "max_input_length": 48,
    "max_output_length": 48,
    "training_args": {
        "max_steps": 4, "save_steps": 1, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
        "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
    },
    "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "evaluation": {"max_examples": 2, "batch_size": 2, "backend": "transformers", "generation": {"max_new_tokens": 4},
                   "gate": []},
}
# Files whose bytes legitimately differ between two runs (timings, timestamps); compared otherwise.
# adapter_config.json: peft writes target_modules from a set, in the process's string-hash order.
# tensorboard/: event files are named after the writing host, pid and time, and record wall time.
VOLATILE_FOLDERS = ("tensorboard/",)
VOLATILE = {
    "finetune": {"training_summary.json", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"},
    "publish": {"lawtune-model.json"},
}


@dataclass
class Pipeline:
    settings: Settings
    env: dict[str, str]
    config: Path
    fetch_target: Path

    def output(self, stage: str):
        if stage == "publish":
            root = open_location(self.settings.models_uri(MODEL_NAME), self.settings)
            version = root.read_text("PROMOTED").strip() if root.exists("PROMOTED") else None
            return root.child(version) if version else None
        stage_dir = {"preprocess": "data"}.get(stage, stage)
        return open_location(self.settings.run_uri(stage_dir), self.settings)

    def command(self, stage: str) -> list[str]:
        py = [sys.executable, "-m", f"jobs.{stage}"]
        return {
            "preprocess": [*py, "--input", str(SAMPLE), "--config", str(self.config)],
            "finetune": [*py, "--config", str(self.config)],
            "evaluate": [*py, "--config", str(self.config)],
            "publish": [*py, "--model-name", MODEL_NAME, "--max-shard-size", "300MB"],
            "fetch_model": [*py, self.settings.models_uri(MODEL_NAME), str(self.fetch_target)],
        }[stage]

    def start(self, stage: str, log: Path, failpoints: tuple[str, ...] = ()) -> subprocess.Popen:
        fh = open(log, "wb")
        env = {**os.environ, **self.env, **({"LAWTUNE_FAILPOINTS": ",".join(failpoints)} if failpoints else {})}
        return subprocess.Popen(self.command(stage), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run(self, stage: str, log: Path, timeout: float = 600) -> float:
        """Run to the end; its wall time (raises with the log tail on failure)."""
        t0 = time.monotonic()
        proc = self.start(stage, log)
        code = proc.wait(timeout)
        if code != 0:
            raise AssertionError(f"{stage} exited {code}:\n{log.read_text(errors='replace')[-3000:]}")
        return time.monotonic() - t0

    def kill_at(self, stage: str, marker: str, delay: float, log: Path, timeout: float = 900) -> str:
        """Start the stage, wait for ``marker`` in its log and ``delay`` seconds more, then SIGKILL its whole
        process group; where the kill landed. The stage's commit point is armed as a failpoint, so the
        process stops there at the latest and the kill always lands before its commit (then: "commit point").

        Raises AssertionError, with the log's tail, when the marker never appeared or the process ended by
        itself: a trial whose kill did not happen proves nothing."""
        backstop = COMMIT_POINT[stage]
        armed = marker.split()[1].rstrip(":") if marker.startswith("failpoint ") else backstop
        proc = self.start(stage, log, failpoints=(armed,))
        deadline = time.monotonic() + timeout
        try:
            while marker.encode() not in (text := log.read_bytes()):
                if armed == backstop and f"failpoint {backstop}: stopped".encode() in text:
                    raise AssertionError(f"{stage} reached its commit point before its kill marker {marker!r}")
                if proc.poll() is not None:
                    raise AssertionError(f"{stage} ended ({proc.returncode}) before its kill marker {marker!r} appeared:\n"
                                         f"{log.read_text(errors='replace')[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{stage}: kill marker {marker!r} did not appear within {timeout:.0f} s:\n"
                                         f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.02)
            try:
                code = proc.wait(delay)
                raise AssertionError(f"{stage} ended ({code}) within {delay} s of {marker!r}, before its kill:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")
            except subprocess.TimeoutExpired:
                pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, f"{stage} ended with {proc.returncode}, not by the kill"
        stopped = f"failpoint {backstop}: stopped".encode() in log.read_bytes()
        return "commit point" if stopped and not marker.startswith("failpoint ") else f"{marker!r} +{delay}s"

    def reset(self, stage: str) -> None:
        """Back to the state before ``stage`` ran: its output removed, upstream untouched."""
        import shutil

        if stage == "fetch_model":
            shutil.rmtree(self.fetch_target, ignore_errors=True)
            return
        loc = (open_location(self.settings.models_uri(MODEL_NAME), self.settings) if stage == "publish"
               else self.output(stage))
        loc.delete_all()


def pipeline(root_uri: str, env: dict[str, str], workdir: Path) -> Pipeline:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "faults.yaml"
    config.write_text("# python -m jobs.finetune --config " + str(config) + "\n" + yaml.safe_dump(CONFIG), encoding="utf-8")
    env = {**env, "LAWTUNE_ARTIFACT_ROOT": root_uri, "LAWTUNE_RUN_ID": RUN_ID, "HF_HUB_OFFLINE": "1",
           "LAWTUNE_NO_PROGRESS": "1"}
    settings = Settings(artifact_root=root_uri, run_id=RUN_ID, s3_endpoint_url=env.get("LAWTUNE_S3_ENDPOINT_URL"),
                        cache_dir=Path(env["LAWTUNE_CACHE_DIR"]))
    return Pipeline(settings, env, config, workdir / "serving" / "model")


# Where each stage is killed: a line of its own log, then up to so many seconds more. In run order,
# each before the stage's commit, so the kills spread over the work rather than over wall time
# (which shifts with the machine's load).
MARKERS = {
    "preprocess": [("reading ", 0.3), ("pass 1 (read, clean, spill) done", 0.2)],
    "finetune": [("trainable params", 5.0), ("checkpoint step-1 committed", 1.0), ("step 2/4", 2.0),
                 ("checkpoint step-3 committed", 1.0), ("step 4/4", 1.0)],
    "evaluate": [("generating answers", 2.0), ("generating answers", 10.0)],
    # The sharded merge (publish's default path) logs these; "merge check (float32, in memory)" is the
    # in-memory fallback's line, never logged here: the kill trials' missing-marker check found it stale.
    "publish": [("merged shard ", 1.0), ("sharded merge: ", 0.5), ("merge check (reloaded", 2.0)],
    "fetch_model": [("fetching ", 0.5), ("fetching ", 2.0)],
}


# The gap inside each stage's commit (shared/core/failpoints.py): the files are stored, the manifest (or
# for fetch_model the rename into place) is not. Armed in every trial as the latest point a kill can land.
COMMIT_POINT = {"preprocess": "commit:data", "finetune": "commit:finetune", "evaluate": "commit:evaluate",
                "publish": "commit:publish", "fetch_model": "fetch:verified"}
# Kills inside the commits, tried on every run beside the seeded points: between the uploads and the
# manifest, and (publish) between PROMOTED's swap and its history record.
COMMIT_KILLS = {stage: [(f"failpoint {point}: stopped", 0.0)] for stage, point in COMMIT_POINT.items()}
COMMIT_KILLS["publish"].append(("failpoint promote:swapped: stopped", 0.0))


def kill_points(stage: str, n: int, seed: int) -> list[tuple[str, float]]:
    """``n`` (marker, delay) pairs spread over the stage's markers, the delays drawn (seeded)."""
    rng = random.Random(seed)
    markers = MARKERS[stage]
    picks = [markers[(i * len(markers)) // n + rng.randrange(max(1, len(markers) // n)) if n < len(markers)
                     else i % len(markers)] for i in range(n)]
    return [(marker, round(rng.uniform(0, most), 2)) for marker, most in picks]


def committed(loc) -> Manifest | None:
    return find_manifest(loc) if loc is not None else None


def file_digests(manifest: Manifest, stage: str) -> dict[str, str]:
    return {f.path: f.sha256 for f in manifest.files
            if f.path not in VOLATILE.get(stage, ()) and not f.path.startswith(VOLATILE_FOLDERS)}


def file_paths(manifest: Manifest) -> list[str]:
    """The manifest's files, an event file of a volatile folder counted by its folder alone."""
    return sorted(next((folder + "*" for folder in VOLATILE_FOLDERS if f.path.startswith(folder)), f.path)
                  for f in manifest.files)


__all__ = ["MANIFEST", "Pipeline", "pipeline", "kill_points", "committed", "file_digests", "file_paths", "STAGES", "COMMIT_KILLS"]
