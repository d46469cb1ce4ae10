"""The training config (YAML), validated by pydantic with ``extra="forbid"``.

Key names follow the ChatGLM3 finetune_demo ``lora.yaml`` where they overlap
(``data_config``, ``max_input_length``, ``max_output_length``, ``training_args``,
``peft_config``), so a config from that demo loads here; keys the demo has that mean nothing
to us (``num_proc``, ``predict_with_generate``…) are accepted and ignored. Every problem is
reported at once, each naming the key, the value found and what was expected.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from shared.core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Files the data stage writes beside the splits; a split may not take one of these names.
DATA_STAGE_FILES = ("rejected.jsonl", "report.json", "MANIFEST.json")


class DataConfig(_Strict):
    """The split files' names, as the ChatGLM3 demo's ``data_config``: preprocess writes each
    split (train, dev, test) under the name given here and finetune/evaluate read it by that
    name. ``test_file`` may name the ``val_file`` (the demo's own lora.yaml does: it has no
    test set); the dev and test rows then share that one file, as in the demo."""

    train_file: str = Field(default="train.jsonl", description="The training split's file name.")
    val_file: str = Field(default="dev.jsonl", description="The dev split (dev loss, best checkpoint).")
    test_file: str = Field(default="test.jsonl", description="The test split (evaluate); may equal val_file.")
    num_proc: int | None = Field(default=None, description="Accepted from ChatGLM3 configs; unused.")

    @field_validator("train_file", "val_file", "test_file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or value in (".", "..") or value.startswith(".") or "/" in value or "\\" in value:
            raise ValueError(f"a plain file name such as train.json (the split is a file in the data stage's folder), not {value!r}")
        if value in DATA_STAGE_FILES:
            raise ValueError(f"a name other than {', '.join(DATA_STAGE_FILES)} (the data stage writes those itself)")
        return value

    @model_validator(mode="after")
    def _train_apart(self) -> "DataConfig":
        for key in ("val_file", "test_file"):
            if getattr(self, key) == self.train_file:
                raise ValueError(
                    f"train_file and {key} both name {self.train_file!r}; the model would be scored on its own "
                    "training rows (only val_file and test_file may share a file)"
                )
        return self

    def files(self) -> dict[str, str]:
        """Split role -> file name (dev and test may share one)."""
        return {"train": self.train_file, "dev": self.val_file, "test": self.test_file}


# ---- the user's own data: column mapping and several inputs (issue 18) -------------------------
QA_ROLES = ("title", "question", "reply", "is_best")
PROMPT_ROLES = ("prompt", "query", "response", "system", "history")


class ColumnsConfig(_Strict):
    """Role → the user's column (CSV) or key (JSON, JSONL, Parquet) name, as LLaMA-Factory's
    dataset_info ``columns``. One family: a Q&A table (title, question, reply, is_best) or a
    prompt/response table (prompt, query, response, system, history)."""

    title: str | None = Field(default=None, description="Q&A table: the question's title (required in this family).")
    question: str | None = Field(default=None, description="Q&A table: the question's detail, joined to the title.")
    reply: str | None = Field(default=None, description="Q&A table: the answer (required in this family).")
    is_best: str | None = Field(default=None, description="Q&A table: the best-reply flag (1/0/true/false/是/否).")
    prompt: str | None = Field(default=None, description="Prompt/response: the user turn (Alpaca 'instruction'; required).")
    query: str | None = Field(default=None, description="Prompt/response: appended to the prompt on a new line (Alpaca 'input').")
    response: str | None = Field(default=None, description="Prompt/response: the assistant turn (Alpaca 'output'; required).")
    system: str | None = Field(default=None, description="Prompt/response: a system turn.")
    history: str | None = Field(default=None, description="Prompt/response: earlier turns, a list of [question, answer] pairs.")

    @model_validator(mode="after")
    def _one_family(self) -> "ColumnsConfig":
        set_roles = [r for r in (*QA_ROLES, *PROMPT_ROLES) if getattr(self, r)]
        qa = [r for r in set_roles if r in QA_ROLES]
        if qa and len(qa) < len(set_roles):
            raise ValueError(f"mixes Q&A roles ({', '.join(qa)}) with prompt/response roles; map one family")
        required = ("title", "reply") if qa else ("prompt", "response")
        missing = [r for r in required if not getattr(self, r)]
        if missing:
            raise ValueError(f"maps no column to {' and '.join(missing)}; expected at least {' and '.join(required)}")
        return self

    def mapping(self) -> dict[str, str]:
        return {r: getattr(self, r) for r in (*QA_ROLES, *PROMPT_ROLES) if getattr(self, r)}


class InputConfig(_Strict):
    """One input of several: a file or URI, its sampling weight, its own column mapping."""

    path: str = Field(description="CSV/JSON/JSONL/Parquet file, a saved Hugging Face dataset folder, or an s3:// URI.")
    weight: float = Field(
        default=1.0, gt=0.0,
        description="Sampling weight: below 1 keeps that share of its questions; above 1 repeats its train examples.",
    )
    columns: ColumnsConfig | None = Field(default=None, description="This input's mapping; default preprocess.columns.")


class PreprocessConfig(_Strict):
    """Cleaning limits and the deterministic split."""

    columns: ColumnsConfig | None = Field(
        default=None, description="Role -> your column names, when they are not a known layout (docs/data.md)."
    )
    inputs: list[InputConfig] = Field(
        default_factory=list, description="Inputs to read when --input is not given (weights, per-input columns)."
    )

    min_question_chars: int = Field(default=2, ge=1)
    max_question_chars: int = Field(default=2000, ge=1)
    min_answer_chars: int = Field(default=2, ge=1)
    max_answer_chars: int = Field(default=8000, ge=1)
    dev_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    test_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_dev: int = Field(default=1, ge=0, description="Smallest dev set, taken from train when the ratio gives less.")
    min_test: int = Field(default=1, ge=0)
    split_seed: str = Field(default="lawtune", description="Salt of the split hash; change it to reshuffle.")
    system_prompt: str | None = Field(default=None, description="Optional system turn prepended to every example.")

    @model_validator(mode="after")
    def _ratios(self) -> "PreprocessConfig":
        if self.dev_ratio + self.test_ratio >= 1.0:
            raise ValueError(
                f"dev_ratio + test_ratio = {self.dev_ratio + self.test_ratio}; expected less than 1 (train must keep rows)"
            )
        if self.min_question_chars > self.max_question_chars:
            raise ValueError("min_question_chars must not exceed max_question_chars")
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars must not exceed max_answer_chars")
        return self


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(default=256, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)


SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]


class TrainingArgs(_Strict):
    """How finetune trains (transformers Trainer names). Steps count optimizer steps."""

    output_dir: str | None = Field(default=None, description="Accepted from ChatGLM3 configs; the artifact store decides.")
    max_steps: int = Field(default=100, ge=1, description="Optimizer steps; the data repeats as often as needed.")
    num_train_epochs: float | None = Field(
        default=None, gt=0, description="Used instead of max_steps when max_steps is not set explicitly."
    )
    learning_rate: float = Field(default=5e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of steps warming up; warmup_steps wins when > 0.")
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler_type: SchedulerName = "cosine"
    per_device_train_batch_size: int = Field(default=4, ge=1)
    per_device_eval_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations: less memory, ~30% slower.")
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    save_steps: int = Field(default=50, ge=1, description="Commit a checkpoint (with a dev loss) every N steps, and at the end.")
    eval_steps: int = Field(default=50, ge=1, description="Dev loss every N steps (and at every checkpoint).")
    logging_steps: int = Field(default=10, ge=1)
    save_total_limit: int | None = Field(
        default=None, ge=1, description="Keep the newest N committed checkpoints (plus the best); None keeps all."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many dev evaluations without a new lowest loss."
    )
    packing: bool = Field(default=False, description="Padding-free batches: examples concatenated, attention kept per example.")
    bf16: bool | None = Field(default=None, description="None = bf16 on a GPU that has it, fp32 on CPU.")
    attn_implementation: str = Field(default="sdpa", description="transformers attention backend: sdpa, eager, flash_attention_2...")
    seed: int | None = Field(default=None, description="Trainer seed (init, dropout, shuffling); None = the top-level seed.")
    dataloader_num_workers: int = Field(default=0, ge=0)
    use_cpu: bool | None = Field(default=None, description="True trains on CPU even where a GPU exists.")
    # GPU fast path (issue 7, shared/train/fast/speedups.py): padding-free packing with per-example varlen
    # attention, a chunked head+loss, Liger kernels where installed.
    fast_path: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto = on when training on a GPU; off = the plain Trainer recipe."
    )
    fp8: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Fast path: the frozen base weights' matmuls in FP8 (rowwise scales); auto = on GPUs with FP8 tensor cores (Ada/Hopper+) for models of hidden size >= 3072.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Fast path: torch.compile each decoder layer (one graph for all layers; fuses norms, RoPE, "
        "LoRA and FP8 quantisation): +1.4-4 % tokens/s for 20-90 s of compilation at the first step; auto = off "
        "(it repays itself only in runs of thousands of steps, docs/benchmarks.md); never with memory_profile.",
    )
    memory_profile: bool = Field(
        default=False,
        description="Fast path for 24 GB cards: recompute each decoder layer in backward (7B LoRA, 2,048-token examples: <22 GiB).",
    )
    tokens_per_batch: Annotated[int, Field(ge=64)] | Literal["auto"] | None = Field(
        default=None,
        description="Fast path: pack examples into micro-batches of at most this many tokens; None = per_device_train_batch_size "
        "examples; auto = the largest budget whose training step fits the GPU (trial steps, cached per card/model/config). "
        "An explicit budget that does not fit exits 2 naming the largest that does.",
    )
    # Several processes (torchrun, issue 16, shared/train/fsdp.py): how the ranks hold the model.
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="Under torchrun: ddp = every GPU holds the whole model; fsdp = FSDP2, the frozen weights sharded across "
        "the GPUs (models larger than one card); auto = fsdp when the base model's bf16 weights exceed half of one card's "
        "memory, else ddp. One process uses neither.",
    )
    # Accepted from ChatGLM3/transformers configs so they load unchanged; the job decides these.
    remove_unused_columns: bool | None = None
    save_strategy: str | None = None
    log_level: str | None = None
    logging_strategy: str | None = None
    evaluation_strategy: str | None = None
    eval_strategy: str | None = None
    predict_with_generate: bool | None = None
    generation_config: GenerationConfig | None = None


class PeftConfig(_Strict):
    """LoRA adapter (peft LoraConfig names)."""

    peft_type: Literal["LORA"] = "LORA"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        description="Module names to adapt (e.g. q_proj, v_proj) or 'all-linear'.",
    )

    @model_validator(mode="after")
    def _some_targets(self) -> "PeftConfig":
        if isinstance(self.target_modules, list) and not [m for m in self.target_modules if m.strip()]:
            raise ValueError("target_modules is empty; list module names (e.g. [q_proj, v_proj]) or write all-linear")
        return self


# The quality metrics (shared/evaluate/metrics.py computes them), named here so gate rules
# are checked at config load without importing the evaluate stage.
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
# Corpus-level extras: mean answer length (characters), share of empty answers and share of answers
# that ended (end-of-turn token) before the max_new_tokens cap (0..1).
EXTRAS = ("answer_chars", "empty_share", "ended_share")
# What a gate test may compare: a direction of better exists (empty_share: lower is better).
COMPARABLE = (*METRICS, "empty_share", "ended_share")


class GateRule(_Strict):
    """One check of the quality gate (shared/evaluate/gate.py) on a metric of shared/evaluate/metrics.py.

    ``min``/``max`` bound the candidate's mean score. A comparison (``test``) decides on the
    paired per-question differences candidate - ``compare`` (the base model or the PROMOTED
    one) through their bootstrap interval: ``superiority`` holds when the interval's lower bound
    is above ``margin`` (default 0: better, with confidence), ``non_inferiority`` when it is
    above ``-margin`` (at most ``margin`` points worse, with confidence). ``min_improvement``
    (the older spelling) is a comparison too: >= 0 reads as superiority by that margin, < 0 as
    non-inferiority within its size. For empty_share lower is better, so its difference is
    taken the other way round.
    """

    metric: str = Field(description="rouge-1, rouge-2, rouge-l, bleu-4 (0-100), answer_chars, empty_share, ended_share (0-1).")
    min: float | None = Field(default=None, description="Absolute minimum of the candidate's mean score.")
    max: float | None = Field(default=None, description="Absolute maximum of the candidate's mean score (e.g. empty_share).")
    test: Literal["superiority", "non_inferiority"] | None = Field(
        default=None, description="Compare with `compare` on paired per-question differences (see the class doc).")
    margin: float = Field(default=0.0, ge=0.0, description="Points: superiority by more than it, or non-inferiority within it.")
    compare: Literal["base", "promoted"] = Field(
        default="base", description="What the test compares with: the base model, or the PROMOTED (production) model of --model-name.")
    min_improvement: float | None = Field(default=None, description="Older spelling of a test (see the class doc).")
    min_improvement_over: Literal["base", "promoted"] | None = Field(default=None, description="Older spelling of `compare`.")

    @model_validator(mode="after")
    def _one_threshold(self) -> "GateRule":
        if self.metric not in (*METRICS, *EXTRAS):
            raise ValueError(f"gate metric {self.metric!r} is unknown; expected one of {', '.join((*METRICS, *EXTRAS))}")
        if self.min_improvement is not None:
            if self.test is not None:
                raise ValueError(f"gate rule for {self.metric!r} sets both 'test' and its older spelling 'min_improvement'")
            self.test = "superiority" if self.min_improvement >= 0 else "non_inferiority"
            self.margin = abs(self.min_improvement)
        if self.min_improvement_over is not None:
            self.compare = self.min_improvement_over
        if self.min is None and self.max is None and self.test is None:
            raise ValueError(f"gate rule for {self.metric!r} sets none of 'min', 'max', 'test'")
        if self.test is not None and self.metric not in COMPARABLE:
            raise ValueError(f"gate metric {self.metric!r} has no better direction to test; expected one of {', '.join(COMPARABLE)}")
        return self

    @property
    def threshold(self) -> float:
        """What the interval's lower bound must exceed."""
        return self.margin if self.test == "superiority" else -self.margin


