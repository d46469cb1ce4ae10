"""LoRA supervised fine-tuning through transformers' Trainer, with store-backed checkpoints.

The parts, each replaceable on its own (the GPU speed-ups plug in through ``Hooks``):

- ``precision(cfg)``: bf16 on a GPU that has it, fp32 on CPU.
- ``prepare_model(model_dir, config, prec)``: base model + peft LoRA adapter.
- ``make_collator(config, tokenizer, prec)``: padded batches, or padding-free packing
  (``DataCollatorWithFlattening``: one row, ``position_ids`` restarting per example, so the
  attention stays within each example and the first label of each is masked).
- ``make_loss(config)``: ``None`` = the model's own token-mean cross-entropy (correct under
  gradient accumulation through ``num_items_in_batch``).

``train()`` runs one code path for one process or ``torchrun`` with ``WORLD_SIZE>1`` (DDP):
every rank trains, rank 0 alone talks to the artifact store. ``LawtuneCallback`` adds what
the Trainer lacks: a dev loss at every checkpoint, each checkpoint committed to the store
(manifest last), SIGTERM → checkpoint + exit for a retry, early stopping with patience, and
a progress bar + log line per logging event. ``CheckpointStore`` finds the newest committed
checkpoint of the same inputs to resume from and the one with the lowest dev loss to export.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from shared.store.artifacts import MANIFEST, Manifest, commit_dir, fetch_dir, find_manifest, now_iso
from shared.core.config import TrainConfig
from shared.core.errors import ConfigError, DataError, LawtuneError
from shared.store.storage import Location
from shared.train.tokenization import ChatEncoder, TokenizationReport, audit_end_labels, load_split

if TYPE_CHECKING:
    from shared.store.stage import StageOutput

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


class Preempted(LawtuneError):
    """SIGTERM arrived; a checkpoint was committed and the Job should retry (exit 1)."""


# --- the replaceable parts -----------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    device: str  # "cuda" or "cpu"
    bf16: bool

    @property
    def dtype(self):
        return torch.bfloat16 if self.bf16 else torch.float32


def precision(config: TrainConfig) -> Precision:
    args = config.training_args
    cuda = torch.cuda.is_available() and not args.use_cpu
    bf16 = args.bf16 if args.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    return Precision("cuda" if cuda else "cpu", bf16)


def prepare_model(model_dir: Path, config: TrainConfig, prec: Precision):
    """The base model with a fresh LoRA adapter; trainable parameters logged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.train.models import lora_targets

    sharded = distributed_strategy(config, model_dir, prec) == "fsdp"
    if sharded:
        from shared.train import fsdp

        # Never whole on one device: built on the meta device, each rank then reads its own shards.
        model = fsdp.meta_model(model_dir, prec.dtype, trust_remote_code=config.trust_remote_code,
                                attn_implementation=config.training_args.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=prec.dtype, attn_implementation=config.training_args.attn_implementation,
            trust_remote_code=config.trust_remote_code,
        )
    model.config.use_cache = False  # the KV cache is for generation; training only wastes memory on it
    peft = config.peft_config
    lora = LoraConfig(
        r=peft.r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=peft.lora_dropout,
        target_modules=lora_targets(model, peft),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"peft_config.target_modules {peft.target_modules!r}: {exc}".splitlines()[0]) from None
    if sharded:
        model = fsdp.build_sharded(model, device=_local_device(prec), dtype=prec.dtype,
                                   fill=fsdp.SafetensorsRows(model_dir), seed=config.training_seed)
    trainable, total = model.get_nb_trainable_parameters()
    if os.environ.get("RANK", "0") == "0":
        log.info("trainable params: %s || all params: %s || %.4f%%", _human(trainable), _human(total), 100 * trainable / total)
    return model


_STRATEGY: dict[tuple, str] = {}


