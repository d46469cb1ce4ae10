"""shared/store/artifacts.py + shared/store/stage.py: manifest last, verified reads, skip-if-same-inputs, on both backends."""

import json

import pytest

from shared.store.artifacts import MANIFEST, commit_dir, fetch_dir, now_iso, read_manifest, read_verified, sha256_file, should_skip
from shared.core.errors import IntegrityError
from shared.core.settings import load_settings
from shared.store.stage import StageOutput, fetch_stage
from shared.store.storage import open_location

INPUTS = {"upstream": "abc", "config": "def"}


@pytest.fixture
def settings(artifact_root):
    return load_settings(run_id="art")


@pytest.fixture
def local_dir(tmp_path):
    d = tmp_path / "work"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"x": 1}\n')
    (d / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    return d


def commit(local_dir, loc, inputs=INPUTS):
    return commit_dir(local_dir, loc, stage="test", inputs=inputs, started_at=now_iso(), run_id="art")


def test_manifest_lists_sizes_and_checksums_and_is_written_last(settings, local_dir):
    loc = open_location(settings.run_uri("stage"), settings)
    order = []
    write_text, upload = loc.write_text, loc.upload_file
    loc.write_text = lambda rel, text: (order.append(rel), write_text(rel, text))[1]
    loc.upload_file = lambda path, rel: (order.append(rel), upload(path, rel))[1]
    manifest = commit(local_dir, loc)
    assert order[-1] == MANIFEST and sorted(order[:-1]) == ["a.jsonl", "sub/b.bin"]
    stored = read_manifest(loc)
    assert {(f.path, f.size, f.sha256) for f in stored.files} == {
        ("a.jsonl", 9, sha256_file(local_dir / "a.jsonl")),
        ("sub/b.bin", 1000, sha256_file(local_dir / "sub" / "b.bin")),
    }
    assert stored.digest == manifest.digest and stored.inputs == INPUTS


def test_fetch_verifies_and_rejects_a_corrupted_object_all_or_nothing(settings, local_dir, tmp_path):
    loc = open_location(settings.run_uri("stage"), settings)
    commit(local_dir, loc)
    good = tmp_path / "good"
    fetch_dir(loc, good)
    assert (good / "sub" / "b.bin").read_bytes() == b"\x00" * 1000 and (good / MANIFEST).exists()

    loc.write_bytes("sub/b.bin", b"\x00" * 999 + b"\x01")  # same size, one flipped byte
    target = tmp_path / "fetched"
    with pytest.raises(IntegrityError, match=r"sub/b.bin: sha256 .* does not match .*\(corrupted\)"):
        fetch_dir(loc, target)
    assert not target.exists() and list(tmp_path.glob(".fetched.partial-*")) == []
    with pytest.raises(IntegrityError, match="corrupted"):
        read_verified(loc, "sub/b.bin")
    assert json.loads(read_verified(loc, "a.jsonl")) == {"x": 1}

    loc.write_bytes("a.jsonl", b"short")
    with pytest.raises(IntegrityError, match="size 5 bytes, manifest says 9"):
        fetch_dir(loc, target, only=["a.jsonl"])


def test_a_folder_without_manifest_is_refused(settings, local_dir, tmp_path):
    loc = open_location(settings.run_uri("half"), settings)
    loc.write_text("train.jsonl", "{}\n")
    with pytest.raises(IntegrityError, match="has no MANIFEST.json: the stage that writes it did not finish"):
        fetch_dir(loc, tmp_path / "t")
    assert should_skip(loc, INPUTS) is None


def test_an_interrupted_commit_leaves_no_manifest(settings, local_dir):
    loc = open_location(settings.run_uri("stage"), settings)
    commit(local_dir, loc)  # an earlier complete run
    upload = loc.upload_file

    def interrupted(path, rel):
        if rel == "sub/b.bin":
            raise KeyboardInterrupt  # the pod is killed mid-upload
        upload(path, rel)

    loc.upload_file = interrupted
    (local_dir / "a.jsonl").write_text('{"x": 2}\n')
    with pytest.raises(KeyboardInterrupt):
        commit(local_dir, loc, inputs={"upstream": "new"})
    assert not loc.exists(MANIFEST)  # the old manifest went first, so nothing looks complete
    with pytest.raises(IntegrityError):
        read_manifest(loc)


def test_commit_removes_leftovers_of_an_earlier_attempt(settings, local_dir):
    loc = open_location(settings.run_uri("stage"), settings)
    loc.write_text("stale.jsonl", "old")
    commit(local_dir, loc)
    assert loc.list_files() == [MANIFEST, "a.jsonl", "sub/b.bin"]


def test_stage_output_skips_when_inputs_are_unchanged(settings, tmp_path):
    uri = settings.run_uri("data")

    def produce(inputs, text):
        with StageOutput(settings, "data", uri, inputs) as out:
            if out.skipped:
                return "skipped", out.skipped
            (out.workdir / "out.txt").write_text(text)
            return "ran", out.commit(extra={"n": 1})

    first = produce(INPUTS, "one")
    assert first[0] == "ran" and first[1].extra == {"n": 1}
    assert first[1].inputs["code_version"] == settings.resolved_code_version
    again = produce(INPUTS, "two")
    assert again[0] == "skipped" and again[1].finished_at == first[1].finished_at
    assert produce({**INPUTS, "config": "changed"}, "three")[0] == "ran"
    fetched = tmp_path / "f"
    fetch_stage(settings, uri, fetched)
    assert (fetched / "out.txt").read_text() == "three"


def test_stage_output_without_commit_leaves_nothing(settings):
    uri = settings.run_uri("data")
    with pytest.raises(RuntimeError):
        with StageOutput(settings, "data", uri, INPUTS) as out:
            (out.workdir / "partial.txt").write_text("half")
            raise RuntimeError("bad row count")
    assert not open_location(uri, settings).exists(MANIFEST)
    assert not list((settings.cache_dir / "work").iterdir())  # the local workdir is cleaned up


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_a_manifest_listing_a_path_outside_its_folder_is_refused_by_every_reader(settings, local_dir, tmp_path, path):
    """issue 24 item 1: read_manifest (every stage's reader) and fetch_dir refuse it, naming the entry."""
    loc = open_location(settings.run_uri("stage"), settings)
    commit(local_dir, loc)
    raw = json.loads(loc.read_text(MANIFEST))
    raw["files"].append({**raw["files"][0], "path": path})
    loc.write_text(MANIFEST, json.dumps(raw))
    with pytest.raises(IntegrityError, match=rf"MANIFEST.json is not a valid manifest, refused: files.2.path: path '{path}'"):
        read_manifest(loc)
    with pytest.raises(IntegrityError, match="refused"):
        fetch_stage(settings, loc.uri, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists() and not (tmp_path / "outside.bin").exists()


@pytest.mark.parametrize("damage", ["same-size-other-bytes", "truncated", "removed"])
@pytest.mark.fault('a damaged object under a valid manifest, then a re-run (skip re-verifies)')
def test_a_skip_rechecks_the_files_under_the_manifest_and_rewrites_damaged_ones(settings, caplog, damage):
    """Before, a committed manifest with the same inputs was skipped over whatever its files had become,
    so every later reader failed on the damaged file and every re-run skipped again."""
    uri = settings.run_uri("stage")
    with StageOutput(settings, "stage", uri, INPUTS) as out:
        (out.workdir / "a.jsonl").write_text('{"x": 1}\n')
        out.commit()
    loc = open_location(uri, settings)
    if damage == "removed":
        loc.delete("a.jsonl")
    else:
        loc.write_bytes("a.jsonl", b'{"x": 2}\n' if damage.startswith("same-size") else b'{"x"')
    with StageOutput(settings, "stage", uri, INPUTS) as again:
        assert again.skipped is None, "not skipped over a damaged file"
        (again.workdir / "a.jsonl").write_text('{"x": 1}\n')
        again.commit()
    assert "a.jsonl" in caplog.text and "running the stage again" in caplog.text
    assert read_verified(loc, "a.jsonl") == b'{"x": 1}\n'
    with StageOutput(settings, "stage", uri, INPUTS) as third:
        assert third.skipped is not None, "intact files: skipped as before"


@pytest.mark.fault('a damaged object under a valid manifest of a published run')
def test_a_damaged_file_of_a_published_run_is_exit_2_naming_it(settings):
    uri = settings.run_uri("stage")
    with StageOutput(settings, "stage", uri, INPUTS) as out:
        (out.workdir / "a.jsonl").write_text('{"x": 1}\n')
        out.commit()
    loc = open_location(uri, settings)
    open_location(settings.run_uri(), settings).write_text("PUBLISHED", "[]")
    loc.write_bytes("a.jsonl", b'{"x": 2}\n')
    with pytest.raises(IntegrityError, match=r"a\.jsonl \(sha256 .* manifest says .*published run") as caught:
        StageOutput(settings, "stage", uri, INPUTS).__enter__()
    assert caught.value.exit_code == 2


_READER = """
import sys
from pathlib import Path
from shared.core.job import run_main
from shared.core.settings import load_settings
from shared.store.artifacts import fetch_dir
from shared.store.storage import open_location
settings = load_settings()
sys.exit(run_main("reader", lambda: fetch_dir(open_location(sys.argv[1], settings), Path(sys.argv[2]))))
"""


@pytest.mark.fault('a reader racing a rewrite of its upstream')
def test_a_reader_overtaken_by_a_rewrite_of_its_upstream_exits_1_and_its_retry_reads_the_new_commit(settings, local_dir, tmp_path):
    """The reader read the manifest, then the upstream stage re-ran and rewrote its files before the reader
    downloaded them (the reader is held between the two by a failpoint). Before, that was exit 2,
    "corrupted", which fails a Job for good although its retry reads the new commit."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    loc = open_location(settings.run_uri("stage"), settings)
    commit(local_dir, loc)
    reader = subprocess.Popen([sys.executable, "-c", _READER, loc.uri, str(tmp_path / "got")], cwd=REPO, text=True,
                              env={**os.environ, "LAWTUNE_FAILPOINTS": "fetch:manifest-read"}, stderr=subprocess.PIPE)
    try:
        assert "failpoint fetch:manifest-read: stopped" in reader.stderr.readline()
        (local_dir / "a.jsonl").write_text('{"x": 2}\n')
        commit(local_dir, loc, inputs={**INPUTS, "config": "new"})
    finally:
        reader.send_signal(signal.SIGCONT)
    err = reader.communicate(timeout=120)[1].strip().splitlines()
    assert reader.returncode == 1, err
    assert err[-1].startswith("lawtune reader: error: ") and "changed while it was being read" in err[-1], err[-1]
    assert not (tmp_path / "got").exists()
    again = subprocess.run([sys.executable, "-c", _READER, loc.uri, str(tmp_path / "got")], cwd=REPO, text=True,
                           env=os.environ.copy(), capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "got" / "a.jsonl").read_text() == '{"x": 2}\n'


@pytest.mark.parametrize("full", ["scratch", "file-store"])
@pytest.mark.fault('disk full (ENOSPC): scratch, file:// store')
def test_disk_full_is_exit_2_naming_the_disk_not_a_retry(tmp_path, full):
    """preprocess with its scratch (LAWTUNE_CACHE_DIR), or the file:// store, on a 16 KiB tmpfs (mounted in
    a user and mount namespace of its own with unshare). Before, ENOSPC was "I/O failure, worth retrying",
    exit 1: a Job retried it on the same small volume until its backoffLimit."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    cache = tiny if full == "scratch" else tmp_path / "cache"
    root = tiny / "artifacts" if full == "file-store" else tmp_path / "artifacts"
    sample = REPO / "configs" / "data" / "legal_qa_sample.csv"
    env = {**os.environ, "LAWTUNE_CACHE_DIR": str(cache), "LAWTUNE_ARTIFACT_ROOT": f"file://{root}", "LAWTUNE_RUN_ID": "full"}
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                             f'mount -t tmpfs -o size=16k tmpfs "{tiny}" && exec "$0" -m jobs.preprocess --input "{sample}"',
                             sys.executable], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("lawtune preprocess: error: disk full (No space left on device): ") and f"{tiny}: " in last, last
    assert ("LAWTUNE_CACHE_DIR" if full == "scratch" else "LAWTUNE_ARTIFACT_ROOT") in last.split(f"{tiny}: ", 1)[1]
