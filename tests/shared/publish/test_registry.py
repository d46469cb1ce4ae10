"""shared/publish/registry.py and Location.write_if: compare-and-swap of PROMOTED on file:// and real SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.core.settings import load_settings
from shared.publish import registry
from shared.store.artifacts import commit_dir, now_iso
from shared.store.storage import open_location

REPO = Path(__file__).resolve().parents[3]


def publish_fake_version(settings, name: str, version: str, tmp: Path, *, passed: bool = True, trained_at: str = "") -> None:
    """A committed version folder (a manifest with the extra publish writes), no weights: enough for the registry."""
    folder = tmp / f"v-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lawtune-model.json").write_text(json.dumps({"version": version}))
    gate = {"passed": passed, "reasons": [], "checks": []}
    commit_dir(folder, open_location(f"{settings.models_uri(name)}/{version}", settings), stage="publish",
               inputs={"v": version}, started_at=now_iso(),
               extra={"gate": gate, "run_id": version.split("-")[0], "trained_at": trained_at or now_iso(),
                      "metrics": {"rouge-l": 12.5, "bleu-4": 3.25}, "data": "ab" * 32})


@pytest.fixture(params=[
    "file",
    pytest.param(("true", "true"), id="s3-lock+conditional", marks=pytest.mark.integration),  # the default
    pytest.param(("false", "true"), id="s3-lock-only", marks=pytest.mark.integration),  # a store without conditional writes
    # LAWTUNE_S3_PROMOTION_LOCK=false: conditional writes alone (SeaweedFS lets more than one of a racing batch through)
    pytest.param(("true", "false"), id="s3-conditional-only", marks=pytest.mark.integration),
])
def cas_root(request, tmp_path, monkeypatch) -> str:
    """The artifact root under each way PROMOTED is swapped: flock on file://, and on S3 (real
    SeaweedFS) the lock object with and without conditional writes, as the settings choose."""
    if request.param == "file":
        root = f"file://{tmp_path / 'artifacts'}"
        monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", root)
        return root
    conditional, lock = request.param
    monkeypatch.setenv("LAWTUNE_S3_CONDITIONAL_WRITES", conditional)
    monkeypatch.setenv("LAWTUNE_S3_PROMOTION_LOCK", lock)
    return request.getfixturevalue("s3_env")["LAWTUNE_ARTIFACT_ROOT"]


def test_write_if_swaps_only_from_the_content_read(cas_root):
    loc = open_location(f"{cas_root}/cas", load_settings())
    assert loc.read_with_token("P") == (None, None)
    assert loc.write_if("P", b"a", None)
    assert not loc.write_if("P", b"b", None), "a first write must not replace an existing file"
    data, token = loc.read_with_token("P")
    assert data == b"a" and token
    assert loc.write_if("P", b"c", token)
    assert not loc.write_if("P", b"d", token), "a stale token must not win"
    assert loc.read_bytes("P") == b"c"
    lock_file = [".P.lock"] if cas_root.startswith("file") else []  # flock needs a file; S3's lock object is gone
    assert [f for f in loc.list_files() if f != "P"] == lock_file


_RACER = textwrap.dedent("""
    import sys
    from shared.core.settings import load_settings
    from shared.store.storage import open_location
    loc = open_location(sys.argv[1], load_settings())
    _, token = loc.read_with_token("P")
    print("ready", flush=True)
    sys.stdin.readline()  # go: every racer has read before any writes
    print("won" if loc.write_if("P", sys.argv[2].encode(), token) else "lost", flush=True)