class GateConfig(_Strict):
    """The quality gate: rules, and how sure a comparison must be (shared/evaluate/gate.py)."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="Two-sided confidence of the paired bootstrap intervals.")
    resamples: int = Field(default=9999, ge=99, description="Bootstrap resamples per interval.")
    questions: Literal["all", "test", "golden"] = Field(
        default="all", description="Which per-question scores the rules read: the test split, the golden set, or both.")
    inconclusive: Literal["block", "allow_first"] = Field(
        default="block",
        description="When a comparison cannot decide (its interval holds both answers): block, or allow it while nothing "
        "is promoted yet (a first promotion; the report says so).",
    )
    rules: list[GateRule] = Field(default_factory=lambda: _default_gate(), description="Every rule must pass; [] passes always.")

    @model_validator(mode="before")
    @classmethod
    def _rules_alone(cls, data: Any) -> Any:
        # The older form: a plain list of rules.
        return {"rules": data} if isinstance(data, list) else data


def _default_gate() -> list[GateRule]:
    # Better than the base model, at most 2 points behind production, and no more than a fifth of the answers empty.
    return [GateRule(metric="rouge-l", test="superiority"),
            GateRule(metric="rouge-l", test="non_inferiority", margin=2.0, compare="promoted"),
            GateRule(metric="empty_share", max=0.2)]


class ParityConfig(_Strict):
    """Before PROMOTED moves, serve the merged version with vLLM and compare its greedy answers to
    the golden questions with the candidate's answers from evaluate (shared/serve/parity.py).

    The defaults sit below what the bundled model reaches on CPU, float32 on both sides (`make train`,
    2026-12-07, 22 golden questions, 64 new tokens): first 16 tokens 100%, token agreement 0.993, 12 of
    22 answers identical (the rest diverge late, on float summation order), ended share 0% vs 0%."""

    enabled: bool = Field(default=False, description="Run the check in publish (the shipped configs turn it on).")
    first_tokens: int = Field(default=16, ge=1, description="N of 'exact agreement on the first N tokens'.")
    min_first_tokens_agreement: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Share of answers whose first N tokens agree exactly.")
    min_token_agreement: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Mean share of token positions that agree (up to the longer answer).")
    max_ended_share_gap: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Largest |served - evaluated| share of answers that end before max_tokens.")
    max_questions: int | None = Field(default=None, ge=1, description="Ask at most this many golden questions (None: all).")
    start_timeout_s: float = Field(default=600.0, gt=0, description="How long vLLM may take to start.")


class EvaluationConfig(_Strict):
    """How evaluate generates and scores answers, the gate publish obeys, and the parity check before promotion."""

    max_examples: int | None = Field(default=None, ge=1, description="Evaluate at most this many test rows.")
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call (transformers backend).")
    backend: Literal["auto", "vllm", "transformers"] = Field(
        default="auto", description="auto: vLLM when importable and it starts, else transformers."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="The dtype evaluate answers in, and so the one publish's parity check and serving use (the serving "
        "contract records it); auto: bfloat16 on a CUDA GPU that has it, float32 elsewhere.",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    report_samples: int = Field(default=10, ge=0, description="Rows of the side-by-side table in the report.")
    questions: str | None = Field(
        default=None,
        description="Golden question set (CSV or JSONL, path or URI) scored on every run besides the test split.",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="Rules and confidence; a plain list is the rules.")
    parity: ParityConfig = Field(default_factory=ParityConfig)


# The ranks vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks in vLLM 0.32).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class PublishConfig(_Strict):
    """What publish stores for a version (jobs/publish.py, shared/publish/adapter_publish.py)."""

    artifact: Literal["merged", "adapter", "both"] = Field(
        default="merged",
        description="merged: the adapter merged into the base (one model per version); adapter: the verified adapter and "
                    "its base's identity, served on a shared base (serving.mode=adapters); both: the two.",
    )
    promote: bool = Field(
        default=True,
        description="Move PROMOTED to the version when its gate passed; false publishes only (then `lawtune models canary` "
                    "tries it on a share of the traffic, `lawtune models promote` or `canary promote` promotes it).",
    )
    served_parity: bool = Field(
        default=True,
        description="Run the parity check's served part (evaluation.parity.enabled: vLLM answering the golden questions) "
                    "at publish; false where publish has no vLLM (the pipeline chart's publish image): only the static "
                    "checks run, and the version's parity.json says the served part was not run.",
    )
    max_lora_rank: int = Field(
        default=16,
        description="The serving side's --max-lora-rank (the serving chart's adapters.maxLoraRank): an adapter of a higher "
                    "rank is refused at publish.",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _a_vllm_rank(cls, value: int) -> int:
        if value not in VLLM_MAX_LORA_RANKS:
            raise ValueError(f"one of vLLM's --max-lora-rank values {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
        return value


class TrainConfig(_Strict):
    """One model × recipe. See configs/ for annotated examples."""

    base_model: str = Field(
        default="bundled:smollm2-135m-instruct",
        description="Overridden by --base-model / make train BASE_MODEL=... / LAWTUNE_BASE_MODEL (that order).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run the base model repository's own Python code (e.g. THUDM/chatglm3-6b needs it); off by default.",
    )
    seed: int = 42
    max_input_length: int = Field(default=512, ge=8)
    max_output_length: int = Field(default=512, ge=8)
    data_config: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    peft_config: PeftConfig = Field(default_factory=PeftConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    # Where overridden keys came from ("--base-model", "LAWTUNE_BASE_MODEL", "--set"); not part of the digest.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def origin(self, key: str) -> str:
        """Which source set a top-level key: an override's name, "config" (the YAML) or "default"."""
        if key in self._origins:
            return self._origins[key]
        return "config" if key in self.model_fields_set else "default"

    def expect_base_model(self, recorded: str | None, where: str) -> None:
        """Refuse an explicitly given base model (``--base-model``, ``LAWTUNE_BASE_MODEL``, ``--set
        base_model=``) other than ``recorded``, the one the adapter at ``where`` was trained on. A
        config file's own base_model is not a request: the recorded model is used whatever it says."""
        origin = self.origin("base_model")
        if not recorded or origin in ("config", "default") or _same_model(self.base_model, recorded):
            return
        raise ConfigError(
            f"{origin} names base model {self.base_model!r}, but the adapter in {where} was trained on {recorded!r}; "
            f"an adapter only works on its own base model: drop {origin}, or re-run finetune with it"
        )

    @property
    def training_seed(self) -> int:
        """The Trainer's seed (init, dropout, shuffling): ``training_args.seed``, else the top-level ``seed``."""
        return self.training_args.seed if self.training_args.seed is not None else self.seed

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def section_digest(self, *names: str) -> str:
        """Digest of the sections a stage depends on, so editing one stage's keys re-runs only it."""
        dumped = self.model_dump(mode="json")
        return hashlib.sha256(repr([(n, dumped[n]) for n in names]).encode()).hexdigest()


