"""``training_args.tokens_per_batch``: the largest token budget whose training step fits the card.

``auto`` runs real trial steps (forward + backward of one packed micro-batch of synthetic
tokens through the prepared model, the fast path and FP8 included) at growing budgets, then
bisects between the last that fit and the first that did not, on multiples of ``STEP``. A
budget fits when the step neither runs out of memory nor peaks above ``HEADROOM`` of the
memory that was free for this process (the optimizer's LoRA states and fragmentation need the
rest). The answer is cached per card, model config and training config in
``<cache_dir>/token-budgets.json``, so only the first run on a card pays for the search.

An explicit budget is checked the same way (one trial, or the cache): one that does not fit
is a configuration error (exit 2) naming the largest budget that does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from shared.core.errors import ConfigError

log = logging.getLogger(__name__)

STEP = 1024
START = 4096
CAP = 262_144
# One trial step from a clean state peaks lower than steady training does (optimizer state,
# allocator fragmentation, the evaluation pass): on an H200 a 7B budget whose trial peaked at 91%
# of free memory ran out of memory in training (docs/benchmarks.md), so keep a fifth back.
HEADROOM = 0.80
CACHE_FILE = "token-budgets.json"
_TRAINING_KEYS = ("fp8", "memory_profile", "gradient_checkpointing", "per_device_train_batch_size", "fast_path", "attn_implementation")


def largest_fitting(fits: Callable[[int], bool], *, start: int = START, step: int = STEP, cap: int = CAP) -> int | None:
    """Largest multiple of ``step`` in [step, cap] for which ``fits`` holds (monotone), None if none does."""
    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    n = max(step, start // step * step)
    while n <= cap:
        if fits(n):
            lo = n
            n *= 2
        else:
            hi = n
            break
    if hi is None:
        if lo == 0 or lo >= cap:
            return lo or None
        hi = cap + step  # everything up to cap was not tried above lo; bisect there
    if lo == 0:  # even the start failed: search below it
        hi_units, lo_units = hi // step, 0
    else:
        lo_units, hi_units = lo // step, hi // step
    while hi_units - lo_units > 1:
        mid = (lo_units + hi_units) // 2
        if fits(mid * step):
            lo_units = mid
        else:
            hi_units = mid
    return lo_units * step or None


def cache_key(model: torch.nn.Module, config: Any, card: str, total_bytes: int) -> str:
    model_cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    training = {k: getattr(config.training_args, k, None) for k in _TRAINING_KEYS}
    blob = {
        "card": card, "memory": total_bytes, "torch": torch.__version__, "model": model_cfg, "training": training,
        "peft": config.peft_config.model_dump(mode="json"), "lengths": [config.max_input_length, config.max_output_length],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn or foreign file only costs a new search


def _write_cache(path: Path | None, key: str, value: dict[str, Any]) -> None:
    if path is None:
        return
    data = _read_cache(path)
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def synthetic_batch(tokens: int, example_len: int, vocab: int) -> dict[str, torch.Tensor]:
    """One packed micro-batch of ``tokens`` tokens in examples of ``example_len`` (the job's batch layout)."""
    from shared.train.packing import PackedCollator

    gen = torch.Generator().manual_seed(0)
    examples, left = [], tokens
    while left > 0:
        n = min(example_len, left)
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": ids})
        left -= n
    return PackedCollator()(examples)


def trial_step(model: torch.nn.Module, tokens: int, example_len: int) -> tuple[bool, int]:
    """Forward + backward of one micro-batch of ``tokens`` tokens: (fits, peak bytes)."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    free, _ = torch.cuda.mem_get_info(device)
    limit = HEADROOM * (free + torch.cuda.memory_reserved(device))
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in synthetic_batch(tokens, example_len, vocab).items()}
    torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.train()
    try:
        out = model(**batch)
        out.loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        ok = peak <= limit
    except torch.OutOfMemoryError:
        ok, peak = False, -1
    finally:
        model.zero_grad(set_to_none=True)
        del batch
        out = None
        model.train(was_training)
        torch.cuda.empty_cache()
    log.info("token budget trial: %d tokens %s (peak %.1f GiB, limit %.1f GiB)", tokens, "fits" if ok else "does NOT fit",
             max(peak, 0) / 2**30, limit / 2**30)
    return ok, peak


def resolve_token_budget(model: torch.nn.Module, config: Any, cache_dir: Path | None) -> int | None:
    """The micro-batch token budget to train with on this card (``None``: the config has none).

    ``auto`` searches (or reads the cache); an explicit budget is checked and refused with the
    largest that fits when it does not. Off CUDA nothing can be measured: ``auto`` becomes
    ``START`` tokens and an explicit budget is taken as given.
    """
    wanted = config.training_args.tokens_per_batch
    if wanted is None:
        return None
    if not torch.cuda.is_available() or not _on_cuda(model):
        if wanted == "auto":
            log.info("tokens_per_batch: auto on CPU: %d tokens (nothing to measure)", START)
            return START
        return wanted
    props = torch.cuda.get_device_properties(next(model.parameters()).device)
    card = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    example_len = config.max_input_length + config.max_output_length
    key = cache_key(model, config, props.name, props.total_memory)
    path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cached = _read_cache(path).get(key, {}).get("largest")

    def search() -> int:
        largest = largest_fitting(lambda n: trial_step(model, n, example_len)[0])
        if largest is None:
            raise ConfigError(f"training_args.tokens_per_batch: not even {STEP} tokens per micro-batch fit {card}; "
                              "use a smaller model, fp8: on, or memory_profile: true")
        _write_cache(path, key, {"largest": largest, "card": card})
        return largest

    if wanted == "auto":
        budget = cached if cached is not None else search()
        budget = _agree(budget)
        log.info("tokens_per_batch: auto -> %d tokens per micro-batch on %s%s", budget, card, " (cached)" if cached else "")
        return budget
    if (cached is not None and wanted <= cached) or trial_step(model, wanted, example_len)[0]:
        return wanted
    largest = cached if cached is not None else search()
    raise ConfigError(f"training_args.tokens_per_batch: {wanted} does not fit {card}: the largest budget whose "
                      f"training step fits is {largest} (set it, or tokens_per_batch: auto)")


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _agree(budget: int) -> int:
    """Every DDP rank trains with the same budget: the smallest any rank found."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return budget
    t = torch.tensor([budget], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rows_per_item(budget: int, batch_size: int) -> int:
    return max(1, math.floor(budget / batch_size))
