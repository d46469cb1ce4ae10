"""Can vLLM serve this LoRA adapter on this base? Decided at publish, not discovered at serving time.

    facts = check_adapter(adapter_dir, base_dir, max_lora_rank=16, where="s3://b/runs/r1/finetune/adapter")

The rules are vLLM 0.32's own (``vllm/lora/peft_helper.py`` ``validate_legal``,
``vllm/lora/lora_model.py``), read from files only, so the publish image needs no vLLM:

- features vLLM does not implement: ``modules_to_save`` (full copies of modules, e.g. a trained
  ``lm_head``), DoRA, LoRA bias, PiSSA/OLoRA-style inits that rewrite the base, aLoRA, layer
  replication, BD-LoRA, QALoRA, a ``bias`` other than ``none``;
- a rank (``r`` or any ``rank_pattern`` entry) above the server's ``--max-lora-rank``;
- embedding or head weights: LoRA on ``embed_tokens``/``lm_head``, trainable token rows, or
  full module weights in the tensors (vLLM serves only LoRA deltas on linear layers);
- a base mismatch: a LoRA pair whose module the base lacks, or whose shapes do not fit it.

Every problem is reported at once, in one ``ConfigError`` (exit 2) naming the adapter file.
tests/shared/publish/test_adapter_check.py checks each rule against vLLM's own validator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Inits that only set the starting weights (vLLM's PEFTHelper._init_is_supported); the others rewrite the base.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output_layer")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<side>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass
class AdapterFacts:
    """What serving needs to know about a checked adapter (recorded in the version's manifest)."""

    r: int
    max_rank: int
    lora_alpha: float
    target_modules: list[str] | str
    modules: int  # adapted modules (LoRA A/B pairs)
    base_model_name_or_path: str | None = None

    def as_dict(self) -> dict:
        return {"r": self.r, "max_rank": self.max_rank, "lora_alpha": self.lora_alpha,
                "target_modules": self.target_modules, "modules": self.modules}


def feature_problems(config: dict, max_lora_rank: int) -> list[str]:
    """What vLLM refuses in ``adapter_config.json`` alone (its PEFTHelper.validate_legal)."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r}: only LoRA adapters are served")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r}: full copies of modules are not LoRA weights "
                        "(vLLM serves only LoRA deltas; train without modules_to_save)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{key}=true: vLLM does not implement {what}")
    for key, what in (("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA (BD-LoRA)")):
        if config.get(key):
            problems.append(f"{key} is set: vLLM does not implement {what}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r}: this init rewrites the base model's weights, which a shared base cannot serve")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM serves adapters with bias='none' only")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices is set: trained embedding rows are embedding weights, which vLLM does not load")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    embedding_targets = sorted(t for t in targets if t.rsplit(".", 1)[-1] in _EMBEDDING_MODULES)
    if embedding_targets:
        problems.append(f"target_modules {embedding_targets}: LoRA on embedding or head layers is not served (linear layers only)")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} is above the server's max_lora_rank {max_lora_rank} "
                        "(publish.max_lora_rank, the serving chart's adapters.maxLoraRank)")
    return problems


def _tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Names and shapes from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = list(fh.get_slice(name).get_shape())
    return shapes


def tensor_problems(adapter: dict[str, list[int]], base: dict[str, list[int]]) -> tuple[list[str], int]:
    """Embedding/head or full weights in the adapter, and LoRA pairs that do not fit the base."""
    problems: list[str] = []
    pairs: dict[str, dict[str, list[int]]] = {}
    strays = []
    for name, shape in sorted(adapter.items()):
        match = _LORA_KEY.match(name)
        if "lora_embedding" in name or "trainable_tokens" in name or any(f".{m}." in f".{name}" for m in _EMBEDDING_MODULES):
            strays.append(name)
        elif match is None:
            strays.append(name)
        else:
            pairs.setdefault(match["module"], {})[match["side"]] = shape
    if strays:
        shown = ", ".join(strays[:4]) + (f" and {len(strays) - 4} more" if len(strays) > 4 else "")
        problems.append(f"embedding, head or full module weights in the tensors ({shown}): vLLM loads LoRA A/B pairs of "
                        "linear layers only")
    misfits = []
    for module, sides in sorted(pairs.items()):
        a, b = sides.get("lora_A"), sides.get("lora_B")
        base_shape = base.get(f"{module}.weight")
        if a is None or b is None:
            misfits.append(f"{module}: lora_{'A' if a is None else 'B'} is missing")
        elif base_shape is None:
            misfits.append(f"{module}: the base has no {module}.weight")
        elif len(base_shape) != 2 or [b[0], a[1]] != base_shape:
            misfits.append(f"{module}: LoRA {b[0]}x{a[1]} does not fit the base weight {'x'.join(map(str, base_shape))}")
    if misfits:
        shown = "; ".join(misfits[:3]) + (f"; and {len(misfits) - 3} more" if len(misfits) > 3 else "")
        problems.append(f"base mismatch: {shown} (the adapter was trained on another base model)")
    if not pairs and not strays:
        problems.append("no LoRA weights in the tensors")
    return problems, len(pairs)


def check_adapter(adapter_dir: Path, base_dir: Path, *, max_lora_rank: int, where: str | None = None) -> AdapterFacts:
    """The adapter's facts, or one ConfigError listing everything vLLM would refuse."""
    where = where or str(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}/{ADAPTER_CONFIG}: unreadable adapter config ({exc})") from None
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{where}/{ADAPTER_WEIGHTS} is missing: vLLM loads adapters saved as safetensors")
    problems = feature_problems(config, max_lora_rank)
    base_files = sorted(base_dir.glob("*.safetensors"))
    if not base_files:
        raise ConfigError(f"{base_dir} has no safetensors weights to check the adapter against")
    more, modules = tensor_problems(_tensor_shapes([weights]), _tensor_shapes(base_files))
    problems += more
    if problems:
        raise ConfigError(f"{where}: vLLM cannot serve this adapter: " + "; ".join(problems))
    ranks = [int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())]
    return AdapterFacts(r=int(config["r"]), max_rank=max(ranks), lora_alpha=config.get("lora_alpha", config["r"]),
                        target_modules=config.get("target_modules") or [], modules=modules,
                        base_model_name_or_path=config.get("base_model_name_or_path"))