def expectation(error: dict[str, Any]) -> str:
    """What a pydantic error says was expected, in words ("a whole number", "a number of at least 1")."""
    kind, ctx = error["type"], error.get("ctx") or {}
    words = {
        "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
        "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
        "string_type": "text", "list_type": "a list", "dict_type": "a section of keys (key: value lines)",
        "model_type": "a section of keys (key: value lines)", "model_attributes_type": "a section of keys (key: value lines)",
    }
    if kind in words:
        return words[kind]
    bounds = {"greater_than_equal": ("ge", "a number of at least"), "greater_than": ("gt", "a number above"),
              "less_than_equal": ("le", "a number of at most"), "less_than": ("lt", "a number below")}
    if kind in bounds:
        name, text = bounds[kind]
        return f"{text} {ctx.get(name)}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}" if " or " in str(ctx.get("expected")) else str(ctx.get("expected"))
    message = error["msg"].removeprefix("Value error, ")
    return message[len("Input should be "):] if message.startswith("Input should be ") else message


def _path(loc: tuple) -> str:
    """A dotted key; list items as [i]; union members' tags (``constrained-int``, ``list[str]``) left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
    return out or "<top level>"


def _known_keys(loc: tuple) -> list[str]:
    """The keys the section holding ``loc``'s last part accepts (for "did you mean")."""
    import typing

    cls: Any = TrainConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [inner for c in list(candidates) for inner in typing.get_args(c)]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _origin_of(path: str, origins: Mapping[str, str]) -> str:
    """`` (from --set KEY=VALUE)`` when an override set the key (or a key inside it), else empty."""
    found = [k for k in origins if path == k or path.startswith((k + ".", k + "[")) or k.startswith(path + ".")]
    return f" (from {origins[max(found, key=len)]})" if found else ""


