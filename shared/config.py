"""The training config (YAML), validated by pydantic with ``extra="forbid"``.

Key names follow the ChatGLM3 finetune_demo ``lora.yaml`` where they overlap
(``data_config``, ``max_input_length``, ``max_output_length``, ``training_args``,
``peft_config``), so a config from that demo loads here; keys the demo has that mean nothing
to us (``num_proc``, ``predict_with_generate``…) are accepted and ignored. Every problem is
reported at once, each naming the key, the value found and what was expected.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(_Strict):
    train_file: str = "train.jsonl"
    val_file: str = "dev.jsonl"
    test_file: str = "test.jsonl"
    num_proc: int | None = Field(default=None, description="Accepted from ChatGLM3 configs; unused.")


class PreprocessConfig(_Strict):
    """Cleaning limits and the deterministic split."""

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


class TrainingArgs(_Strict):
    output_dir: str | None = Field(default=None, description="Accepted from ChatGLM3 configs; the artifact store decides.")
    max_steps: int = Field(default=100, ge=1)
    num_train_epochs: float | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=5e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler_type: str = "cosine"
    per_device_train_batch_size: int = Field(default=4, ge=1)
    per_device_eval_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    save_steps: int = Field(default=50, ge=1)
    eval_steps: int = Field(default=50, ge=1)
    logging_steps: int = Field(default=10, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    packing: bool = False
    bf16: bool | None = Field(default=None, description="None = bf16 on a GPU that has it, fp32 on CPU.")
    seed: int = 42
    dataloader_num_workers: int = Field(default=0, ge=0)
    # Accepted from ChatGLM3/transformers configs so they load unchanged; the job decides these.
    remove_unused_columns: bool | None = None
    save_strategy: str | None = None
    log_level: str | None = None
    logging_strategy: str | None = None
    evaluation_strategy: str | None = None
    eval_strategy: str | None = None
    predict_with_generate: bool | None = None
    generation_config: GenerationConfig | None = None
    use_cpu: bool | None = None


class PeftConfig(_Strict):
    peft_type: Literal["LORA"] = "LORA"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


class GateRule(_Strict):
    metric: str
    min: float | None = Field(default=None, description="Absolute minimum of the tuned model's score.")
    min_improvement: float | None = Field(default=None, description="Minimum of tuned minus base.")

    @model_validator(mode="after")
    def _one_threshold(self) -> "GateRule":
        if self.min is None and self.min_improvement is None:
            raise ValueError(f"gate rule for {self.metric!r} sets neither 'min' nor 'min_improvement'")
        return self


class EvaluationConfig(_Strict):
    max_examples: int | None = Field(default=None, ge=1, description="Evaluate at most this many test rows.")
    batch_size: int = Field(default=8, ge=1)
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    report_samples: int = Field(default=10, ge=0, description="Rows of the side-by-side table in the report.")
    gate: list[GateRule] = Field(default_factory=list)


class TrainConfig(_Strict):
    """One model × recipe. See configs/ for annotated examples."""

    base_model: str = "bundled:smollm2-135m-instruct"
    seed: int = 42
    max_input_length: int = Field(default=512, ge=8)
    max_output_length: int = Field(default=512, ge=8)
    data_config: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    peft_config: PeftConfig = Field(default_factory=PeftConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def section_digest(self, *names: str) -> str:
        """Digest of the sections a stage depends on, so editing one stage's keys re-runs only it."""
        dumped = self.model_dump(mode="json")
        return hashlib.sha256(repr([(n, dumped[n]) for n in names]).encode()).hexdigest()


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (value {error['input']!r}); expected one of the documented keys"
    if kind == "missing":
        return f"{key}: missing; {error['msg'].lower()}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{…}"
    return f"{key}: got {shown}, expected {error['msg'].removeprefix('Value error, ')}"


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {len(exc.errors())} invalid setting(s):"]
    lines += [f"  - {_describe(e)}" for e in exc.errors()]
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> TrainConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_config(path: str | Path | None) -> TrainConfig:
    """Load and validate a YAML config; ``None`` gives the embedded defaults."""
    if path is None:
        return TrainConfig()
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
    return parse_config(data, str(path))