def distributed_strategy(config: TrainConfig, model_dir: Path, prec: Precision) -> str:
    """``single``, ``ddp`` or ``fsdp`` (``training_args.distributed``; the rule in shared/train/fsdp.py)."""
    from shared.train import fsdp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    key = (str(model_dir), config.training_args.distributed, world, prec.device, config.trust_remote_code)
    if key not in _STRATEGY:
        _STRATEGY[key] = fsdp.strategy(config, Path(model_dir), world, prec.device)
    return _STRATEGY[key]


def _local_device(prec: Precision) -> torch.device:
    if prec.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def make_collator(config: TrainConfig, tokenizer, prec: Precision):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if config.training_args.packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    # Multiples of 8 keep tensor cores busy on GPU; on CPU they only add padding.
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8 if prec.device == "cuda" else None
    )


def make_loss(config: TrainConfig) -> Callable | None:
    return None


@dataclass
class Hooks:
    """What a speed-up may replace; defaults are the plain functions above."""

    prepare_model: Callable = prepare_model
    make_collator: Callable = make_collator
    make_loss: Callable = make_loss
    # (train rows, config) -> the train dataset Trainer iterates (e.g. packed rows of a token budget)
    prepare_train_dataset: Callable | None = None


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --- checkpoints in the artifact store -----------------------------------------------------


class CheckpointStore:
    """``<finetune>/checkpoints/step-<N>/``, each a committed folder; only rank 0 writes.

    ``guard`` runs before every write or delete: the stage's lease check, so a writer whose
    folder another process took over (a pod that was presumed dead) stops at its next
    checkpoint instead of mixing files into the new writer's checkpoints or pruning them.
    """

    def __init__(self, location: Location, inputs: dict[str, Any], *, run_id: str | None, code_version: str | None,
                 guard: Callable[[], None] = lambda: None):
        self.location = location
        self.root = location.child(CHECKPOINTS)
        self.inputs = inputs
        self.run_id = run_id
        self.code_version = code_version
        self.guard = guard

    @classmethod
    def of(cls, out: "StageOutput") -> "CheckpointStore":
        """The checkpoints of a finetune stage's output, guarded by its lease."""
        return cls(out.location, out.inputs, run_id=out.settings.run_id, code_version=out.settings.resolved_code_version,
                   guard=out.check_lease)

    def committed(self) -> dict[int, Manifest]:
        """Committed checkpoints of these inputs, by step; folders without a manifest are invisible."""
        from shared.store.artifacts import digest_inputs

        steps = sorted({int(p.split("/")[0][5:]) for p in self.root.list_files() if p.startswith("step-") and p.split("/")[0][5:].isdigit()})
        want = digest_inputs(self.inputs)
        found = {}
        for step in steps:
            manifest = find_manifest(self.root.child(f"step-{step}"))
            if manifest is not None and manifest.inputs_digest == want:
                found[step] = manifest
        return found

    def discard_foreign(self) -> None:
        """Checkpoints of other inputs (an edited config, new data, other code) must not be resumed."""
        mine = set(self.committed())
        self.guard()
        for rel in self.root.list_files():
            name = rel.split("/")[0]
            if name.startswith("step-") and name[5:].isdigit() and int(name[5:]) not in mine:
                self.root.delete(rel)

    def commit(self, local: Path, step: int, extra: dict[str, Any]) -> Manifest:
        self.guard()
        return commit_dir(
            local,
            self.root.child(f"step-{step}"),
            stage="finetune-checkpoint",
            inputs=self.inputs,
            started_at=now_iso(),
            run_id=self.run_id,
            code_version=self.code_version,
            extra={"step": step, **extra},
            guard=self.guard,  # again before the checkpoint's manifest, after its uploads
        )

    def fetch(self, step: int, target: Path, only: list[str] | None = None) -> Manifest:
        return fetch_dir(self.root.child(f"step-{step}"), target, only=only)

    def best(self) -> int | None:
        """Step with the lowest dev loss (earliest on ties); the newest when none has one."""
        committed = self.committed()
        scored = [(m.extra["dev_loss"], step) for step, m in committed.items() if m.extra.get("dev_loss") is not None]
        if scored:
            return min(scored)[1]
        return max(committed) if committed else None

    def prune(self, keep: int | None) -> None:
        if keep is None:
            return
        steps = sorted(self.committed())
        best = self.best()
        self.guard()
        for step in steps[:-keep]:
            if step == best:
                continue
            folder = self.root.child(f"step-{step}")
            folder.delete(MANIFEST)  # first, so a half-deleted folder is never taken for complete
            folder.delete_all()


