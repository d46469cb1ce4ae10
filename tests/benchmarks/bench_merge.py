"""Benchmark (not a test): publish's sharded merge vs the in-memory merge on a 7B-architecture base.

    python3 tests/benchmarks/bench_merge.py [--tokenizer DIR] --work /tmp/merge-bench [--out part.md]

Builds a Qwen2.5-7B-shaped base (random bf16 weights, written straight to ~4 GB safetensors
shards as the published checkpoint is laid out) and a LoRA adapter (r=16 on q/k/v/o, random
A and B), then runs ``shared.publish.merge.merge_adapter`` once per method in its own child
process and reports that child's wall time and peak RSS (``wait4``'s ru_maxrss). CPU only;
the in-memory path needs ~2x the float32 model in RAM, so run it where that exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_base(tokenizer: Path, base: Path, shape: dict, shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base.mkdir(parents=True)
    groups, current, size = [], [], 0
    for key, shp in shapes.items():
        n = 2 * int(torch.tensor(shp).prod())
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    groups.append(current)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(base)
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, base / f.name)


def build_adapter(adapter: Path, shape: dict, r: int = 16) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    h, kv = shape["hidden_size"], shape["num_key_value_heads"] * shape["hidden_size"] // shape["num_attention_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for t in TARGETS:
            d_in, d_out = dims[t]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.01
    adapter.mkdir(parents=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM").save_pretrained(adapter)


def one(method: str, base: Path, adapter: Path, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from shared.publish.merge import merge_adapter

    r = merge_adapter(base, adapter, out, method=method)
    print(json.dumps({"method": r.method, "logit_diff": r.saved_max_abs_diff, "forward_rel_err": r.max_forward_rel_err,
                      "dtype": r.saved_dtype, "files": len(r.files)}), flush=True)


def measure(method: str, base: Path, adapter: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--one", method, str(base), str(adapter), str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    text = proc.stdout.read()
    if status != 0:
        raise SystemExit(f"{method} merge failed ({status}):\n{text[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return {**result, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 1024**2, "out_gib": out_bytes / 1024**3}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with tokenizer files and a chat template (default: the bundled model's)")
    p.add_argument("--work", type=Path, default=Path("/tmp/merge-bench"))
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--methods", default="sharded,memory")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same width: checks the plumbing")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    shape = {**QWEN_7B, "num_hidden_layers": 2, "vocab_size": 50000} if args.tiny else QWEN_7B
    if args.tokenizer is None:
        from shared.core.settings import load_settings
        from shared.train.models import BUNDLED_DEFAULT, resolve_base_model

        args.tokenizer = resolve_base_model(BUNDLED_DEFAULT, load_settings())
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    build_base(args.tokenizer, args.work / "base", shape, int(args.shard_gb * 1e9))
    build_adapter(args.work / "adapter", shape)
    shards = sorted((args.work / "base").glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards) / 1024**3
    total = sum(f.stat().st_size for f in shards) / 1024**3
    print(f"base built in {time.perf_counter() - t0:.0f}s: {len(shards)} shards, {total:.1f} GiB, largest {largest:.2f} GiB", flush=True)
    rows = []
    for m in args.methods.split(","):
        rows.append(measure(m, args.work / "base", args.work / "adapter", args.work / f"out-{m}", args.threads))
        print(json.dumps(rows[-1]), flush=True)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### Merge: {'tiny 2-layer' if args.tiny else 'Qwen2.5-7B'}-architecture base, {when}", "",
             f"Command: `python3 tests/benchmarks/bench_merge.py --shard-gb {args.shard_gb} --threads {args.threads}` "
             f"({os.cpu_count()} CPUs visible, {args.threads} threads per merge; base: {len(shards)} bf16 shards, {total:.1f} GiB, "
             f"largest {largest:.2f} GiB; adapter r=16 on q/k/v/o). Peak RSS of the merging process (ru_maxrss).", "",
             "| method | wall s | peak RSS GiB | peak / largest shard | check | output GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        check = (f"forward rel err {r['forward_rel_err']:.1e}" if r["forward_rel_err"] is not None else "") + \
                (f"; logits {r['logit_diff']:.2e}" if r["logit_diff"] is not None else "")
        lines.append(f"| {r['method']} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.1f} | {r['peak_rss_gib'] / largest:.1f}x | {check} | {r['out_gib']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
