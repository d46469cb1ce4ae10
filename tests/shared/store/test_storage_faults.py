"""Storage faults between the stages and a real SeaweedFS: retries absorb what they should,
the rest is exit 1 with one line and no manifest, and a re-run completes.

The faults come from tests/faultproxy.py (an asyncio TCP proxy on loopback in front of the
session's SeaweedFS): 503 SlowDown and 500 answers, connections reset mid-upload and
mid-download, a server that stalls past the read timeout. The last test stops SeaweedFS
itself in the middle of a stage's commit and starts it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from shared.core.errors import StorageError
from shared.core.settings import Settings
from shared.store.artifacts import MANIFEST, commit_dir, fetch_dir, now_iso, read_manifest
from shared.store.storage import MULTIPART_CHUNK, open_location
from tests.conftest import REPO
from tests.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def proxy(seaweedfs):
    host, port = seaweedfs.endpoint.removeprefix("http://").split(":")
    p = FaultProxy(host, int(port)).start()
    yield p
    p.stop()


@pytest.fixture
def faulty(proxy, seaweedfs, s3_bucket, tmp_path, monkeypatch):
    """Settings whose S3 endpoint is the proxy: 4 attempts per call, a 1 s read timeout."""
    proxy.clear()
    proxy.log.clear()
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    env = {"LAWTUNE_ARTIFACT_ROOT": f"s3://{s3_bucket}/lawtune", "LAWTUNE_S3_ENDPOINT_URL": proxy.endpoint,
           "LAWTUNE_S3_MAX_ATTEMPTS": "4", "LAWTUNE_S3_READ_TIMEOUT": str(READ_TIMEOUT), "LAWTUNE_S3_CONNECT_TIMEOUT": "2",
           "LAWTUNE_RUN_ID": f"r{uuid.uuid4().hex[:8]}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield Settings(), env
    proxy.clear()


BLOB = os.urandom(300_000)  # several TCP reads: a reset after 1 KiB lands mid-body


@pytest.mark.parametrize("fault, op", [
    pytest.param(Fault("503", method="PUT", times=3), "put", id="503-slowdown-on-put"),
    pytest.param(Fault("500", method="GET", times=3), "get", id="500-on-get"),
    pytest.param(Fault("reset-upload", method="PUT", times=2, after=4096), "upload", id="reset-mid-upload"),
    # botocore retries a call only until its headers arrive; the body re-read is storage.py's.
    pytest.param(Fault("reset-download", method="GET", times=2, after=2048), "get", id="reset-mid-download-read"),
    pytest.param(Fault("reset-download", method="GET", times=2, after=2048), "download", id="reset-mid-download-file"),
    pytest.param(Fault("stall", method="GET", times=1, seconds=READ_TIMEOUT + 1.5), "get", id="stall-past-read-timeout"),
])
@pytest.mark.fault('S3 faults retries absorb: 503 SlowDown, 500, resets mid-upload/-download, a stall')
def test_transient_faults_are_absorbed_by_retries(faulty, proxy, tmp_path, fault, op):
    settings, _ = faulty
    loc = open_location(settings.run_uri("blob"), settings)
    src = tmp_path / "blob.bin"
    src.write_bytes(BLOB)
    if op in ("get", "download"):
        loc.write_bytes("blob.bin", BLOB)
    proxy.add(fault)
    if op == "put":
        loc.write_bytes("blob.bin", BLOB)
    elif op == "upload":
        loc.upload_file(src, "blob.bin")
    elif op == "download":
        loc.download_file("blob.bin", tmp_path / "got.bin")
        assert (tmp_path / "got.bin").read_bytes() == BLOB
    got = loc.read_bytes("blob.bin")
    assert got == BLOB
    assert proxy.hits(fault.kind) == fault.times, proxy.log


def _stage(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", "--input", str(SAMPLE), *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("fault", [
    pytest.param(Fault("503", method="PUT", path_contains="train.jsonl", times=10**6), id="slowdown-never-ends"),
    pytest.param(Fault("stall", method="PUT", path_contains="train.jsonl", times=10**6, seconds=READ_TIMEOUT + 1), id="stalls-every-time"),
    pytest.param(Fault("reset-upload", method="PUT", path_contains="train.jsonl", times=10**6, after=512), id="resets-every-time"),
])
@pytest.mark.fault("S3 faults retries cannot absorb, on a stage's commit: exit 1, no manifest, re-run completes")
def test_a_fault_retries_cannot_absorb_is_exit_1_one_line_no_manifest_and_a_rerun_completes(faulty, proxy, fault):
    settings, env = faulty
    proxy.add(fault)
    failed = _stage(env)
    assert failed.returncode == 1, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("lawtune preprocess: error: S3 ") and "train.jsonl" in last, last
    assert proxy.hits(fault.kind) >= 4, "every one of the 4 attempts was made"
    out = open_location(settings.run_uri("data"), settings)
    assert not out.exists(MANIFEST), "never a manifest over an incomplete artifact"

    proxy.clear()
    again = _stage(env)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = read_manifest(out)
    assert {f.path for f in manifest.files} >= {"train.jsonl", "dev.jsonl", "test.jsonl"}
    assert not out.exists(".lawtune-lease"), "the writer lease is released"


@pytest.mark.fault('SeaweedFS SIGKILLed mid-commit, started again')
def test_seaweedfs_stopped_mid_commit_then_started_again(tmp_path, monkeypatch):
    """Its own SeaweedFS (the session's keeps serving other tests): killed while a stage's upload
    is held in flight by the proxy, so the commit is half done; the stage exits 1, no manifest;
    the store comes back on the same ports and data, the re-run completes and verifies."""
    from tests.servers import start_seaweedfs

    server = start_seaweedfs(tmp_path / "seaweedfs-restart")
    host, port = server.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    try:
        server.client().create_bucket(Bucket="restart")
        env = {**server.env(), "LAWTUNE_ARTIFACT_ROOT": "s3://restart/lawtune", "LAWTUNE_S3_ENDPOINT_URL": proxy.endpoint,
               "LAWTUNE_S3_MAX_ATTEMPTS": "3", "LAWTUNE_S3_CONNECT_TIMEOUT": "2", "LAWTUNE_RUN_ID": "restart",
               "LAWTUNE_CACHE_DIR": str(tmp_path / "cache")}
        # Hold the upload of one split for 4 s: the other files are already stored when the store dies.
        proxy.add(Fault("stall", method="PUT", path_contains="train.jsonl", seconds=4))
        proc = subprocess.Popen([sys.executable, "-m", "jobs.preprocess", "--input", str(SAMPLE)], cwd=REPO,
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proxy.hits("stall") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.hits("stall") == 1, "the commit reached the held upload"
        server.stop()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr[-2000:]
        assert stderr.strip().splitlines()[-1].startswith("lawtune preprocess: error: S3 ")

        server.restart()
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        out = open_location(settings.run_uri("data"), settings)
        assert not out.exists(MANIFEST)
        again = subprocess.run([sys.executable, "-m", "jobs.preprocess", "--input", str(SAMPLE)], cwd=REPO,
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        fetch_dir(out, tmp_path / "fetched")  # every file verified against the new manifest
        report = json.loads((tmp_path / "fetched" / "report.json").read_text())
        assert report["kept"] > 0
    finally:
        proxy.stop()
        server.stop()


@pytest.mark.fault('S3 lost inside commit_dir')
def test_a_lost_s3_store_never_yields_a_manifest_from_commit_dir(faulty, proxy, tmp_path):
    """commit_dir writes the manifest last: when an upload fails for good, no manifest exists."""
    settings, _ = faulty
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.bin").write_bytes(os.urandom(1000))
    proxy.add(Fault("500", method="PUT", path_contains="f1.bin", times=10**6))
    loc = open_location(settings.run_uri("x"), settings)
    with pytest.raises(StorageError, match="f1.bin"):
        commit_dir(folder, loc, stage="x", inputs={}, started_at=now_iso())
    assert not loc.exists(MANIFEST)


BIG = os.urandom(MULTIPART_CHUNK + 1024 * 1024)  # 9 MiB: above the 8 MiB threshold, so 2 parts / 2 ranged GETs


@pytest.mark.parametrize("fault, op", [
    pytest.param(Fault("reset-upload", method="PUT", path_contains="partNumber=2", times=2, after=65536), "upload",
                 id="reset-mid-part-2-of-a-multipart-upload"),
    pytest.param(Fault("503", method="POST", path_contains="uploadId=", times=2), "upload", id="503-on-complete-multipart"),
    pytest.param(Fault("reset-download", method="GET", header_contains="Range: bytes=8388608-", times=2, after=65536),
                 "download", id="reset-mid-second-ranged-get"),
    pytest.param(Fault("reset-download", method="GET", times=2, after=65536), "sha256", id="reset-mid-streamed-hash"),
])
@pytest.mark.fault('faults on a multipart upload, a ranged GET, a streamed hash (9 MiB object)')
def test_faults_above_the_multipart_threshold_are_absorbed(faulty, proxy, tmp_path, fault, op):
    settings, _ = faulty
    loc = open_location(settings.run_uri("big"), settings)
    src = tmp_path / "big.bin"
    src.write_bytes(BIG)
    if op != "upload":
        loc.upload_file(src, "big.bin")
    proxy.add(fault)
    if op == "upload":
        loc.upload_file(src, "big.bin")
        assert any("partNumber=2" in target for _, target, _ in proxy.log), "it went up as a multipart upload"
    elif op == "download":
        loc.download_file("big.bin", tmp_path / "got.bin")
        assert (tmp_path / "got.bin").read_bytes() == BIG
    else:
        assert loc.sha256("big.bin") == hashlib.sha256(BIG).hexdigest()
    assert proxy.hits(fault.kind) == fault.times, proxy.log
    assert loc.read_bytes("big.bin") == BIG
    uploads = loc._client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.prefix).get("Uploads", [])
    assert not uploads, "no unfinished multipart upload left"


@pytest.mark.fault('a multipart upload failing for good')
def test_a_multipart_upload_that_fails_for_good_leaves_no_upload_after_the_next_writer(faulty, proxy, tmp_path):
    """Part 2 refused on every attempt: the stage's commit fails with no manifest; whatever multipart upload
    the failure left is aborted by the next writer of the folder (StageOutput's sweep), whose commit lands."""
    from shared.store.stage import StageOutput

    settings, _ = faulty
    uri = settings.run_uri("big")
    proxy.add(Fault("500", method="PUT", path_contains="partNumber=2", times=10**6))
    with pytest.raises(StorageError, match="big.bin"):
        with StageOutput(settings, "big", uri, {"x": 1}) as out:
            (out.workdir / "big.bin").write_bytes(BIG)
            out.commit()
    loc = open_location(uri, settings)
    assert not loc.exists(MANIFEST)
    proxy.clear()
    with StageOutput(settings, "big", uri, {"x": 1}) as out:
        (out.workdir / "big.bin").write_bytes(BIG)
        out.commit()
    assert read_manifest(loc).file("big.bin").size == len(BIG) and loc.read_bytes("big.bin") == BIG
    assert not loc._client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.prefix).get("Uploads", [])


@pytest.fixture
def pooled(seaweedfs, s3_bucket, monkeypatch):
    """S3 through a keep-alive proxy: botocore pools its connections as it does against a real store."""
    host, port = seaweedfs.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port), keep_alive=True).start()
    for key, value in {**seaweedfs.env(), "LAWTUNE_S3_ENDPOINT_URL": proxy.endpoint, "LAWTUNE_S3_MAX_ATTEMPTS": "4",
                       "LAWTUNE_S3_READ_TIMEOUT": str(READ_TIMEOUT), "LAWTUNE_ARTIFACT_ROOT": f"s3://{s3_bucket}/lawtune"}.items():
        monkeypatch.setenv(key, value)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("how", ["reset", "blackhole"])
