"""Merge a LoRA adapter into its base model, checked before anything is written.

Two ways, one result. ``merge_adapter`` takes the sharded one (shared/publish/sharded_merge.py:
shard by shard, peak memory about three shards + the adapter: 10.7 GiB on a 7B) whenever the base is safetensors
and the adapter is plain LoRA, and falls back to the in-memory one otherwise (or when
``method="memory"``). Models small enough (``LOGIT_CHECK_MAX_BYTES``) also get the logit check
below after a sharded merge; larger ones get the per-weight forward check only.

In memory: the base is loaded in float32 (never a quantised base: merging into rounded weights bakes
the rounding in), the adapter is attached with peft, and ``merge_and_unload`` folds it into
the weights. Before saving, the merged model's logits on a few chat prompts must match
base+adapter's within ``LOGIT_ATOL`` (or ``LOGIT_RTOL`` of the largest logit); after saving, the model is loaded back from disk and
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
from shared.publish.sharded_merge import MergeCheckError  # noqa: F401 - raised by both merges, imported from here

log = logging.getLogger(__name__)

# Largest |merged - (base+adapter)| logit difference accepted. In float32 the merge only
# reorders additions (observed ~1e-4 on the bundled model); a wrong merge is off by >0.1.
# Rounding grows with the adapter's size, so the bound also scales with the largest logit:
# a trained adapter (r=4, alpha=8, 60 layers on the sample) was seen at 5e-3 in both the
# in-memory and the sharded merge, the same number, so it was rounding, not a wrong merge.
LOGIT_ATOL = 1e-3
LOGIT_RTOL = 5e-4
# Saving in a half dtype rounds each weight; the reloaded check then allows this much.
HALF_LOGIT_ATOL = 0.5
# Below this many bytes of base weights the sharded merge also runs the full-model logit check
# (it loads base+adapter and the merged model: fine for small models, not for a 7B in a small pod).
LOGIT_CHECK_MAX_BYTES = 2 * 1024**3
CHECK_PROMPTS = (
    "What is a contract?",
    "劳动合同到期后，公司不续签需要支付经济补偿吗？",
    "Explain the statute of limitations in one sentence.",
)


@dataclass
class MergeResult:
    max_abs_diff: float | None  # logits, float32 (sharded: the reloaded model; None when too large to load)
    saved_max_abs_diff: float | None  # reloaded from disk, in the saved dtype (None: not loaded, see above)
    saved_dtype: str
    files: list[str]
    method: str = "memory"  # "sharded" or "memory"
    max_forward_rel_err: float | None = None  # sharded: worst per-weight LoRA forward check


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


def _float32_tolerance(expected) -> float:
    return max(LOGIT_ATOL, LOGIT_RTOL * expected.abs().max().item())


def _logits(model, ids, mask):
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    return out * mask.unsqueeze(-1)  # padded positions carry no meaning


def _empty_output(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise LawtuneError(f"{out_dir} is not empty; the merged model needs a folder of its own")


def _copy_remote_code(base_dir: Path, out_dir: Path) -> None:
    for code in sorted(base_dir.glob("*.py")):
        if not (out_dir / code.name).exists():
            shutil.copy2(code, out_dir / code.name)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, max_shard_size: str = "2GB",
                  trust_remote_code: bool = False, method: str = "auto") -> MergeResult:
    """Write the merged model into ``out_dir`` (absent or empty) after checking it.

    ``method``: "auto" (sharded when supported), "sharded" (refuse otherwise) or "memory".
    Either way the published weights come in files of at most ``max_shard_size``.
    With ``trust_remote_code`` the base repository's own ``*.py`` files are copied beside the
    merged weights, so the folder loads (and vLLM serves it) the way the base model did."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from shared.publish.sharded_merge import unsupported_reason

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

    if method != "memory":
        reason = unsupported_reason(base_dir, adapter_dir)
        if reason is None:
            return _merge_sharded(base_dir, adapter_dir, out_dir, config, tokenizer, save_dtype, ids, mask, remote,
                                  max_shard_size)
        if method == "sharded":
            raise ConfigError(f"sharded merge of {adapter_dir} into {base_dir} is not possible: {reason}")
        log.warning("merging in memory (the whole model in RAM): %s", reason)
    return _merge_in_memory(base_dir, adapter_dir, out_dir, tokenizer, save_dtype, ids, mask, max_shard_size, remote)


def _merge_sharded(base_dir, adapter_dir, out_dir, config, tokenizer, save_dtype, ids, mask, remote,
                   max_shard_size) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from shared.publish.sharded_merge import base_shards, merge_shards

    _empty_output(out_dir)
    result = merge_shards(base_dir, adapter_dir, out_dir, save_dtype, max_shard_size)
    log.info("sharded merge: %d weights merged in %d shard(s); worst forward check %.1e (tolerance from %s)",
             result.merged, len(result.shards), result.max_forward_rel_err, "shared/publish/sharded_merge.py")
    config.dtype = save_dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out_dir)
    if remote["trust_remote_code"]:
        _copy_remote_code(base_dir, out_dir)

    diff = None
    size = sum((base_dir / s).stat().st_size for s in result.shards)
    if size <= LOGIT_CHECK_MAX_BYTES:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **remote).eval()
        expected = _logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids, mask)
        del base
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **remote).eval()
        diff = (_logits(reloaded, ids, mask) - expected).abs().max().item()
        del reloaded
        gc.collect()
        tolerance = _float32_tolerance(expected) if save_dtype == torch.float32 else HALF_LOGIT_ATOL
        log.info("merge check (reloaded %s): max |Δlogit| = %.2e (tolerance %.1e)", save_dtype, diff, tolerance)
        if not diff <= tolerance:
            raise MergeCheckError(f"saved merged model's logits differ from base+adapter by {diff:.3g} (> {tolerance})")
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return MergeResult(diff, diff, str(save_dtype).removeprefix("torch."), files, "sharded", result.max_forward_rel_err)


def _merge_in_memory(base_dir, adapter_dir, out_dir, tokenizer, save_dtype, ids, mask, max_shard_size, remote) -> MergeResult:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **remote).eval()
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    expected = _logits(peft_model, ids, mask)
    merged = peft_model.merge_and_unload()
    diff = (_logits(merged, ids, mask) - expected).abs().max().item()
    bound = _float32_tolerance(expected)
    log.info("merge check (float32, in memory): max |Δlogit| = %.2e (tolerance %.1e)", diff, bound)
    if not diff <= bound:
        raise MergeCheckError(f"merged model's logits differ from base+adapter by {diff:.3g} (> {bound:.3g}); nothing was written")

    _empty_output(out_dir)
    merged.to(save_dtype).save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file() and merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)
    if remote["trust_remote_code"]:
        _copy_remote_code(base_dir, out_dir)
    del merged, peft_model, model
    gc.collect()

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **remote).eval()
    saved_diff = (_logits(reloaded, ids, mask) - expected).abs().max().item()
    tolerance = bound if save_dtype == torch.float32 else HALF_LOGIT_ATOL
    log.info("merge check (reloaded %s): max |Δlogit| = %.2e (tolerance %.1e)", save_dtype, saved_diff, tolerance)
    if not saved_diff <= tolerance:
        raise MergeCheckError(f"saved merged model's logits differ from base+adapter by {saved_diff:.3g} (> {tolerance})")
    del reloaded
    gc.collect()
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return MergeResult(diff, saved_diff, str(save_dtype).removeprefix("torch."), files)
