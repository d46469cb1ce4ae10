"""shared/store/lease.py: one writer per output folder, on both backends (S3 = real SeaweedFS)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.core.errors import StorageError
from shared.core.settings import Settings
from shared.store.artifacts import MANIFEST, read_manifest
from shared.store.lease import LEASE, Lease, LeaseHeld
from shared.store.stage import StageOutput
from shared.store.storage import open_location
from tests.conftest import REPO
from tests.faultproxy import Fault, FaultProxy

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
@pytest.mark.parametrize("why", ["expired-on-another-node", "dead-pid-on-this-host"])
@pytest.mark.fault("a stale S3 lease (another node's expired; a dead pid of this host)")
def test_a_stale_s3_lease_is_taken_over(s3_env, monkeypatch, why):
    monkeypatch.setenv("LAWTUNE_LEASE_TTL_S", "1")  # another node's expired lease is watched one TTL before the takeover
    settings = Settings()
    loc = open_location(settings.run_uri("data"), settings)
    # What a process of this host and pid namespace writes, from one that has exited since.
    dead = subprocess.run([sys.executable, "-c", "import json; from shared.store.lease import _holder; print(json.dumps(_holder()))"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    info = {**json.loads(dead.stdout), "since": time.time() - 600,
            "expires": time.time() - 1 if why.startswith("expired") else time.time() + 600}
    if why.startswith("expired"):
        info["host"] = "another-node"
    loc.write_bytes(LEASE, json.dumps(info).encode())
    lease = Lease(loc, settings.lease_ttl_s).acquire()
    held = json.loads(loc.read_bytes(LEASE))
    assert held["pid"] == os.getpid()
    lease.release()
    assert not loc.exists(LEASE)


@pytest.mark.integration
@pytest.mark.fault('a live S3 lease of another node')
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
@pytest.mark.fault('the same run id while a writer holds it')
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
@pytest.mark.fault('4 processes at once: run ids a, a, b, c')
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
@pytest.mark.fault("a finetune's lease taken over mid-run")
def test_a_finetune_whose_lease_was_taken_over_writes_and_prunes_no_more_checkpoints(s3_env, monkeypatch, tmp_path):
    """Before, only the final commit checked the lease: a pod presumed dead (its lease expired, a
    retry took over) went on committing checkpoints into the new writer's folder and pruning them."""
    from shared.train.training import CheckpointStore

    monkeypatch.setenv("LAWTUNE_LEASE_TTL_S", "1")  # renewal every 0.33 s: the takeover is noticed at once
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


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def lease_proxy(seaweedfs, s3_env, monkeypatch):
    """S3 through tests/faultproxy.py, 2 attempts a call and a 2 s lease TTL, so faults outlast the lease cheaply."""
    host, port = seaweedfs.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    for key, value in {"LAWTUNE_S3_ENDPOINT_URL": proxy.endpoint, "LAWTUNE_S3_MAX_ATTEMPTS": "2",
                       "LAWTUNE_S3_READ_TIMEOUT": "1", "LAWTUNE_S3_CONNECT_TIMEOUT": "1", "LAWTUNE_LEASE_TTL_S": "2"}.items():
        monkeypatch.setenv(key, value)
    yield proxy
    proxy.stop()


@pytest.mark.integration
@pytest.mark.fault('lease renewals refused (403) longer than the TTL')
def test_a_writer_whose_renewals_are_refused_longer_than_the_ttl_does_not_commit(lease_proxy):
    """403 on every renewal (expired credentials for the lease's writes) while the uploads still pass:
    before, the renewal thread logged and retried for ever and the stage committed regardless."""
    settings = Settings()
    with StageOutput(settings, "data", settings.run_uri("data"), {"x": 1}) as out:
        (out.workdir / "a.txt").write_text("a")
        refused_at = time.monotonic()
        lease_proxy.add(Fault("403", method="PUT", path_contains=LEASE, times=10**6))
        # Refused for longer than the TTL, renewal after renewal:
        _wait_for(lambda: lease_proxy.hits("403") >= 3 and time.monotonic() - refused_at > settings.lease_ttl_s, 30,
                  "three refused renewals over more than a TTL")
        with pytest.raises(StorageError, match=r"the writer lease was last renewed \d+ s ago \(TTL 2 s"):
            out.commit()
    assert not out.location.exists(MANIFEST), "no manifest from a writer that could not renew its lease"