def describe_errors(exc: ValidationError, origins: Mapping[str, str] | None = None) -> list[str]:
    """One sentence per invalid key: the key, the value, where it came from when an override set it,
    and what was expected. Errors of one key (a union's members) become one line."""
    import difflib

    origins = origins or {}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        grouped.setdefault(_path(error["loc"]), []).append(error)
    lines = []
    for path, errors in grouped.items():
        first, origin = errors[0], _origin_of(path, origins)
        kinds = {e["type"] for e in errors}
        if "extra_forbidden" in kinds:
            known = _known_keys(first["loc"])
            close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            where = origin or f" (value {first['input']!r})"
            lines.append(f"{path}: not a key lawtune knows{where}{hint}")
        elif "missing" in kinds:
            lines.append(f"{path}: missing; a value is required{origin}")
        elif kinds == {"value_error"} and isinstance(first.get("input"), dict):
            # A section's own rule (dev_ratio + test_ratio, a mapping's roles): its message is a sentence.
            lines.append(f"{path}: {first['msg'].removeprefix('Value error, ')}{origin}")
        else:
            value = first.get("input")
            shown = repr(value) if not isinstance(value, dict) else "a section of keys"
            wanted = " or ".join(dict.fromkeys(expectation(e) for e in errors))
            lines.append(f"{path}: got {shown}{origin}; expected {wanted}")
    return lines


