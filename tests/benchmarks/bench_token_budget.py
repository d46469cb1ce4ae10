"""Benchmark (not a test): what ``tokens_per_batch: auto`` picks on this GPU, and what it costs.

    python3 tests/benchmarks/bench_token_budget.py [--archs 1.5B,7B]

For each config-initialised Qwen2.5 architecture: LoRA r8 on q/k/v, the fast path with FP8
frozen weights (the 7B job's default), then ``resolve_token_budget`` with ``auto`` (trial
steps; the search's wall time), again (the cached answer), and an explicit budget of twice the
answer (must be refused with exit-2's message).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from shared.core.config import parse_config
    from shared.core.errors import ConfigError
    from shared.train.fast.budget import resolve_token_budget
    from shared.train.fast.speedups import enable_fast_path
    from tests.benchmarks.train_speed import ARCHS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="1.5B,7B")
    args = p.parse_args()
    rows = []
    for arch in args.archs.split(","):
        cfg = parse_config({"max_input_length": 512, "max_output_length": 512,
                            "training_args": {"fast_path": "on", "fp8": "on", "tokens_per_batch": "auto"},
                            "peft_config": {"r": 8, "target_modules": ["q_proj", "v_proj", "k_proj"]}})
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**ARCHS[arch]), dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
        enable_fast_path(model.get_base_model(), fp8=True)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            auto = resolve_token_budget(model, cfg, Path(cache))
            search = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = resolve_token_budget(model, cfg, Path(cache))
            cached = time.perf_counter() - t0
            big = parse_config({**cfg.model_dump(mode="json"), "training_args": {**cfg.training_args.model_dump(mode="json"),
                                                                                "tokens_per_batch": 2 * auto}})
            try:
                resolve_token_budget(model, big, Path(cache))
                refused = "NOT refused"
            except ConfigError as exc:
                refused = str(exc)
        print(f"AUTO_{arch}={auto}", flush=True)
        rows.append(f"| {arch} | {auto:,} | {search:.0f} | {cached:.3f} | {again == auto} | {refused} |")
        del model
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), torch {torch.__version__}")
    print("| model | auto budget (tokens) | search s | cached s | same again | explicit 2x auto |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