""")


@pytest.mark.fault('4 processes racing to move PROMOTED (file; S3 lock+conditional, lock only, LAWTUNE_S3_PROMOTION_LOCK=false)')
def test_racing_processes_have_exactly_one_winner(cas_root):
    """Four processes read PROMOTED, wait until all four have, then all try to swap it."""
    uri = f"{cas_root}/race"
    open_location(uri, load_settings()).write_bytes("P", b"start")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, f"racer{i}"], cwd=REPO, env=os.environ.copy(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(4)]
    # Released together once all four have read PROMOTED (before: a wall-clock instant 8 s ahead, which a
    # racer slower to start than that missed, reading the winner's token and winning as well).
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sorted(results) == ["lost", "lost", "lost", "won"]
    winner = f"racer{results.index('won')}"
    assert open_location(uri, load_settings()).read_bytes("P").decode() == winner


def test_rollback_target_skips_rolled_back_versions():
    events = [{"kind": "promote", "from": None, "to": "a"}, {"kind": "promote", "from": "a", "to": "b"},
              {"kind": "forced", "from": "b", "to": "c"}]
    assert registry.rollback_target(events) == "b"
    events.append({"kind": "rollback", "from": "c", "to": "b"})
    assert registry.rollback_target(events) == "a", "a second rollback goes further back, not back to c"
    events.append({"kind": "rollback", "from": "b", "to": "a"})
    assert registry.rollback_target(events) is None
    assert registry.rollback_target([]) is None


def test_move_pointer_records_who_and_refuses_incomplete_versions(artifact_root, tmp_path, monkeypatch):
    from shared.core.errors import IntegrityError

    monkeypatch.setenv("LAWTUNE_ACTOR", "ci-bot")
    settings = load_settings()
    root = open_location(settings.models_uri("m"), settings)
    publish_fake_version(settings, "m", "r1-aaaa", tmp_path)
    with pytest.raises(IntegrityError, match="no manifest"):
        registry.move_pointer(root, registry.read_pointer(root), "r9-missing", {"kind": "promote"})
    event = registry.move_pointer(root, registry.read_pointer(root), "r1-aaaa", {"kind": "promote", "run_id": "r1"})
    assert event["actor"] == "ci-bot" and event["from"] is None and event["to"] == "r1-aaaa"
    assert registry.history(root) == [event]
    stale = registry.Pointer(None, None)
    publish_fake_version(settings, "m", "r2-bbbb", tmp_path)
    with pytest.raises(registry.PromotionConflict, match="moved to r1-aaaa"):
        registry.move_pointer(root, stale, "r2-bbbb", {"kind": "promote"})
    assert registry.read_pointer(root).version == "r1-aaaa" and len(registry.history(root)) == 1


@pytest.mark.parametrize("content", ["..", "../other/v1", "v1/..", ""])
def test_read_pointer_refuses_a_promoted_that_names_a_path(tmp_path, content):
    """issue 24 item 1: evaluate, publish and `lawtune models` join PROMOTED's content to models/<name>/."""
    from shared.core.errors import ConfigError

    root = open_location(f"file://{tmp_path}/models/m", load_settings(artifact_root=f"file://{tmp_path}"))
    root.write_text("PROMOTED", content)
    with pytest.raises(ConfigError, match=r"models/m/PROMOTED holds .*expected a version name"):
        registry.read_pointer(root)


def _promote_killed_after_the_swap(version: str) -> None:
    """``lawtune models promote`` stopped by the ``promote:swapped`` failpoint, then SIGKILLed there."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.models", "promote", "m", version], cwd=REPO, start_new_session=True,
                            env={**os.environ, "LAWTUNE_FAILPOINTS": "promote:swapped"}, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "failpoint promote:swapped: stopped" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"promote ended ({proc.poll()}) before its swap"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("rerun", ["publish", "models-promote", "models-rollback"])
@pytest.mark.fault("SIGKILL between PROMOTED's swap and its history record")
def test_a_kill_between_the_swap_and_its_record_is_repaired_by_the_rerun(artifact_root, tmp_path, rerun):
    """Before: PROMOTED moved to v2 with no history record, the re-run found "PROMOTED already names
    v2" and wrote none, and a rollback then went to the version before v1 (here: nothing) instead of v1."""
    from jobs import models, publish

    settings = load_settings()
    root = open_location(settings.models_uri("m"), settings)
    publish_fake_version(settings, "m", "r1-aaaa", tmp_path, trained_at="2026-01-01T00:00:00+00:00")
    publish_fake_version(settings, "m", "r2-bbbb", tmp_path, trained_at="2026-01-02T00:00:00+00:00")
    assert models.main(["promote", "m", "r1-aaaa"]) == 0
    _promote_killed_after_the_swap("r2-bbbb")
    assert registry.read_pointer(root).version == "r2-bbbb"
    assert [e["to"] for e in registry.history(root)] == ["r1-aaaa"], "killed before its record"

    if rerun == "publish":  # what publish's re-run does once its version is committed: _promote
        version = registry.require_version(root, "m", "r2-bbbb")
        assert publish._promote(root, registry.read_pointer(root), "r2-bbbb", version.manifest, True, False,
                                version.gate, "r2")
    elif rerun == "models-promote":
        assert models.main(["promote", "m", "r2-bbbb"]) == 0
    events = registry.history(root)
    if rerun == "models-rollback":
        assert models.main(["rollback", "m"]) == 0
        assert registry.read_pointer(root).version == "r1-aaaa", "the rollback goes to the version promoted before"
        events = registry.history(root)[:2]
    assert [(e["from"], e["to"], e["kind"]) for e in events] == [(None, "r1-aaaa", "promote"), ("r1-aaaa", "r2-bbbb", "promote")]
    assert events[1]["recovered_at"] and events[1]["actor"]
    assert root.child(registry.HISTORY).child(registry.PENDING).list_files() == [], "no intent left behind"
    if rerun != "models-rollback":
        assert registry.rollback_target(registry.history(root)) == "r1-aaaa"