def format_validation_error(source: str | None, exc: ValidationError, origins: Mapping[str, str] | None = None) -> str:
    lines = describe_errors(exc, origins)
    count = f"{len(lines)} invalid setting{'s' if len(lines) != 1 else ''}"
    head = f"{source}: {count}:" if source else f"{count}:"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def parse_config(data: Any, source: str | None = None, origins: Mapping[str, str] | None = None) -> TrainConfig:
    """``data`` validated; ``source`` (the file) and ``origins`` (key -> the override that set it) label errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'the config'}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, origins)) from None


def load_config(path: str | Path | None, *, base_model: str | None = None, overrides: Sequence[str] = (),
                env: Mapping[str, str] | None = None) -> TrainConfig:
    """Load and validate a YAML config; ``None`` gives the embedded defaults.

    On top of the file, in rising precedence: ``overrides`` (``KEY=VALUE`` with dotted keys,
    the value read as YAML: ``training_args.max_steps=20``), ``LAWTUNE_BASE_MODEL`` from ``env``,
    then ``base_model``. ``config.origin(key)`` says which one set a key; an invalid value names it.
    """
    data = _read_yaml(path) if path is not None else {}
    labels: dict[str, str] = {}  # dotted key -> the override that set it
    for assignment in overrides:
        labels[_assign(data, assignment)] = f"--set {assignment.strip()}"
    env_model = (env or {}).get(BASE_MODEL_ENV, "").strip()
    for value, name in ((env_model, BASE_MODEL_ENV), ((base_model or "").strip(), "--base-model")):
        if value:
            data["base_model"] = value
            labels["base_model"] = name
    config = parse_config(data, str(path) if path is not None else None, labels)
    config._origins = {key.split(".")[0]: "--set" if label.startswith("--set") else label for key, label in labels.items()}
    return config


BASE_MODEL_ENV = "LAWTUNE_BASE_MODEL"


def _same_model(a: str, b: str) -> bool:
    """The same model reference: equal text, or two spellings of one local directory."""
    a, b = a.strip().rstrip("/"), b.strip().rstrip("/")
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def _assign(data: dict[str, Any], assignment: str) -> str:
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. training_args.max_steps=20")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parents[: depth + 1])} is a value, not a section of keys")
        node = child
    node[leaf] = value
    return key


# What --base-model means for a command: the model to fine-tune, or the one its adapter must have been trained on.
_BASE_MODEL_HELP = {
    "override": f"the base model, overriding the config's base_model and {BASE_MODEL_ENV}: a Hugging Face id, s3:// URI, "
                "local directory or bundled:<name>",
    "expect": "the base model the adapter must have been trained on; default: the one finetune recorded, which is always "
              f"the one used. Another one ({BASE_MODEL_ENV} and --set base_model=... count the same) is refused with exit 2",
    "unused": "accepted as by every stage, checked like the rest of the config; this stage reads no model",
}


def add_config_arguments(parser: "argparse.ArgumentParser", required: bool = False, *, reads: str = "every section",
                         base_model: Literal["override", "expect", "unused"] = "override") -> None:
    """``--config``, ``--base-model`` and ``--set``: the arguments every stage and ``lawtune train`` share,
    read by ``config_from_args``. ``reads`` names what the command uses of the config, ``base_model``
    what its --base-model does (``TrainConfig.expect_base_model`` for "expect")."""
    default = "" if required else "; without it, the built-in defaults"
    parser.add_argument("--config", required=required, metavar="YAML",
                        help=f"training config (configs/*.yaml); this command reads {reads}{default}")
    parser.add_argument("--base-model", metavar="MODEL", help=_BASE_MODEL_HELP[base_model])
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, dotted, the value read as YAML (repeatable): --set training_args.max_steps=20",
    )


def config_from_args(args: "argparse.Namespace") -> TrainConfig:
    return load_config(args.config, base_model=args.base_model, overrides=args.set, env=os.environ)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: not valid YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data