# --- the run -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    best_step: int | None
    best_dev_loss: float | None
    steps_completed: int
    tokens_seen: int
    resumed_from: int | None
    stopped_early: bool
    dev_loss_curve: list[list[float]]
    train_loss_curve: list[list[float]]
    log_history: list[dict[str, Any]]
    tokenization: dict[str, dict[str, Any]]
    trainable_params: int
    total_params: int
    world_size: int
    is_main: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, base_model: str) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_dev_loss": self.best_dev_loss,
            "dev_loss_curve": self.dev_loss_curve,
            "train_loss_curve": self.train_loss_curve,
            "tokens_seen": self.tokens_seen,
            "base_model": base_model,
            "steps_completed": self.steps_completed,
            "resumed_from_step": self.resumed_from,
            "stopped_early": self.stopped_early,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "world_size": self.world_size,
            "tokenization": self.tokenization,
        }


def load_datasets(data_dir: Path, config: TrainConfig, tokenizer) -> tuple[list, list, dict[str, dict]]:
    encoder = ChatEncoder(tokenizer, config.max_input_length, config.max_output_length)
    out, reports = [], {}
    for split, name in (("train", config.data_config.train_file), ("dev", config.data_config.val_file)):
        path = data_dir / name
        records = load_split(path) if path.is_file() else []
        if split == "train" and not path.is_file():
            raise DataError(f"training split {name} is missing from the data artifact")
        rows, report = encoder.encode_all(records)
        reports[split] = report.as_dict()
        _log_report(split, report, config)
        out.append(rows)
    if not out[0]:
        raise DataError(
            f"no training example fits max_input_length={config.max_input_length} / max_output_length={config.max_output_length} "
            f"({reports['train']['examples']} read, {reports['train']['too_long']} too long)"
        )
    return out[0], out[1], reports


def _log_report(split: str, report: TokenizationReport, config: TrainConfig) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # every rank tokenizes the same data; one report is enough
    d = report.as_dict()
    log.info(
        "%s: %d/%d examples kept, %d tokens (%d trained, longest %d); truncated: %d question(s), %d answer(s), "
        "%d with old turns dropped; dropped: %d too long for max_input_length=%d, %d without an answer token",
        split, d["kept"], d["examples"], d["tokens"], d["trained_tokens"], d["max_length"], d["truncated_input"],
        d["truncated_output"], d["dropped_context_turns"], d["too_long"], config.max_input_length, d["no_target"],
    )
    if d["dropped"]:
        log.warning("%s: %d example(s) could not fit and are not trained on: %s", split, d["dropped"], ", ".join(d["dropped_ids"][:10]))


