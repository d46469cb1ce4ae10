"""shared/store/lease.py: one writer per output folder, on both backends (S3 = real SeaweedFS)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.core.settings import Settings
from shared.store.artifacts import MANIFEST, read_manifest
from shared.store.lease import LEASE, Lease, LeaseHeld
from shared.store.stage import StageOutput
from shared.store.storage import open_location
from tests.conftest import REPO

SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"


def test_a_second_writer_is_refused_naming_the_first_and_gets_it_once_released(artifact_root):
    settings = Settings()
    loc = open_location(settings.run_uri("data"), settings)
    first = Lease(loc).acquire()
    with pytest.raises(LeaseHeld, match=rf"is being written by pid {os.getpid()} on {socket.gethostname()}"):
        Lease(loc).acquire()
    first.release()
    Lease(loc).acquire().release()
    assert LEASE not in loc.list_files(), "bookkeeping is not an artifact file"


def test_stage_output_takes_the_lease_so_a_concurrent_stage_exits_1(artifact_root):
    settings = Settings()
    with StageOutput(settings, "data", settings.run_uri("data"), {"x": 1}) as first:
        assert first.lease is not None
        second = StageOutput(settings, "data", settings.run_uri("data"), {"x": 1})
        with pytest.raises(LeaseHeld) as caught:
            second.__enter__()
        assert caught.value.exit_code == 1
        (first.workdir / "a.txt").write_text("a")
        first.commit()
    # The waiting writer, run again, finds these inputs committed and skips.
    with StageOutput(settings, "data", settings.run_uri("data"), {"x": 1}) as again:
        assert again.skipped is not None and again.lease is None


@pytest.mark.integration
@pytest.mark.parametrize("why", ["expired", "dead-pid-on-this-host"])
def test_a_stale_s3_lease_is_taken_over(s3_env, why):
    settings = Settings()
    loc = open_location(settings.run_uri("data"), settings)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"host": socket.gethostname(), "pid": int(dead.stdout), "id": "x", "since": time.time() - 600,
            "expires": time.time() - 1 if why == "expired" else time.time() + 600}
    if why == "expired":
        info["host"] = "another-node"
    loc.write_bytes(LEASE, json.dumps(info).encode())
    lease = Lease(loc).acquire()
    held = json.loads(loc.read_bytes(LEASE))
    assert held["pid"] == os.getpid()
    lease.release()
    assert not loc.exists(LEASE)


@pytest.mark.integration
def test_a_live_s3_lease_of_another_node_is_respected(s3_env):
    settings = Settings()
    loc = open_location(settings.run_uri("data"), settings)
    loc.write_bytes(LEASE, json.dumps({"host": "node-b", "pid": 1, "since": time.time(), "expires": time.time() + 60}).encode())
    with pytest.raises(LeaseHeld, match="pid 1 on node-b"):
        Lease(loc).acquire()


def _preprocess(env: dict[str, str], run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", "--input", str(SAMPLE)], cwd=REPO,
                          env={**os.environ, **env, "LAWTUNE_RUN_ID": run_id}, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_same_run_id_while_a_writer_holds_it_exits_1_with_one_line_and_writes_nothing(artifact_root, tmp_path):
    """The second of two processes given one run id: a clear line, exit 1 (the Job retries), no file written.
    finetune too: it would otherwise interleave its checkpoints with the first writer's."""
    settings = Settings()
    env = {k: v for k, v in os.environ.items() if k.startswith(("LAWTUNE_", "AWS_"))}
    holder = Lease(open_location(settings.run_uri("data"), settings)).acquire()
    try:
        result = _preprocess(env, settings.run_id)
    finally:
        holder.release()
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lawtune preprocess: error: ") and f"being written by pid {os.getpid()}" in last
    assert open_location(settings.run_uri("data"), settings).list_files() == []
    assert _preprocess(env, settings.run_id).returncode == 0, "once the first writer is gone, the retry runs"

    ft = Lease(open_location(settings.run_uri("finetune"), settings)).acquire()
    try:
        config = tmp_path / "c.yaml"
        config.write_text("training_args: {max_steps: 2, save_steps: 1}\n")
        blocked = subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=REPO,
                                 env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    finally:
        ft.release()
    assert blocked.returncode == 1 and "being written by pid" in blocked.stderr.strip().splitlines()[-1]
    assert open_location(settings.run_uri("finetune"), settings).list_files() == [], "no checkpoint written"


@pytest.mark.integration
def test_concurrent_starts_same_and_different_run_ids(artifact_root):
    """Four processes at once: two share run id A, two have B and C. Every one ends 0 (it wrote
    or found the output committed) or 1 with the lease line; each run's output equals a solo run's."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("LAWTUNE_", "AWS_"))}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: (r, _preprocess(env, r)), ["a", "a", "b", "c"]))
    for run_id, result in results:
        assert result.returncode in (0, 1), result.stderr[-2000:]
        if result.returncode == 1:
            assert run_id == "a" and "being written by pid" in result.stderr.strip().splitlines()[-1]
    assert [r.returncode for run_id, r in results if run_id != "a"] == [0, 0], "different run ids never interfere"
    settings = Settings()
    digests = set()
    for run_id in "abc":
        loc = open_location(Settings(run_id=run_id).run_uri("data"), settings)
        manifest = read_manifest(loc)
        assert set(loc.list_files()) == {f.path for f in manifest.files} | {MANIFEST}
        digests.add(tuple(sorted((f.path, f.sha256) for f in manifest.files)))
    assert len(digests) == 1, "the same input gives the same files under every run id"


@pytest.mark.integration
def test_a_finetune_whose_lease_was_taken_over_writes_and_prunes_no_more_checkpoints(s3_env, monkeypatch, tmp_path):
    """Before, only the final commit checked the lease: a pod presumed dead (its lease expired, a
    retry took over) went on committing checkpoints into the new writer's folder and pruning them."""
    import shared.store.lease as lease_module
    from shared.core.errors import StorageError
    from shared.train.training import CheckpointStore

    monkeypatch.setattr(lease_module, "TTL_S", 0.3)  # renewal every 0.1 s: the takeover is noticed at once
    settings = Settings()
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    with StageOutput(settings, "finetune", settings.run_uri("finetune"), {"x": 1}) as out:
        store = CheckpointStore.of(out)
        store.commit(checkpoint, 1, {"dev_loss": 1.0})
        # What a retry does when it finds this lease stale: it writes its own in its place.
        out.location.write_bytes(LEASE, json.dumps({"host": "node-b", "pid": 1, "id": "retry", "expires": time.time() + 60}).encode())
        deadline = time.monotonic() + 10
        while out.lease._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(StorageError, match="the writer lease was taken over by another process"):
            store.commit(checkpoint, 2, {"dev_loss": 0.5})
        with pytest.raises(StorageError, match="taken over"):
            store.prune(keep=0)
    assert sorted(store.committed()) == [1], "no step-2 written, step-1 not pruned"
    assert not any(path.startswith("step-2/") for path in store.root.list_files())
