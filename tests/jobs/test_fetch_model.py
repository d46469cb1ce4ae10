"""jobs/fetch_model.py: promoted or named version, verified, target complete or absent (file and S3)."""

from __future__ import annotations

import pytest

from jobs import fetch_model
from shared.store.artifacts import commit_dir, now_iso, sha256_file
from shared.core.errors import ConfigError, IntegrityError
from shared.core.settings import load_settings
from shared.store.storage import open_location


@pytest.fixture
def published(artifact_root, tmp_path):
    """models/m/v1 and models/m/v2 committed, PROMOTED -> v2."""
    settings = load_settings()
    root = settings.models_uri("m")
    for version in ("v1", "v2"):
        src = tmp_path / f"src-{version}"
        (src / "sub").mkdir(parents=True)
        (src / "config.json").write_text(f'{{"version": "{version}"}}')
        (src / "sub" / "weights.bin").write_bytes(version.encode() * 100_000)
        commit_dir(src, open_location(f"{root}/{version}", settings), stage="publish", inputs={}, started_at=now_iso())
    open_location(root, settings).write_text("PROMOTED", "v2")
    return settings, root, tmp_path


@pytest.mark.parametrize(("suffix", "version"), [pytest.param("", "v2", id="promoted"), pytest.param("/v1", "v1", id="named-version")])
def test_fetches_complete_and_verified(published, suffix, version):
    settings, root, tmp = published
    target = tmp / "out" / "model"
    result = fetch_model.run(settings, root + suffix, target)
    assert result.version_uri.endswith(f"/m/{version}") and result.downloaded
    assert (target / "config.json").read_text() == f'{{"version": "{version}"}}'
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == ["MANIFEST.json", "config.json", "weights.bin"]
    assert sha256_file(target / "sub" / "weights.bin") == result.manifest.file("sub/weights.bin").sha256
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"], "no staging leftovers"
    again = fetch_model.run(settings, root + suffix, target)
    assert not again.downloaded, "a restarted init container does not download the same version again"


def test_replicas_starting_together_download_once(published):
    """Pods sharing a ReadWriteMany claim: one fetches, the others find the version in place
    (no replacing a folder that another pod's server is already loading)."""
    import threading

    settings, root, tmp = published
    target = tmp / "shared-claim" / "model"
    start = threading.Barrier(3)
    results = []

    def replica():
        start.wait()
        results.append(fetch_model.run(settings, root, target))

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.downloaded for r in results) == [False, False, True]
    assert (target / "config.json").read_text() == '{"version": "v2"}'


def test_promotion_change_replaces_the_target(published):
    settings, root, tmp = published
    target = tmp / "model"
    fetch_model.run(settings, root, target)
    open_location(root, settings).write_text("PROMOTED", "v1")
    assert fetch_model.run(settings, root, target).downloaded
    assert (target / "config.json").read_text() == '{"version": "v1"}'


def test_corrupted_file_leaves_target_absent(published):
    settings, root, tmp = published
    open_location(f"{root}/v2", settings).write_bytes("sub/weights.bin", b"tampered")
    target = tmp / "model"
    with pytest.raises(IntegrityError, match="sub/weights.bin"):
        fetch_model.run(settings, root, target)
    assert not target.exists()
    assert list(tmp.glob(".model.partial-*")) == []


