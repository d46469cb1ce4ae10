"""Does a published folder carry its adapter at the adapter's own scale?

A LoRA merge adds ``s * B @ A`` to each target weight, with ``s = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` under rsLoRA). A merge that reads the scale wrong (the classic bugs:
alpha taken as the scale, rsLoRA ignored, a rank_pattern rank used for another module) ships a
model that answers differently from the one evaluated, and its own checks, built on the same
wrong number, cannot see it. This audit reads the published weights, the base weights and the
adapter straight from their safetensors files and fits ``merged - base = s_eff * (B @ A)`` for a
few target weights: ``s_eff`` must equal the scale the adapter's config gives (within
``SCALE_RTOL``, which covers a bf16 published copy's rounding).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SCALE_RTOL = 0.02
_SAMPLE = 4  # target weights audited (the first, spread over the model)


@dataclass
class AuditResult:
    passed: bool
    expected_scale: float
    checked: list[dict]  # {"weight", "scale"}
    message: str


def _weight_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _tensor(files: dict[str, Path], key: str):
    from safetensors import safe_open

    with safe_open(files[key], framework="pt") as f:
        return f.get_tensor(key)


def audit(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> AuditResult | None:
    """None when the adapter is not a plain LoRA on safetensors weights (nothing this audit can fit)."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or not (adapter_dir / "adapter_model.safetensors").is_file():
        return None
    base_files, merged_files = _weight_files(base_dir), _weight_files(merged_dir)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")) and key.startswith("base_model.model."):
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            halves.setdefault(module, {})[key[-8]] = tensor  # "A" or "B"
    targets = sorted(m for m, ab in halves.items() if set(ab) == {"A", "B"} and f"{m}.weight" in base_files
                     and f"{m}.weight" in merged_files)
    if not targets:
        return None
    picked = [targets[round(i * (len(targets) - 1) / max(_SAMPLE - 1, 1))] for i in range(min(_SAMPLE, len(targets)))]
    checked, worst = [], None
    for module in dict.fromkeys(picked):
        a, b = halves[module]["A"].float(), halves[module]["B"].float()
        r = a.shape[0]
        expected = cfg.get("lora_alpha", 8) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        product = b @ a
        if cfg.get("fan_in_fan_out"):
            product = product.T
        delta = _tensor(merged_files, f"{module}.weight").float() - _tensor(base_files, f"{module}.weight").float()
        norm = float((product * product).sum())
        if norm == 0.0:
            continue  # a zero adapter (B still at its init) carries no scale to fit
        scale = float((delta * product).sum()) / norm
        # The fit's own uncertainty: what is left after the fit (rounding of a bf16 copy, noise) over the
        # adapter's size. A tiny adapter under bf16 rounding cannot tell scales apart: not judged.
        residual = float(((delta - scale * product) ** 2).mean().sqrt())
        if residual / math.sqrt(norm) > SCALE_RTOL / 3 * expected:
            continue
        checked.append({"weight": f"{module}.weight", "scale": round(scale, 6), "expected": expected})
        if worst is None or abs(scale / expected - 1) > abs(worst["scale"] / worst["expected"] - 1):
            worst = checked[-1]
    if worst is None:
        return AuditResult(True, 0.0, [], "merge audit: the adapter's deltas are too small against rounding to fit a scale")
    ok = abs(worst["scale"] / worst["expected"] - 1) <= SCALE_RTOL
    rank = "lora_alpha/sqrt(r)" if cfg.get("use_rslora") else "lora_alpha/r"
    message = (f"merge audit: {len(checked)} weight(s) carry the adapter at its scale {worst['expected']:g} ({rank})" if ok else
               f"merge: {worst['weight']} carries the adapter at scale {worst['scale']:.4g}, but the adapter's {rank} = "
               f"{cfg.get('lora_alpha')}/{'sqrt(' if cfg.get('use_rslora') else ''}{halves[worst['weight'][:-7]]['A'].shape[0]}"
               f"{')' if cfg.get('use_rslora') else ''} gives {worst['expected']:g}: a merge with the wrong LoRA scale")
    return AuditResult(ok, worst["expected"], checked, message)