def train(
    config: TrainConfig,
    model_dir: Path,
    data_dir: Path,
    local_dir: Path,
    store: CheckpointStore | None,
    hooks: Hooks | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train (resuming from the store's newest checkpoint of the same inputs) and export nothing.

    ``local_dir`` is the Trainer's output folder, shared by the ranks of one node. The caller
    exports ``store.best()`` (``export_best``) on rank 0 afterwards. ``callbacks`` are extra
    TrainerCallbacks (tracking: shared/train/tracking.py).
    """
    # The fast path arrives as hooks (shared.train.fast.training_hooks); this loop never imports it.
    hooks = hooks or Hooks()
    prec = precision(config)
    targs = _training_arguments(config, local_dir, prec)
    _one_gpu_without_torchrun(targs)
    is_main = targs.process_index == 0
    _torch_threads(targs.world_size)
    callback = LawtuneCallback(store, has_dev=True, patience=config.training_args.early_stopping_patience,
                               keep=config.training_args.save_total_limit)
    with _sigterm_sets(callback):  # from here on SIGTERM only sets a flag; training checks it every step
        return _train(config, model_dir, data_dir, local_dir, store, hooks, prec, targs, is_main, callback, callbacks or [])


def _train(config, model_dir, data_dir, local_dir, store, hooks, prec, targs, is_main, callback, extra) -> TrainResult:
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    train_rows, dev_rows, reports = load_datasets(data_dir, config, tokenizer)
    callback.has_dev = bool(dev_rows)
    if not dev_rows:
        from transformers.trainer_utils import IntervalStrategy

        log.warning("dev split is empty: no dev loss; the last checkpoint is exported as the best")
        targs.eval_strategy = IntervalStrategy.NO

    resume_step = _resume_point(store, local_dir, targs)

    from transformers import set_seed

    set_seed(targs.seed)  # before the adapter exists: LoRA's random init must repeat on every attempt
    model = hooks.prepare_model(model_dir, config, prec)
    if hooks.prepare_train_dataset is not None:  # after the model: a token budget may be measured on it
        train_rows = hooks.prepare_train_dataset(train_rows, config)
    trainable, total = model.get_nb_trainable_parameters()
    collator = hooks.make_collator(config, tokenizer, prec)
    # Whether the batches still teach the end-of-turn token (pad = eos masking it is a classic): evaluate's gate reads it.
    end_ids = ChatEncoder(tokenizer, config.max_input_length, config.max_output_length).end_of_turn
    reports["train"]["end_of_turn_labels"] = audit_end_labels(collator, train_rows, end_ids)
    trainer = LawtuneTrainer(
        model=model,
        args=targs,
        data_collator=collator,
        train_dataset=train_rows,
        eval_dataset=dev_rows or None,
        processing_class=tokenizer,
        compute_loss_func=hooks.make_loss(config),
        callbacks=[callback, *extra],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.session_start_step = resume_step or 0
    if is_main and targs.world_size > 1:
        log.info("distributed: %s over %d processes", "fsdp (FSDP2: weights sharded per decoder layer)"
                 if trainer.sharded else "ddp (a whole model per process)", targs.world_size)

    if callback.preempted:
        raise Preempted("SIGTERM before training started; nothing new to save, exiting so the Job retries")
    finished = _finished_state(local_dir / f"checkpoint-{resume_step}", callback.patience) if resume_step else None
    if finished is not None:
        # The Trainer resumed at its last step trains one more (transformers 5.19: "step 5/4"), so a
        # run killed after its last checkpoint would come back with another adapter than it had.
        trainer.state = finished
        callback.stopped_early = finished.global_step < finished.max_steps
        if is_main:
            log.info("checkpoint step-%d ended the training (%s): nothing left to train", resume_step,
                     "early stopping" if callback.stopped_early else f"max_steps {finished.max_steps}")
    else:
        trainer.train(resume_from_checkpoint=str(local_dir / f"checkpoint-{resume_step}") if resume_step else None)
    state = trainer.state
    if callback.preempted:
        raise Preempted(f"SIGTERM: checkpoint step-{state.global_step} committed; exiting so the Job retries")

    history = state.log_history
    dev_curve = [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h]
    best_step = store.best() if (store is not None and is_main) else None
    best_loss = next((loss for step, loss in dev_curve if step == best_step), None)
    return TrainResult(
        best_step=best_step,
        best_dev_loss=best_loss,
        steps_completed=state.global_step,
        tokens_seen=int(state.num_input_tokens_seen),
        resumed_from=resume_step,
        stopped_early=callback.stopped_early,
        dev_loss_curve=dev_curve,
        train_loss_curve=[[h["step"], h["loss"]] for h in history if "loss" in h],
        log_history=history,
        tokenization=reports,
        trainable_params=trainable,
        total_params=total,
        world_size=targs.world_size,
        is_main=is_main,
    )


def _finished_state(checkpoint: Path, patience: int | None):
    """The checkpoint's TrainerState when training had ended there (max_steps reached, or patience
    spent by its dev losses), else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if state.max_steps and state.global_step >= state.max_steps:
        return state
    if patience_spent([h["eval_loss"] for h in state.log_history if "eval_loss" in h], patience):
        return state
    return None


def patience_spent(dev_losses: list[float], patience: int | None) -> bool:
    """``patience`` evaluations in a row without a dev loss below the best one before them."""
    if not patience or not dev_losses:
        return False
    return len(dev_losses) - 1 - dev_losses.index(min(dev_losses)) >= patience


def _resume_point(store: CheckpointStore | None, local_dir: Path, targs) -> int | None:
    """The newest committed step (global rank 0 decides), fetched into every node's own folder.

    ``local_dir`` is per node (a pod's emptyDir): the local rank 0 of each node clears it and
    fetches the checkpoint there, so every rank resumes from a folder on its own node.
    """
    resume_step = None
    if targs.process_index == 0 and store is not None:
        store.discard_foreign()
        committed = store.committed()
        resume_step = max(committed) if committed else None
    resume_step = _broadcast(resume_step, targs)
    with targs.main_process_first(local=True, desc="resume"):
        if targs.local_process_index == 0:
            shutil.rmtree(local_dir, ignore_errors=True)
            local_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                store.fetch(resume_step, local_dir / f"checkpoint-{resume_step}")
                if targs.process_index == 0:
                    log.info("resuming from committed checkpoint step-%d (%s)", resume_step, store.root.uri)
    return resume_step


def _gather_rank_files(args, checkpoint: Path) -> None:
    """Every rank's own files (``rng_state_<rank>.pth``; under FSDP its optimizer shard) into rank 0's
    checkpoint folder before it is committed.

    Ranks on other nodes write theirs to their own node's folder, which is never uploaded; without
    this a resumed run would restore only node 0's RNG streams (dropout masks would change) and,
    under FSDP, miss their optimizer shards. Ranks on rank 0's node share its folder and send only
    their (small) RNG file.
    """
    import torch.distributed as dist

    from shared.train.fsdp import rank_files

    same_node = args.process_index == args.local_process_index  # torchrun: node 0 holds ranks 0..n-1
    mine = []
    for path in rank_files(checkpoint, args.process_index):
        if path.name.startswith("rng_state_") or not same_node:
            mine.append((str(path.relative_to(checkpoint)), path.read_bytes()))
    gathered = [None] * args.world_size if args.process_index == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return
    for files in gathered:
        for rel, data in files or []:
            target = checkpoint / rel
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)