@pytest.mark.integration
@pytest.mark.fault('lease renewals refused (403) longer than the TTL')
def test_a_lease_lost_during_the_uploads_stops_the_commit_before_its_manifest(lease_proxy, monkeypatch):
    """The lease is fresh when commit() starts, then the uploads outlast the TTL (one stalled and retried)
    while every renewal is refused: a contender may have taken the folder over meanwhile, so the check
    immediately before the manifest must refuse. The check before the uploads cannot see this; the test
    above fails there already, so without this one the check before the manifest went untested."""
    monkeypatch.setenv("LAWTUNE_S3_READ_TIMEOUT", "6")  # the stall ends in a reset and a retry, not a read timeout
    settings = Settings()
    stall_s = settings.lease_ttl_s * 1.5
    with StageOutput(settings, "data", settings.run_uri("data"), {"x": 1}) as out:
        (out.workdir / "a.txt").write_text("a")
        lease_proxy.add(Fault("403", method="PUT", path_contains=LEASE, times=10**6),
                        Fault("stall", method="PUT", path_contains="/a.txt", seconds=stall_s))
        with pytest.raises(StorageError, match=r"the writer lease was last renewed \d+ s ago \(TTL 2 s"):
            out.commit()
    assert lease_proxy.hits("stall") == 1 and out.location.exists("a.txt"), "it got past the first check and uploaded"
    assert not out.location.exists(MANIFEST), "no manifest after uploads that outlasted the lease"


@pytest.mark.integration
@pytest.mark.fault('a writer cut off from S3 while another takes its folder over')
def test_a_writer_cut_off_from_s3_while_another_takes_over_does_not_commit(lease_proxy, seaweedfs):
    """The writer reaches S3 through the proxy, which refuses everything for a while (a partition);
    a retry pod on the other side watches the lease unchanged for a TTL and takes the folder over.
    When the writer's S3 comes back, its commit must not land in the new writer's folder."""
    settings = Settings()
    direct = Settings(s3_endpoint_url=seaweedfs.endpoint, lease_ttl_s=settings.lease_ttl_s)
    with StageOutput(settings, "data", settings.run_uri("data"), {"x": 1}) as out:
        (out.workdir / "a.txt").write_text("a")
        lease_proxy.add(Fault("refuse", times=10**6))
        other = Lease(open_location(settings.run_uri("data"), direct), direct.lease_ttl_s)
        _wait_for(lambda: _try_acquire(other), 60, "the other writer to take the lease over")
        lease_proxy.clear()  # the store answers the first writer again
        with pytest.raises(StorageError, match="writer lease"):
            out.commit()
    assert not out.location.exists(MANIFEST)
    assert json.loads(open_location(settings.run_uri("data"), direct).read_bytes(LEASE))["id"] == other.info["id"]
    other.release()


def _try_acquire(lease: Lease) -> bool:
    try:
        lease.acquire()
        return True
    except LeaseHeld:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("lost", ["acquire", "renewal"])
@pytest.mark.fault("a lease's conditional PUT applied, its answer lost")
def test_a_lease_write_whose_answer_was_lost_is_recognised_as_ours(lease_proxy, lost):
    """The store applied the conditional PUT and the answer was reset on the way back: botocore's retry
    then fails its own If-None-Match / If-Match. Before, acquire named this very process as the holder
    (exit 1) and a renewal declared the lease taken over (no commit)."""
    settings = Settings()
    loc = open_location(settings.run_uri("data"), settings)
    if lost == "acquire":
        lease_proxy.add(Fault("lose-response", method="PUT", path_contains=LEASE))
    lease = Lease(loc, settings.lease_ttl_s).acquire()
    try:
        if lost == "renewal":
            lease_proxy.add(Fault("lose-response", method="PUT", path_contains=LEASE))
            _wait_for(lambda: lease_proxy.hits("lose-response") == 1 and lease._etag == loc.read_with_token(LEASE)[1], 20,
                      "the renewal whose answer was lost, and one after it")
            # check() right after a renewal: on loaded cores a renewal can take longer than the
            # 2 s TTL's margin, which check() rightly refuses; that is not what this test is about.
            _wait_for(lambda: lease._writes >= 3 and time.monotonic() - lease._renewed_at < lease.ttl_s / 3, 20,
                      "a renewal after the lost answer")
        assert lease_proxy.hits("lose-response") == 1, lease_proxy.log
        lease.check()
        assert json.loads(loc.read_bytes(LEASE))["id"] == lease.info["id"]
    finally:
        lease.release()
    assert not loc.exists(LEASE), "released: the ETag it holds is the store's"


