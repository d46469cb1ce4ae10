"""Merge a LoRA adapter into its base shard by shard, never holding the whole model.

For each safetensors shard of the base: read it tensor by tensor, add ``scale * B @ A`` to the
weights the adapter targets (in float32, then rounded to the stored dtype once, as the
in-memory merge does), write the shard under the same name. Peak memory is about one input
shard (mapped) + one output shard + the adapter, whatever the model's size, so publish fits a
small pod. Every merged weight is checked against LoRA's own forward on random inputs before
its shard is written: ``x W'^T == x W^T + scale (x A^T) B^T`` (the formula peft trains with,
not the one this module merges with), so a transposed, mis-scaled or misplaced delta fails.

Adapters this module does not handle (DoRA, embedding LoRA, ``alpha_pattern``, saved
``modules_to_save``, LoRA biases, targets missing from the shards) are reported by
``unsupported_reason`` and publish falls back to the in-memory merge.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import LawtuneError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# |x W'^T - (x W^T + s (x A^T) B^T)| / |x W^T + s (x A^T) B^T| in float32: rounding is ~1e-6;
# a wrong delta is off by its whole size.
FORWARD_RTOL = 1e-4
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class MergeCheckError(LawtuneError):
    """The merged model does not reproduce base+adapter: publishing it would ship the wrong model."""


@dataclass
class LoraPair:
    a: "object"  # torch.Tensor [r, in]
    b: "object"  # torch.Tensor [out, r]
    scale: float
    fan_in_fan_out: bool

    def delta(self):
        d = self.b.float() @ self.a.float() * self.scale
        return d.T if self.fan_in_fan_out else d


@dataclass
class ShardedMergeResult:
    merged: int  # weights that received a delta
    max_forward_rel_err: float
    shards: list[str]


def base_shards(base_dir: Path) -> list[str] | None:
    """The base's safetensors files in order, or None when it has none (a .bin checkpoint)."""
    if (base_dir / INDEX).is_file():
        weight_map = json.loads((base_dir / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (base_dir / SINGLE).is_file():
        return [SINGLE]
    return None


def load_lora(adapter_dir: Path) -> dict[str, LoraPair]:
    """``{base weight name: LoraPair}``; raises ValueError naming what this merge cannot do."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type {cfg.get('peft_type')}")
    for key in ("use_dora", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"{key}={cfg[key]!r}")
    weights = load_file(adapter_dir / ADAPTER_WEIGHTS)
    halves: dict[str, dict[str, object]] = {}
    for key, tensor in weights.items():
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"adapter tensor {key} is not a LoRA A/B weight")
        halves.setdefault(m["module"], {})[m["ab"]] = tensor
    alpha = cfg.get("lora_alpha", 8)
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module} has lora_{''.join(ab)} only")
        r = ab["A"].shape[0]  # the rank, also under rank_pattern
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        pairs[f"{module}.weight"] = LoraPair(ab["A"], ab["B"], scale, bool(cfg.get("fan_in_fan_out")))
    return pairs


def unsupported_reason(base_dir: Path, adapter_dir: Path) -> str | None:
    """Why this base/adapter pair needs the in-memory merge; None when the sharded merge applies."""
    from safetensors import safe_open

    shards = base_shards(base_dir)
    if shards is None:
        return "the base has no safetensors weights"
    try:
        pairs = load_lora(adapter_dir)
    except ValueError as exc:
        return f"adapter: {exc}"
    present = set()
    for shard in shards:
        with safe_open(base_dir / shard, framework="pt") as f:
            present.update(f.keys())
    missing = sorted(set(pairs) - present)
    if missing:  # e.g. LoRA on a tied lm_head that the files do not store
        return f"adapter targets weights the base files lack: {', '.join(missing[:3])}"
    return None


def _forward_error(base, merged, pair: LoraPair) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, base.shape[1], generator=gen)
    w = base.float()
    a, b = pair.a.float(), pair.b.float()
    if pair.fan_in_fan_out:  # the module computes x @ W, and W is stored [in, out]
        x = torch.randn(4, base.shape[0], generator=gen)
        ref = x @ w + pair.scale * (x @ a.T) @ b.T
        got = x @ merged
    else:
        ref = x @ w.T + pair.scale * (x @ a.T) @ b.T
        got = x @ merged.T
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def merge_shards(base_dir: Path, adapter_dir: Path, out_dir: Path, save_dtype, max_shard_size: int | str = "2GB") -> ShardedMergeResult:
    """Write every merged shard (and the index) into ``out_dir``; nothing else.

    Base shards are read one at a time; output shards hold at most ``max_shard_size`` bytes
    (transformers' naming and index), so the published layout does not depend on how the base
    happened to be sharded, and peak memory stays one base shard plus one output shard."""
    import gc

    import torch
    from safetensors import safe_open
    from transformers.utils.hub import convert_file_size_to_int

    limit = convert_file_size_to_int(max_shard_size)
    pairs = load_lora(adapter_dir)
    shards = base_shards(base_dir) or []
    writer = _ShardWriter(out_dir, limit)
    done, worst = set(), 0.0
    for shard in shards:
        with safe_open(base_dir / shard, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                pair = pairs.get(key)
                if pair is not None:
                    merged = tensor.float() + pair.delta()
                    err = _forward_error(tensor, merged, pair)
                    worst = max(worst, err)
                    if not err <= FORWARD_RTOL:
                        raise MergeCheckError(f"merged {key} does not reproduce base+adapter (relative error {err:.3g} > "
                                              f"{FORWARD_RTOL}); nothing was published")
                    tensor = merged
                    done.add(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(save_dtype)
                writer.add(key, tensor.contiguous())
        gc.collect()
        log.info("merged shard %s", shard)
    if done != set(pairs):
        raise MergeCheckError(f"adapter weights never merged: {', '.join(sorted(set(pairs) - done)[:3])}")
    writer.finish()
    return ShardedMergeResult(len(done), worst, shards)


class _ShardWriter:
    """Tensors in, safetensors files of at most ``limit`` bytes out, named and indexed as
    transformers' ``save_pretrained`` does (one file: ``model.safetensors``, no index)."""

    def __init__(self, out_dir: Path, limit: int):
        self.out_dir, self.limit = out_dir, limit
        self.pending: dict = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
        self.total = 0

    def add(self, key: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f".part-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(self.out_dir / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            (self.out_dir / self.written[0][0]).rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for number, (name, keys) in enumerate(self.written, 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.out_dir / name).rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(keys, final))
        (self.out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