def export_best(store: CheckpointStore, best_step: int, target: Path) -> None:
    """The best checkpoint's adapter (verified) as a plain peft folder at ``target``."""
    store.fetch(best_step, target, only=ADAPTER_FILES)
    (target / MANIFEST).unlink()  # the stage's own manifest covers these files


def _training_arguments(config: TrainConfig, output_dir: Path, prec: Precision):
    from transformers import TrainingArguments

    a = config.training_args
    by_epochs = a.num_train_epochs is not None and "max_steps" not in a.model_fields_set
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=-1 if by_epochs else a.max_steps,
        num_train_epochs=a.num_train_epochs if by_epochs else 1.0,
        learning_rate=a.learning_rate,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup_steps if a.warmup_steps > 0 else a.warmup_ratio,
        lr_scheduler_type=a.lr_scheduler_type,
        per_device_train_batch_size=a.per_device_train_batch_size,
        per_device_eval_batch_size=a.per_device_eval_batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        gradient_checkpointing=a.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads hacks.
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
        max_grad_norm=a.max_grad_norm,
        eval_strategy="steps",
        eval_steps=a.eval_steps,
        save_strategy="steps",
        save_steps=a.save_steps,
        logging_steps=a.logging_steps,
        logging_first_step=True,
        bf16=prec.bf16,
        use_cpu=prec.device == "cpu",
        seed=config.training_seed,
        # Rows are tokenized in memory before training; workers beyond the cores only add processes
        # (the ChatGLM3 demo's lora.yaml asks for 16).
        dataloader_num_workers=min(a.dataloader_num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1),
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        disable_tqdm=True,
        # Packed rows have no padding and their eos equals pad for many tokenizers: count all tokens.
        include_num_input_tokens_seen="all" if a.packing or _fast_path(config, prec) else "non_padding",
        ddp_find_unused_parameters=False,
        prediction_loss_only=True,
    )