def test_corrupted_file_keeps_the_previous_complete_target(published):
    settings, root, tmp = published
    target = tmp / "model"
    fetch_model.run(settings, f"{root}/v1", target)
    open_location(f"{root}/v2", settings).write_bytes("config.json", b"{}")
    with pytest.raises(IntegrityError):
        fetch_model.run(settings, root, target)
    assert (target / "config.json").read_text() == '{"version": "v1"}'


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        pytest.param(None, "has neither MANIFEST.json (a model version) nor PROMOTED", id="nothing-published"),
        pytest.param("", "holds ''; expected a version name", id="empty-promoted"),
        pytest.param("v9", "has no MANIFEST.json", id="promoted-version-missing"),
    ],
)
def test_cli_fails_with_exit_2_and_one_line(artifact_root, tmp_path, capsys, setup, needle):
    settings = load_settings()
    root = settings.models_uri("none")
    if setup is not None:
        open_location(root, settings).write_text("PROMOTED", setup)
    code = fetch_model.main([root, str(tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lawtune fetch-model: error: ") and needle in err[-1]
    assert not (tmp_path / "model").exists()


def test_cli_success_line(published, capsys):
    settings, root, tmp = published
    assert fetch_model.main([root, str(tmp / "m")]) == 0
    assert capsys.readouterr().out.startswith(f"fetched: {root}/v2 -> ")


@pytest.mark.parametrize("promoted", ["../../etc", "..", "v2/..", "."])
def test_resolve_version_rejects_path_in_promoted(artifact_root, promoted):
    settings = load_settings()
    root = settings.models_uri("x")
    open_location(root, settings).write_text("PROMOTED", promoted)
    with pytest.raises(ConfigError, match="expected a version name"):
        fetch_model.resolve_version(settings, root)


def _hostile_manifest(loc, path: str, payload: bytes = b"pwned\n") -> None:
    """A committed-looking version whose manifest lists ``path`` (written raw: our own writer would refuse it)."""
    import hashlib
    import json

    loc.write_bytes("config.json", b"{}")
    files = [{"path": "config.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
             {"path": path, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]
    loc.write_text("MANIFEST.json", json.dumps({"schema": "lawtune.manifest/v1", "stage": "publish", "inputs_digest": "x",
                                                "started_at": "t", "finished_at": "t", "files": files}))


@pytest.mark.parametrize("path", ["../x", "../../x", "sub/../../x", "<tmp>/abs-x"])
def test_a_manifest_path_outside_the_target_is_refused_and_nothing_is_written(artifact_root, tmp_path, capsys, path):
    """issue 24 item 1: before the fix, `../x` was written beside the target and fetch-model exited 0.
    The object the entry names exists with the right digest, so only the path check stops it."""
    path = path.replace("<tmp>", str(tmp_path))
    settings = load_settings()
    root = settings.models_uri("m")
    version = open_location(f"{root}/v1", settings)
    _hostile_manifest(version, path)
    if artifact_root.startswith("file://") and not path.startswith("/"):
        # What a reader joining the path fetches: the bytes the manifest promises (AWS S3 stores such a key
        # as it is; SeaweedFS refuses to, so on S3 here only the manifest names it).
        open_location(root, settings).child("v1").write_bytes(path, b"pwned\n")
    open_location(root, settings).write_text("PROMOTED", "v1")
    out = tmp_path / "out" / "deep"
    code = fetch_model.main([root, str(out / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lawtune fetch-model: error: ") and "MANIFEST.json" in err[-1] and repr(path) in err[-1], err[-1]
    assert not out.exists(), "refused before anything is created, the target's folder included"
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "x").exists() and not (tmp_path / "abs-x").exists()


def test_a_fetch_killed_mid_download_leaves_nothing_after_the_next_one(published):
    """SIGKILL skips build_atomically's cleanup: its staging folder stays beside the target
    until the next fetch (under the lock) removes it."""
    settings, root, tmp = published
    target = tmp / "out" / "model"
    leftover = target.parent / ".model.partial-k1ll3d"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "weights.bin").write_bytes(b"half")
    fetch_model.run(settings, root, target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]


@pytest.mark.fault("a damaged file in a fetched model's target, then a pod restart")
def test_a_file_damaged_in_the_target_is_fetched_again_not_served(published):
    """A restarted pod finds its version in place, but one file's bytes changed on the volume (same size):
    before, sizes alone said "already there" and vLLM loaded the damaged file."""
    settings, root, tmp = published
    target = tmp / "out" / "model"
    fetch_model.run(settings, root, target)
    weights = target / "sub" / "weights.bin"
    good = weights.read_bytes()
    weights.write_bytes(b"X" + good[1:])
    again = fetch_model.run(settings, root, target)
    assert again.downloaded, "the damaged target was fetched again"
    assert weights.read_bytes() == good