_HOLDER = textwrap.dedent("""
    import sys, time
    from shared.core.settings import load_settings
    from shared.store.lease import Lease
    from shared.store.storage import open_location
    settings = load_settings()
    Lease(open_location(sys.argv[1], settings), settings.lease_ttl_s).acquire()
    print("held", flush=True)
    time.sleep(3600)
""")


@pytest.mark.integration
@pytest.mark.parametrize("namespaces", [
    # A retried pod: another host name (and pid namespace) on another node.
    pytest.param(["--uts", "--pid"], id="another-host-name"),
    # An Indexed Job's retried pod keeps the host name <job>-<index>, in a pid namespace of its own.
    pytest.param(["--pid"], id="same-host-name-other-pid-namespace"),
])
@pytest.mark.fault('lease holder in another pod: other host name; same host name, other pid namespace')
def test_takeover_from_a_holder_in_other_namespaces_only_once_it_stopped_renewing(s3_env, monkeypatch, namespaces):
    """The holder is a real process in its own pid (and UTS) namespace (unshare), its pid one that does not
    exist here. Before, a lease with this host's name and a pid dead *here* was taken over at once, while
    its holder, alive in the other pod, went on writing."""
    monkeypatch.setenv("LAWTUNE_LEASE_TTL_S", "2")
    settings = Settings()
    uri = settings.run_uri("data")
    loc = open_location(uri, settings)
    # Its pid: high in its own namespace, so that the same number is (checked below) no process here.
    script = ("hostname retry-pod-1; " if "--uts" in namespaces else "") + \
        f"echo 31000 > /proc/sys/kernel/ns_last_pid; {sys.executable} -c \"$0\" {uri}; true"
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", *namespaces, "--fork", "--mount-proc", "sh", "-c",
                               script, _HOLDER], cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads(loc.read_bytes(LEASE))
        assert info["pidns"] != os.readlink("/proc/self/ns/pid")
        assert (info["host"] == socket.gethostname()) == ("--uts" not in namespaces)
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)  # the holder's pid names no process in this namespace
        # Alive and renewing: refused, also once its recorded expiry has passed by our clock (a clock
        # ahead of the holder's), since it keeps renewing while watched.
        with pytest.raises(LeaseHeld, match=f"pid {info['pid']} on {info['host']}"):
            Lease(loc, settings.lease_ttl_s).acquire()
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        lease = Lease(loc, settings.lease_ttl_s)
        _wait_for(lambda: _try_acquire(lease), 30, "the takeover once the holder stopped renewing")
        assert json.loads(loc.read_bytes(LEASE))["id"] == lease.info["id"]
        lease.release()
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)


@pytest.mark.integration
@pytest.mark.fault('lease expiry under clock skew (contender 10 min ahead)')
def test_a_contender_whose_clock_runs_ahead_does_not_take_a_live_lease(s3_env, monkeypatch, tmp_path):
    """A contender's clock 10 minutes ahead (libfaketime is not installed here, so the contender's
    time.time is shifted in-process; the store, the holder and the lease are real): the holder's
    expiry looks long past to it, but the lease keeps changing while it watches, so it is refused."""
    monkeypatch.setenv("LAWTUNE_LEASE_TTL_S", "2")
    settings = Settings()
    holder = Lease(open_location(settings.run_uri("data"), settings), settings.lease_ttl_s).acquire()
    try:
        skewed = "import time; _real = time.time; time.time = lambda: _real() + 600\n" + textwrap.dedent("""
            import sys
            from shared.core.settings import load_settings
            from shared.store.lease import Lease, LeaseHeld
            from shared.store.storage import open_location
            settings = load_settings()
            try:
                Lease(open_location(sys.argv[1], settings), settings.lease_ttl_s).acquire()
                print("took it")
            except LeaseHeld as exc:
                print("refused:", exc)
        """)
        result = subprocess.run([sys.executable, "-c", skewed, settings.run_uri("data")], cwd=REPO, env=os.environ.copy(),
                                capture_output=True, text=True, timeout=120)
        assert result.stdout.startswith("refused:"), result.stdout + result.stderr[-2000:]
        holder.check()
    finally:
        holder.release()
