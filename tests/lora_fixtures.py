"""Builders for evaluate/publish tests: a tiny chat model, LoRA adapters, committed upstream artifacts.

The adapters are made with peft directly, laid out exactly as finetune's contract says
(``adapter/``, ``training_summary.json``, ``metrics.jsonl``, ``config.yaml``, manifest extra
``{"base_model", "best_step"}``), so these tests do not depend on a training run. Their
``lora_B`` is random instead of zero, so the tuned model really differs from the base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shared.store.artifacts import Manifest, commit_dir, now_iso
from shared.data.conversation import dumps, to_record
from shared.core.settings import Settings
from shared.store.storage import open_location

# Resumed vs uninterrupted adapter, fp32 CPU, one bound for every resume test (test_finetune, test_fsdp,
# the kill tests; docs/finetune.md and docs/reliability.md quote it). Usually bit-equal (0.0); a CI run of
# 2026-11-29 saw 2.8e-5 after a resume at step 3 (step 4's grad norm 0.818 vs 0.817: float noise,
# bit-equal on the next run), so 1e-5 flakes. A real resume error moves a LoRA weight by a whole Adam
# step, about the learning rate (3e-3 in tests/faults/pipeline.py): a repeated or skipped step, or another
# dropout mask, is 30x above this bound.
RESUME_TOLERANCE = 1e-4

QA = [
    ("劳动合同到期，公司不续签要给补偿吗？", "一般情况下，劳动合同期满用人单位不续签的，应当支付经济补偿。"),
    ("借款合同没有约定利息怎么办？", "借款合同对支付利息没有约定的，视为没有利息。"),
    ("What is a contract?", "A contract is a legally binding agreement between parties."),
]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def records(qa=QA) -> list[dict]:
    return [to_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in qa]


def make_tiny_model(tokenizer_src: Path, out: Path) -> Path:
    """A config-initialised 2-layer Llama with the bundled tokenizer and chat template (loads in <1 s)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, out / name)
    return out


def make_adapter(model_dir: Path, out: Path, *, seed: int = 0, r: int = 8, std: float = 0.02) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std)
    peft_model.save_pretrained(out)
    return out


def commit_data(settings: Settings, uri: str, rows: list[dict], scratch: Path) -> Manifest:
    folder = scratch / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        (folder / f"{split}.jsonl").write_text("".join(dumps(r) + "\n" for r in rows), encoding="utf-8")
    return commit_dir(folder, open_location(uri, settings), stage="data", inputs={"rows": len(rows)}, started_at=now_iso())


def commit_finetune(settings: Settings, uri: str, model_dir: Path, base_ref: str, scratch: Path, *, seed: int = 0,
                    std: float = 0.02, r: int = 8, extra: dict | None = None) -> Manifest:
    """``extra``: more of finetune's manifest extra (e.g. ``base_model_digest``)."""
    folder = scratch / "finetune"
    make_adapter(model_dir, folder / "adapter", seed=seed, std=std, r=r)
    summary = {
        "best_step": 4, "best_dev_loss": 2.25, "tokens_seen": 1234, "base_model": base_ref, "steps_completed": 6,
        "train_loss_curve": [[1, 3.1], [2, 2.9], [3, 2.6], [4, 2.4], [5, 2.3], [6, 2.2]],
        "dev_loss_curve": [[2, 2.8], [4, 2.25], [6, 2.3]],
    }
    (folder / "training_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in summary["train_loss_curve"]))
    (folder / "config.yaml").write_text(f"base_model: {base_ref}\n", encoding="utf-8")
    return commit_dir(folder, open_location(uri, settings), stage="finetune", inputs={"seed": seed, "run": settings.run_id},
                      started_at=now_iso(), extra={"base_model": base_ref, "best_step": 4, **(extra or {})})


_UNSET = object()


def commit_verdict(settings: Settings, uri: str, passed: bool, scratch: Path, finetune_digest: str, *,
                   compared_with=_UNSET) -> Manifest:
    """An evaluate artifact of the finetune artifact ``finetune_digest`` names, holding only a gate verdict.

    ``compared_with``: the PROMOTED version evaluate scored as production (None: there was none).
    """
    folder = scratch / f"evaluate-{passed}"
    folder.mkdir(parents=True, exist_ok=True)
    gate = {"passed": passed, "reasons": [f"{'ok' if passed else 'FAIL'} rouge-l: set by the test"], "checks": []}
    if compared_with is not _UNSET:
        gate["promoted"] = compared_with
    (folder / "metrics.json").write_text(json.dumps({"gate": gate}), encoding="utf-8")
    return commit_dir(folder, open_location(uri, settings), stage="evaluate", inputs={"finetune": finetune_digest, "passed": passed},
                      started_at=now_iso(), extra={"gate": gate})
