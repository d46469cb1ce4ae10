"""shared/publish/registry.py and Location.write_if: compare-and-swap of PROMOTED on file:// and real SeaweedFS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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
    import sys, time
    from shared.core.settings import load_settings
    from shared.store.storage import open_location
    loc = open_location(sys.argv[1], load_settings())
    _, token = loc.read_with_token("P")
    while time.time() < float(sys.argv[3]):   # every racer has read before any writes
        time.sleep(0.005)
    print("won" if loc.write_if("P", sys.argv[2].encode(), token) else "lost", flush=True)
""")


def test_racing_processes_have_exactly_one_winner(cas_root):
    """Four processes read PROMOTED, wait for the same instant, then all try to swap it."""
    import time

    uri = f"{cas_root}/race"
    open_location(uri, load_settings()).write_bytes("P", b"start")
    go = time.time() + 8  # interpreter start-up and boto3 import on a busy 2-core machine
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, f"racer{i}", str(go)], cwd=REPO, env=os.environ.copy(),
                              stdout=subprocess.PIPE, text=True) for i in range(4)]
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
