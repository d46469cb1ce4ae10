"""Merge a LoRA adapter into its base model, checked before anything is written.

The base is loaded in float32 (never a quantised base: merging into rounded weights bakes
the rounding in), the adapter is attached with peft, and ``merge_and_unload`` folds it into
the weights. Before saving, the merged model's logits on a few chat prompts must match
base+adapter's within ``LOGIT_ATOL``; after saving, the model is loaded back from disk and
checked again (in the saved dtype), so what gets published is what was checked. The saved
folder holds sharded safetensors, the tokenizer with its chat template and the generation
config: everything transformers and vLLM need, nothing else.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import ConfigError, LawtuneError

log = logging.getLogger(__name__)

# Largest |merged - (base+adapter)| logit difference accepted. In float32 the merge only
# reorders additions (observed ~1e-5 on the bundled model); a wrong merge is off by >0.1.
LOGIT_ATOL = 1e-3
# Saving in a half dtype rounds each weight; the reloaded check then allows this much.
HALF_LOGIT_ATOL = 0.5
CHECK_PROMPTS = (
    "What is a contract?",
    "劳动合同到期后，公司不续签需要支付经济补偿吗？",
    "Explain the statute of limitations in one sentence.",
)


class MergeCheckError(LawtuneError):
    """The merged model does not reproduce base+adapter: publishing it would ship the wrong model."""


@dataclass
class MergeResult:
    max_abs_diff: float  # in memory, float32
    saved_max_abs_diff: float  # reloaded from disk, in the saved dtype
    saved_dtype: str
    files: list[str]


def _check_full_precision(config, ref: str) -> None:
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        raise ConfigError(
            f"base model {ref} is quantised ({method}); merging into a quantised base is refused. "
            "Give publish the full-precision base (the one fine-tuning used in full precision)"
        )


def _prompt_batch(tokenizer):
    import torch

    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in CHECK_PROMPTS]
    rows = [r[0] if r and isinstance(r[0], list) else list(r) for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _logits(model, ids, mask):
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    return out * mask.unsqueeze(-1)  # padded positions carry no meaning


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, max_shard_size: str = "2GB",
                  trust_remote_code: bool = False) -> MergeResult:
    """Write the merged model into ``out_dir`` (absent or empty) after checking it.

    With ``trust_remote_code`` the base repository's own ``*.py`` files are copied beside the
    merged weights, so the folder loads (and vLLM serves it) the way the base model did."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    remote = {"trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(base_dir, **remote)
    _check_full_precision(config, str(base_dir))
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    save_dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(base_dir, **remote)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"base model {base_dir} has no chat template; serving needs one")
    ids, mask = _prompt_batch(tokenizer)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **remote).eval()
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    expected = _logits(peft_model, ids, mask)
    merged = peft_model.merge_and_unload()
    diff = (_logits(merged, ids, mask) - expected).abs().max().item()
    log.info("merge check (float32, in memory): max |Δlogit| = %.2e (tolerance %.0e)", diff, LOGIT_ATOL)
    if not diff <= LOGIT_ATOL:
        raise MergeCheckError(f"merged model's logits differ from base+adapter by {diff:.3g} (> {LOGIT_ATOL}); nothing was written")

    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise LawtuneError(f"{out_dir} is not empty; the merged model needs a folder of its own")
    merged.to(save_dtype).save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file() and merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)
    if trust_remote_code:
        for code in sorted(base_dir.glob("*.py")):
            if not (out_dir / code.name).exists():
                shutil.copy2(code, out_dir / code.name)
    del merged, peft_model, model
    gc.collect()

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **remote).eval()
    saved_diff = (_logits(reloaded, ids, mask) - expected).abs().max().item()
    tolerance = LOGIT_ATOL if save_dtype == torch.float32 else HALF_LOGIT_ATOL
    log.info("merge check (reloaded %s): max |Δlogit| = %.2e (tolerance %.0e)", save_dtype, saved_diff, tolerance)
    if not saved_diff <= tolerance:
        raise MergeCheckError(f"saved merged model's logits differ from base+adapter by {saved_diff:.3g} (> {tolerance})")
    del reloaded
    gc.collect()
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return MergeResult(diff, saved_diff, str(save_dtype).removeprefix("torch."), files)
