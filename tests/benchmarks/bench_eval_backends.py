"""Benchmark (not a test): evaluate's generation backends on the bundled model, CPU.

    .venv/bin/python tests/benchmarks/bench_eval_backends.py             # print the table
    .venv/bin/python tests/benchmarks/bench_eval_backends.py --record    # ... and append it to docs/benchmarks.md
    .venv/bin/python tests/benchmarks/bench_eval_backends.py --prompts 16 --tokens 64

Baseline: shared.evaluate.generation's transformers backend (batched ``generate``, left padding,
peft adapter attached after the base pass). Contender: its vLLM backend (one in-process
``vllm.LLM``, the adapter through a ``LoRARequest``). Each runs in its own process on the same
prompts (legal questions, greedy, float32) with the same random-B LoRA adapter; the table
gives wall time including model load, the generation part alone, and how far the two
backends' metrics are apart (the tolerance shared.evaluate.generation.BACKEND_TOLERANCE states).
This is what decides that ``backend: auto`` picks transformers on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [
    "劳动合同到期，公司不续签要给补偿吗？", "借款合同没有约定利息怎么办？", "交通事故对方全责但不赔钱怎么办？",
    "离婚时房产怎么分割？", "试用期被辞退有赔偿吗？", "租房押金房东不退怎么办？", "欠款不还可以起诉吗？",
    "公司拖欠工资怎么维权？", "What is a contract?", "How long is the statute of limitations for debts?",
    "遗嘱需要公证才有效吗？", "网购买到假货怎么索赔？", "加班费怎么计算？", "父母去世后房产怎么继承？",
    "邻居噪音扰民怎么处理？", "工伤认定需要哪些材料？",
]

WORKER = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from shared.core.config import GenerationConfig
from shared.evaluate.generation import generate_answers
args = json.loads(sys.argv[2])
turns = [[{"role": "user", "content": q}] for q in args["questions"]]
started = time.perf_counter()
answers = generate_answers(Path(args["model"]), Path(args["adapter"]), turns, GenerationConfig(max_new_tokens=args["tokens"]),
                           backend=args["backend"], batch_size=8)
total = time.perf_counter() - started
print(json.dumps({"total_s": total, "base": answers.base, "tuned": answers.tuned, "backend": answers.backend}))
"""


def _run(backend: str, model: Path, adapter: Path, questions: list[str], tokens: int) -> dict:
    args = json.dumps({"model": str(model), "adapter": str(adapter), "questions": questions, "tokens": tokens, "backend": backend})
    env = {**os.environ, "LAWTUNE_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, str(REPO), args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ["HF_HUB_OFFLINE"] = "1"
    from shared.evaluate.metrics import METRICS, evaluate
    from shared.train.models import BUNDLED_DEFAULT, resolve_base_model
    from shared.core.settings import Settings
    from tests.lora_fixtures import make_adapter

    model = resolve_base_model(BUNDLED_DEFAULT, Settings())
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model, Path(tmp) / "adapter", std=0.2)
        load = os.getloadavg()[0]
        hf = _run("transformers", model, adapter, questions, args.tokens)
        vl = _run("vllm", model, adapter, questions, args.tokens)
    refs = questions  # agreement only: both backends are scored against the same strings
    worst = max(abs(evaluate(hf[s], refs)[0][m] - evaluate(vl[s], refs)[0][m]) for s in ("base", "tuned") for m in METRICS)
    same = sum(a == b for s in ("base", "tuned") for a, b in zip(hf[s], vl[s]))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {platform.machine()} CPU, {os.cpu_count()} cores, load average {load:.1f} at start, {when}",
        "",
        f"`{Path(__file__).relative_to(REPO)} --prompts {args.prompts} --tokens {args.tokens}`: bundled SmolLM2-135M, float32,"
        f" greedy, {args.prompts} prompts x {args.tokens} new tokens, base and tuned (LoRA r=8 on q/v).",
        "",
        "| backend | wall time incl. load (s) | x baseline | identical answers | max metric gap (points) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| transformers (baseline) | {hf['total_s']:.1f} | 1.00 | - | - |",
        f"| vLLM in-process + LoRARequest | {vl['total_s']:.1f} | {hf['total_s'] / vl['total_s']:.2f} |"
        f" {same}/{2 * len(questions)} | {worst:.2f} |",
        "",
    ]
    print("\n".join(lines))
    if args.record:
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as fh:
            fh.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