def _one_gpu_without_torchrun(targs) -> None:
    """One process sees several GPUs: train on the first, never through DataParallel.

    Trainer would wrap the model in ``nn.DataParallel`` (slower than one GPU for LoRA, and a
    packed row of one sequence cannot be split across replicas); DDP needs ``torchrun``.
    """
    if targs.world_size <= 1 and targs.n_gpu > 1:
        log.warning("%d GPUs visible but not started by torchrun: training on one GPU; "
                    "use `torchrun --nproc-per-node %d -m jobs.finetune ...` for DDP", targs.n_gpu, targs.n_gpu)
        targs._n_gpu = 1


def fast_path_wanted(config: TrainConfig, device: str) -> bool:
    """``training_args.fast_path``: "on", "off", or "auto" (on when training on a GPU)."""
    mode = config.training_args.fast_path
    return mode == "on" or (mode == "auto" and device == "cuda")


def _fast_path(config: TrainConfig, prec: Precision) -> bool:
    return fast_path_wanted(config, prec.device)


def _torch_threads(world_size: int) -> None:
    if world_size > 1 and not torch.cuda.is_available():
        # CPU DDP ranks share the cores; oversubscription makes each step many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def _broadcast(value: int | None, targs) -> int | None:
    if targs.world_size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _sigterm_sets:
    """SIGTERM sets ``callback.preempted`` instead of killing; the previous handler is restored after."""

    def __init__(self, callback: "LawtuneCallback"):
        self.callback = callback
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
            self.callback.preempted = True

        self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous or signal.SIG_DFL)


