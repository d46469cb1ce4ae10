"""Benchmark (not a test): FSDP2 LoRA training of a model larger than one GPU, and a resume after a kill.

    python3 tests/benchmarks/bench_fsdp.py --gpus 2 --tokenizer tok --out fsdp.md     # Qwen2.5-32B shape
    python3 tests/benchmarks/bench_fsdp.py --arch 72b --gpus 4 --tokenizer tok         # if the GPUs hold it
    python3 tests/benchmarks/bench_fsdp.py --gpus 1 --tokenizer tok                     # FSDP over one rank: the baseline
    python3 tests/benchmarks/bench_fsdp.py --tiny                                      # CPU smoke (gloo), numbers meaningless

What runs: ``torchrun --nproc-per-node N`` over this file's worker, which calls the finetune job's
own ``shared.train.training.train()`` with the job's fast-path hooks, ``training_args.distributed:
fsdp``, a checkpoint store on local disk, and a base-model folder that holds only a config
(Qwen2.5-32B's published hyperparameters) and a tokenizer. No weights exist for it, so the one
benchmark-only change is the weight source: ``shared.train.fsdp.SafetensorsRows`` is replaced by
``random_fill`` (N(0, 0.02) per shard, after ``fully_shard``): the model is built on the meta
device, sharded per decoder layer then at the root, and each rank allocates and fills only its
shards. Data: the legal Q&A CSV as chat examples, packed into micro-batches of ``--tokens`` per GPU.

Three runs, each a fresh torchrun:

1. ``whole``: ``--steps`` steps, a checkpoint (adapter + sharded optimizer) at half and at the end;
   tokens/s is the job's own ``tokens_per_s`` log (all ranks), median over the logging windows after
   the first; peak memory is each rank's ``torch.cuda.max_memory_allocated``;
2. ``killed``: the same, SIGKILLed (the whole torchrun group) once the half-way checkpoint is committed;
3. ``resumed``: the same again, resuming from that checkpoint to the end; its final adapter is
   compared with run 1's.

% of ceiling uses train_speed.py's definition: tokens/s over N x (measured bf16 matmul FLOP/s /
(4 x non-embedding parameters)).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Published hyperparameters (Qwen/Qwen2.5-32B-Instruct, Qwen/Qwen2.5-72B-Instruct config.json).
QWEN_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
QWEN_72B = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
ARCHS = {"32b": QWEN_32B, "72b": QWEN_72B, "tiny": TINY}


def config_dict(args) -> dict:
    return {
        "base_model": str(args.work / "model"), "seed": 42, "max_input_length": 512, "max_output_length": 512,
        "training_args": {
            "max_steps": args.steps, "save_steps": args.steps // 2, "eval_steps": args.steps // 2, "logging_steps": 1,
            "learning_rate": 2e-4, "lr_scheduler_type": "cosine", "warmup_steps": 1, "per_device_train_batch_size": 1,
            "per_device_eval_batch_size": 2, "tokens_per_batch": args.tokens, "packing": True, "fast_path": "on",
            "distributed": "fsdp", "fp8": "auto", "memory_profile": args.memory_profile, "bf16": True if args.tiny else None,
            "save_total_limit": 2, "dataloader_num_workers": 0,
        },
        "peft_config": {"r": args.r, "lora_alpha": 2 * args.r, "lora_dropout": 0.05, "target_modules": args.targets.split(",")},
    }


# --------------------------------------------------------------------------- setup (no GPU)


def build_inputs(args) -> None:
    from transformers import AutoTokenizer, Qwen2Config

    model = args.work / "model"
    model.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from tests.tiny import word_tokenizer

        tok = word_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(ARCHS[args.arch])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    Qwen2Config(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                **shape).save_pretrained(model)
    tok.save_pretrained(model)
    if args.tokenizer and (args.tokenizer / "chat_template.jinja").is_file():
        (model / "chat_template.jinja").write_text((args.tokenizer / "chat_template.jinja").read_text())
    data = args.work / "data"
    data.mkdir(exist_ok=True)
    rows = []
    with open(args.csv, encoding="utf-8") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            q = (r.get("question") or "").strip() or (r.get("title") or "").strip()
            a = (r.get("reply") or r.get("answer") or "").strip()
            if q and a:
                rows.append({"id": f"{i:016x}", "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    if args.tiny:  # the word tokenizer knows only a few words
        from tests.tiny import words_conversation

        rows = [words_conversation(i) for i in range(64)]
    dev, train = rows[:4], rows[4:]
    for name, part in (("train.jsonl", train), ("dev.jsonl", dev)):
        with open(data / name, "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (args.work / "config.json").write_text(json.dumps(config_dict(args)))


# --------------------------------------------------------------------------- the worker (one rank)


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from shared.core.config import parse_config
    from shared.core.log import configure_logging
    from shared.store.storage import FileLocation
    from shared.train import fsdp
    from shared.train import training
    from shared.train.fast.speedups import training_hooks

    configure_logging("INFO")
    (args.work / f"pid-{args.label}-{args.attempt}-{os.environ['RANK']}").write_text(str(os.getpid()))
    pause = float(os.environ.get("BENCH_STEP_SLEEP", "0"))
    if pause:  # --tiny: steps take milliseconds; slow them so the kill lands between two checkpoints
        step_end = training.LawtuneCallback.on_step_end

        def slow(self, *a, **kw):
            time.sleep(pause)
            return step_end(self, *a, **kw)

        training.LawtuneCallback.on_step_end = slow
    # The one benchmark-only change: no weights exist for this architecture, so every rank fills its
    # own shards at random after fully_shard instead of reading them from safetensors.
    fsdp.SafetensorsRows = lambda model_dir: fsdp.random_fill(std=0.02, seed=1234)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() == 1:
        # --gpus 1: the job would train one process plainly; here FSDP runs over one rank (the same
        # code path without the communication) as the per-GPU baseline for N GPUs.
        training.distributed_strategy = lambda config, model_dir, prec: "fsdp"
    cfg = parse_config(json.loads((args.work / "config.json").read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store = training.CheckpointStore(FileLocation(args.work / "runs" / args.label), {"bench": "fsdp"}, run_id="bench",
                                     code_version="bench")
    started = time.perf_counter()
    result = training.train(cfg, args.work / "model", args.work / "data", args.work / f"local-{args.label}-{args.attempt}",
                            store, training_hooks(cfg, device))
    wall = time.perf_counter() - started
    peak = torch.tensor([torch.cuda.max_memory_allocated() if device == "cuda" else 0,
                         torch.cuda.max_memory_reserved() if device == "cuda" else 0], dtype=torch.float64,
                        device=device)
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if result.is_main:
        tps = [h["tokens_per_s"] for h in result.log_history if "tokens_per_s" in h]
        out = {"run": args.label, "steps": result.steps_completed, "resumed_from": result.resumed_from, "wall_s": wall,
               "median_tps": statistics.median(tps[1:] or tps) if tps else None, "windows": len(tps),
               "losses": result.train_loss_curve, "dev": result.dev_loss_curve,
               "peak_gib": [[float(p[0]) / 2**30, float(p[1]) / 2**30] for p in peaks],
               "total_params": result.total_params, "trainable_params": result.trainable_params}
        (args.work / f"result-{args.label}-{args.attempt}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- driver


def torchrun(args, run: str, attempt: int, kill_after: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus), __file__,
           "--worker", "--work", str(args.work), "--label", run, "--attempt", str(attempt)]
    env = {**os.environ, "LAWTUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF", "expandable_segments:True"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = args.work / f"{run}-{attempt}.log"
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        if kill_after is not None:
            while not kill_after.is_file() and proc.poll() is None:
                time.sleep(0.2)
            if proc.poll() is None:
                # Every rank at once, as a lost node or the OOM killer would (torchrun starts its
                # workers in sessions of their own: each is killed by its pid), then torchrun.
                for pid_file in args.work.glob(f"pid-{run}-{attempt}-*"):
                    try:
                        os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.killpg(proc.pid, signal.SIGKILL)
                print(f"  killed after {kill_after.parent.name} was committed", flush=True)
        rc = proc.wait()
    if rc != 0 and kill_after is None:
        sys.stdout.write(log.read_text()[-8000:])
    return rc


def adapter(root: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")


def compare(a: dict, b: dict) -> str:
    """Relative L2 difference over all adapter tensors, and the largest absolute one."""
    import torch

    diff = torch.sqrt(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a)).item()
    norm = torch.sqrt(sum((a[k].float() ** 2).sum() for k in a)).item()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return f"relative L2 {diff / max(norm, 1e-30):.2e}, max |diff| {worst:.2e} ({len(a)} tensors)"


def ceiling_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from tests.benchmarks.train_speed import matmul_tflops

    return matmul_tflops()


def non_embedding_params(arch: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(Qwen2Config(**ARCHS[arch]))
    return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="32b")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tokens", type=int, default=4096, help="training_args.tokens_per_batch (per GPU)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj")
    p.add_argument("--memory-profile", action="store_true", help="recompute each decoder layer in backward")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json + chat template (no hub here)")
    p.add_argument("--csv", type=Path, default=ROOT / "configs" / "data" / "legal_qa_sample.csv")
    p.add_argument("--work", type=Path, default=Path("/tmp/lawtune-fsdp"))
    p.add_argument("--out", type=Path, help="write the markdown section here too")
    p.add_argument("--no-resume", action="store_true", help="only the throughput run")
    p.add_argument("--tiny", action="store_true", help="toy model on CPU (gloo), bf16, 4 steps: the plumbing only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="whole", help=argparse.SUPPRESS)
    p.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.tiny:
        args.arch, args.steps, args.tokens = "tiny", 4, 256
        os.environ["BENCH_STEP_SLEEP"] = "1"
    if args.tokenizer is None and not args.tiny:
        from shared.core.settings import load_settings
        from shared.train.models import BUNDLED_DEFAULT, resolve_base_model

        args.tokenizer = resolve_base_model(BUNDLED_DEFAULT, load_settings())
    import shutil

    import torch

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    build_inputs(args)
    tflops = ceiling_tflops()
    results = {}
    if torchrun(args, "whole", 0) != 0:
        return 1
    results["whole"] = json.loads((args.work / "result-whole-0.json").read_text())
    resume_line = "not run (--no-resume)"
    if not args.no_resume:
        half = args.steps // 2
        torchrun(args, "cut", 0, kill_after=args.work / "runs" / "cut" / "checkpoints" / f"step-{half}" / "MANIFEST.json")
        if (args.work / "runs" / "cut" / "checkpoints" / f"step-{args.steps}" / "MANIFEST.json").is_file():
            print("the kill came after the last checkpoint: nothing left to resume", flush=True)
            return 1
        if torchrun(args, "cut", 1) != 0:
            return 1
        results["resumed"] = json.loads((args.work / "result-cut-1.json").read_text())
        whole_root, cut_root = args.work / "runs" / "whole", args.work / "runs" / "cut"
        # The noise floor: two uninterrupted runs (whole, and cut before its kill) at the same step.
        # On a GPU they differ (atomics in the attention and norm backward kernels), and Adam turns
        # tiny gradient differences into update-sized ones for weights whose gradient is near zero.
        floor = compare(adapter(whole_root, half), adapter(cut_root, half))
        end = compare(adapter(whole_root, args.steps), adapter(cut_root, args.steps))
        ckpt = cut_root / "checkpoints" / f"step-{half}"
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        dev_whole = results["whole"]["dev"][-1][1] if results["whole"]["dev"] else None
        dev_resumed = results["resumed"]["dev"][-1][1] if results["resumed"]["dev"] else None
        resume_line = (f"killed (SIGKILL, all ranks) after step-{half} was committed; resumed from step "
                       f"{results['resumed']['resumed_from']} to {results['resumed']['steps']}. Adapter at step {args.steps}, "
                       f"resumed vs uninterrupted: {end}; noise floor, the two uninterrupted runs at step {half} (no resume "
                       f"involved): {floor}. Final dev loss {dev_whole:.4f} (uninterrupted) vs {dev_resumed:.4f} (resumed). "
                       f"Checkpoint {size / 2**20:.1f} MiB (adapter + sharded optimizer; the frozen base is not saved)")
    w = results["whole"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    params = non_embedding_params(args.arch)
    per_gpu_ceiling = tflops * 1e12 / (4 * params) if tflops else None
    pct = w["median_tps"] / (args.gpus * per_gpu_ceiling) if (per_gpu_ceiling and w["median_tps"]) else None
    cmd = f"python3 tests/benchmarks/bench_fsdp.py --arch {args.arch} --gpus {args.gpus} --steps {args.steps} --tokens {args.tokens}"
    lines = [
        f"### FSDP2 LoRA, Qwen2.5-{args.arch.upper()} architecture: {args.gpus}x {gpu}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}` (torch {torch.__version__}). Config-initialised, random weights filled per shard after "
        f"fully_shard; {w['total_params'] / 1e9:.1f}B parameters ({params / 1e9:.1f}B non-embedding), LoRA r{args.r} "
        f"{args.targets} ({w['trainable_params'] / 1e6:.1f}M trainable), packed micro-batches of {args.tokens} tokens per GPU, "
        f"{args.steps} steps, memory profile {'on' if args.memory_profile else 'off'}. Measured bf16 matmul (8192^3): "
        f"{tflops or 0:.0f} TFLOP/s; ceiling = N x that / (4 x non-embedding parameters) = "
        f"{(args.gpus * per_gpu_ceiling) if per_gpu_ceiling else 0:,.0f} tokens/s.",
        "",
        "| run | tokens/s (median of logging windows, all ranks) | % of bf16 ceiling | peak GiB per GPU (alloc / reserved) | wall s | first / last train loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        peaks = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in r["peak_gib"])
        losses = r["losses"]
        lines.append(f"| {name} | {r['median_tps'] or 0:,.0f} | {'–' if pct is None or name != 'whole' else f'{pct:.0%}'} | "
                     f"{peaks} | {r['wall_s']:.0f} | {losses[0][1]:.3f} / {losses[-1][1]:.3f} |")
    lines += ["", f"Resume: {resume_line}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