@pytest.mark.fault('stale pooled S3 connections (reset, blackholed)')
def test_stale_pooled_connections_are_replaced_without_an_error(pooled, tmp_path, how):
    """Before, the proxy closed every connection after one request, so a pooled connection was never reused
    in a test. ``reset``: the store or a load balancer dropped the idle connections (RST); ``blackhole``: a
    NAT forgot them, so bytes sent on them vanish and only the read timeout tells (then botocore's retry)."""
    settings = Settings()
    loc = open_location(settings.run_uri("pool"), settings)
    for i in range(3):
        loc.write_bytes(f"f{i}", BLOB)
    assert loc.read_bytes("f0") == BLOB
    before = pooled.connections
    assert before <= 2, f"{before} connections for 4 sequential requests: not pooled"
    assert pooled.drop_connections(how) >= 1
    loc.write_bytes("after", BLOB)  # goes out on a stale pooled connection first
    assert loc.read_bytes("after") == BLOB and loc.read_bytes("f2") == BLOB
    assert pooled.connections > before, "a new connection replaced the stale one"


@pytest.mark.fault('403 expired credentials mid-commit')
def test_403_expired_credentials_mid_run_is_exit_1_naming_the_credentials_and_the_retry_completes(faulty, proxy):
    """The store refuses the credentials half-way through a commit (403 ExpiredToken): botocore does not
    retry a 403, so the stage ends at once with one line saying what to check, no manifest; the Job's
    retry (fresh credentials) completes."""
    settings, env = faulty
    proxy.add(Fault("403", method="PUT", path_contains="train.jsonl", times=10**6))
    failed = _stage(env)
    assert failed.returncode == 1, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("lawtune preprocess: error: S3 ") and "ExpiredToken" in last and "credentials" in last, last
    out = open_location(settings.run_uri("data"), settings)
    assert not out.exists(MANIFEST)
    proxy.clear()
    again = _stage(env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {f.path for f in read_manifest(out).files} >= {"train.jsonl", "dev.jsonl", "test.jsonl"}