@pytest.fixture
def s3_proxy(seaweedfs, s3_env, monkeypatch):
    from tests.faultproxy import FaultProxy

    host, port = seaweedfs.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    monkeypatch.setenv("LAWTUNE_S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("LAWTUNE_S3_READ_TIMEOUT", "2")
    yield proxy
    proxy.stop()


@pytest.mark.integration
@pytest.mark.parametrize("first", [True, False], ids=["first-promotion", "next-promotion"])
@pytest.mark.fault("PROMOTED's conditional PUT applied, its answer lost")
def test_a_swap_whose_answer_was_lost_is_recognised_as_ours(s3_proxy, tmp_path, first):
    """SeaweedFS applied the conditional PUT of PROMOTED and the answer was reset on its way back;
    botocore's retry fails its own condition (412). Before: PromotionConflict naming our own version
    as "the other promotion" that won, and no history record."""
    from tests.faultproxy import Fault

    settings = load_settings()
    root = open_location(settings.models_uri("m"), settings)
    publish_fake_version(settings, "m", "r1-aaaa", tmp_path)
    publish_fake_version(settings, "m", "r2-bbbb", tmp_path)
    if not first:
        registry.move_pointer(root, registry.read_pointer(root), "r1-aaaa", {"kind": "promote"})
    to = "r1-aaaa" if first else "r2-bbbb"
    s3_proxy.add(Fault("lose-response", method="PUT", path_contains="/PROMOTED",
                       header_contains="If-None-Match" if first else "If-Match"))
    registry.move_pointer(root, registry.read_pointer(root), to, {"kind": "promote"})
    assert s3_proxy.hits("lose-response") == 1, s3_proxy.log
    assert registry.read_pointer(root).version == to
    assert [e["to"] for e in registry.history(root)] == (["r1-aaaa"] if first else ["r1-aaaa", "r2-bbbb"])


_LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from shared.core.settings import load_settings
    from shared.store.storage import open_location
    loc = open_location(sys.argv[1], load_settings())
    owner, _ = loc._acquire("P.lock")
    print("holding", flush=True)
    sys.stdin.readline()  # the contender is trying now: hold on a while longer, then release
    time.sleep(float(sys.argv[2]))
    print("released", time.monotonic(), flush=True)
    loc.delete("P.lock")
""")

_SKEWED_WRITER = "import time; _real = time.time; time.time = lambda: _real() + 600\n" + textwrap.dedent("""
    import sys
    from shared.core.settings import load_settings
    from shared.store.storage import open_location
    loc = open_location(sys.argv[1], load_settings())
    _, token = loc.read_with_token("P")
    print("trying", flush=True)
    won = loc.write_if("P", b"skewed", token)
    print("wrote" if won else "lost", time.monotonic(), flush=True)
""")


@pytest.mark.integration
@pytest.mark.fault('promotion lock expiry under clock skew')
def test_the_promotion_lock_is_not_taken_from_a_live_holder_by_a_clock_running_ahead(s3_env, monkeypatch):
    """A writer whose clock is 10 minutes ahead (time.time shifted in its process: libfaketime is not
    installed here; the store and both processes are real) sees the holder's lock as long expired.
    Before, it took the lock and swapped while the holder still held it; now it waits for the release."""
    uri = f"{s3_env['LAWTUNE_ARTIFACT_ROOT']}/skew"
    open_location(uri, load_settings()).write_bytes("P", b"start")
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, uri, "3"], cwd=REPO, env=os.environ.copy(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    writer = subprocess.Popen([sys.executable, "-c", _SKEWED_WRITER, uri], cwd=REPO, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The holder releases 3 s after the writer began to try, however long the writer took to start (a
    # fixed hold let a writer slower to start than the hold find the lock free, and the test pass untested).
    assert writer.stdout.readline().strip() == "trying", writer.stderr.read()[-2000:]
    released = float(holder.communicate("go\n", timeout=60)[0].split()[-1])
    out, err = writer.communicate(timeout=120)
    outcome, at = out.split()
    assert outcome == "wrote", err[-2000:]
    assert float(at) > released, "the skewed writer swapped while the holder still held the lock"