class LawtuneTrainer(Trainer):
    """Adds tokens/s (since the last log) and ETA to every training log, so they reach
    log_history, the checkpoints' trainer_state.json and metrics.jsonl.

    With an FSDP2-sharded model (``distributed: fsdp``) it runs the model as it is (no DDP, no
    second sharding) and checkpoints only what resuming needs: the adapter, gathered and written by
    rank 0, and the optimizer state sharded through torch.distributed.checkpoint (shared/train/fsdp.py).
    """

    session_start_step = 0
    _last: tuple[float, int] | None = None
    _view = None

    @property
    def sharded(self) -> bool:
        from shared.train.fsdp import is_sharded

        return is_sharded(self.model)

    def _move_model_to_device(self, model, device):
        from shared.train.fsdp import is_sharded

        if not is_sharded(model):  # FSDP placed every shard on its rank's device already
            super()._move_model_to_device(model, device)

    def _wrap_model(self, model, training=True, dataloader=None):
        if not self.sharded:
            return super()._wrap_model(model, training, dataloader)
        if self._view is None:
            from shared.train.fsdp import TrainerView

            self._view = TrainerView(self.model)
        return self._view

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        from shared.train.fsdp import save_adapter

        save_adapter(self.model, Path(output_dir or self.args.output_dir), self.args.should_save, self.processing_class)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import SCHEDULER_NAME

        from shared.train.fsdp import save_optimizer

        save_optimizer(self.model, _inner_optimizer(self.optimizer), Path(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from shared.train.fsdp import load_adapter

        load_adapter(self.model, Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.sharded:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        from shared.train.fsdp import load_optimizer

        load_optimizer(self.model, _inner_optimizer(self.optimizer), Path(checkpoint))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and start_time is not None:
            now, tokens = time.time(), int(self.state.num_input_tokens_seen)
            last_time, last_tokens = self._last or (start_time, self._initial_num_input_tokens_seen)
            if now > last_time:
                logs["tokens_per_s"] = round((tokens - last_tokens) / (now - last_time), 1)
            done = self.state.global_step - self.session_start_step
            if done > 0:
                logs["eta_s"] = round((now - start_time) / done * (self.state.max_steps - self.state.global_step), 1)
            self._last = (now, tokens)
        super().log(logs, start_time)


class LawtuneCallback(TrainerCallback):
    """Dev loss at every checkpoint, checkpoints committed to the store, SIGTERM, patience, progress."""

    def __init__(self, store: CheckpointStore | None, *, has_dev: bool, patience: int | None, keep: int | None):
        self.store = store
        self.has_dev = has_dev
        self.patience = patience
        self.keep = keep
        self.preempted = False
        self.stopped_early = False
        self.bar = None

    # -- flow

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.preempted, args):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is for saving, not evaluating
        elif control.should_save and self.has_dev:
            control.should_evaluate = True  # every checkpoint gets a dev loss, so the best can be chosen
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics and state.is_world_process_zero:
            log.info("step %d: dev loss %.4f", state.global_step, metrics["eval_loss"])
        if self.patience:
            losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
            if patience_spent(losses, self.patience):
                log.info("early stopping: %d evaluations without a lower dev loss than %.4f", self.patience, min(losses))
                self.stopped_early = True
                control.should_training_stop = True
                control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # every rank's RNG file is on disk before rank 0 uploads the folder
            if args.device.type == "cuda":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if dist.is_available() and dist.is_initialized() and self.store is not None:
            _gather_rank_files(args, local)
        if self.store is None or not state.is_world_process_zero:
            return control
        dev_loss = next((h["eval_loss"] for h in reversed(state.log_history) if "eval_loss" in h and h["step"] == step), None)
        self.store.commit(local, step, {"dev_loss": dev_loss, "epoch": state.epoch, "preempted": self.preempted})
        log.info("checkpoint step-%d committed%s", step, "" if dev_loss is None else f" (dev loss {dev_loss:.4f})")
        for old in Path(args.output_dir).glob("checkpoint-*"):
            if old != local:  # the store has them; only the newest is needed locally
                shutil.rmtree(old, ignore_errors=True)
        self.store.prune(self.keep)
        return control

    # -- reporting

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.environ.get("LAWTUNE_NO_PROGRESS") != "1":
            from tqdm.auto import tqdm

            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="finetune", unit="step", file=sys.stderr,
                            mininterval=float(os.environ.get("LAWTUNE_PROGRESS_INTERVAL", "0.1" if interactive else "10")))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        shown = {k: logs[k] for k in ("loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s", "eta_s") if k in logs}
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in shown.items() if k != "eta_s"}, refresh=False)
        log.info("step %d/%d %s", state.global_step, state.max_steps, " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (DCP reads and steps the plain one)."""
    return getattr(optimizer, "optimizer", optimizer)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _any_rank(flag: bool, args) -> bool:
    if args.world_size <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


__all__ = [
    "ADAPTER_FILES", "CheckpointStore", "Hooks", "LawtuneCallback", "Precision", "Preempted", "TrainResult",
    "distributed_strategy", "export_best", "load_datasets", "make_collator", "make_loss", "precision", "prepare_model",
    "train",
]
