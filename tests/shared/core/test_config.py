"""shared/core/config.py: the YAML training config — strict, every error at once, ChatGLM3 keys accepted."""

from pathlib import Path

import pytest

from shared.core.config import PreprocessConfig, TrainConfig, load_config, parse_config
from shared.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))

# The ChatGLM3 finetune_demo's configs/lora.yaml, as its users have it (tests/fixtures/chatglm3/README.md).
CHATGLM3_LORA = REPO / "tests" / "fixtures" / "chatglm3" / "lora.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_is_headed_by_its_command(path):
    assert isinstance(load_config(path), TrainConfig)
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "each config opens with the command that runs it"


def test_chatglm3_lora_yaml_loads_unchanged():
    config = load_config(CHATGLM3_LORA)
    assert config.data_config.train_file == "train.json" and config.data_config.val_file == "dev.json"
    assert (config.max_input_length, config.max_output_length) == (256, 512)
    assert config.training_args.learning_rate == pytest.approx(5e-5)  # YAML 1.1 reads "5e-5" as a string
    assert (config.training_args.max_steps, config.training_args.save_steps, config.training_args.eval_steps) == (3000, 500, 500)
    assert config.training_args.per_device_train_batch_size == 4
    assert (config.peft_config.r, config.peft_config.lora_alpha, config.peft_config.lora_dropout) == (8, 32, 0.1)


def test_every_error_is_reported_at_once_with_key_value_and_expectation(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "max_input_length: 2\n"
        "training_args:\n  learning_rate: fast\n  max_stepz: 10\n"
        "peft_config:\n  r: 0\n"
        "preprocess:\n  dev_ratio: 0.6\n  test_ratio: 0.5\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 5 invalid settings:")
    assert message.splitlines()[1:] == [
        "  - max_input_length: got 2; expected a number of at least 8",
        "  - preprocess: dev_ratio + test_ratio = 1.1; expected less than 1 (train must keep rows)",
        "  - training_args.learning_rate: got 'fast'; expected a number",
        "  - training_args.max_stepz: not a key lawtune knows (value 10); did you mean max_steps?",
        "  - peft_config.r: got 0; expected a number of at least 1",
    ]


@pytest.mark.parametrize(
    "assignment, line",
    [
        pytest.param("training_args.max_steps=abc",
                     "training_args.max_steps: got 'abc' (from --set training_args.max_steps=abc); expected a whole number", id="int"),
        pytest.param("training_args.tokens_per_batch=x", "training_args.tokens_per_batch: got 'x' (from --set "
                     "training_args.tokens_per_batch=x); expected a whole number or 'auto'", id="union-one-line"),
        pytest.param("training_args.fp8=fast", "training_args.fp8: got 'fast' (from --set training_args.fp8=fast); "
                     "expected one of 'auto', 'on' or 'off'", id="literal"),
        pytest.param("training_args=5", "training_args: got 5 (from --set training_args=5); expected a section of keys "
                     "(key: value lines)", id="section"),
        pytest.param("peft_config.lora_alpha=0", "peft_config.lora_alpha: got 0 (from --set peft_config.lora_alpha=0); "
                     "expected a number of at least 1", id="bound"),
        pytest.param("preprocess.columns.title=问题", "preprocess.columns: maps no column to reply; expected at least title "
                     "and reply (from --set preprocess.columns.title=问题)", id="rule-inside-a-section"),
        pytest.param("evaluation.gate.rules=[{min: 1}]", "evaluation.gate.rules[0].metric: missing; a value is required "
                     "(from --set evaluation.gate.rules=[{min: 1}])", id="missing"),
        pytest.param("peft_config.lora_alpah=4", "peft_config.lora_alpah: not a key lawtune knows (from --set "
                     "peft_config.lora_alpah=4); did you mean lora_alpha?", id="unknown-key"),
    ],
)
def test_a_bad_override_reads_as_a_sentence_naming_the_set_it_came_from(assignment, line):
    """No pydantic wording ("Input should be..."), no <defaults> label: the line names the --set."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=[assignment])
    assert str(info.value).splitlines() == ["1 invalid setting:", f"  - {line}"]
    assert "Input should" not in str(info.value) and "<defaults>" not in str(info.value)


def test_a_fields_own_rule_reads_as_got_and_expected():
    with pytest.raises(ConfigError) as info:
        parse_config({"data_config": {"train_file": "../train.json"}})
    assert str(info.value).splitlines()[1].startswith(
        "  - data_config.train_file: got '../train.json'; expected a plain file name such as train.json")


def test_a_file_value_overridden_by_set_is_labelled_and_a_file_value_is_not(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("peft_config:\n  r: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["training_args.max_steps=-1"])
    assert str(info.value).splitlines() == [
        f"{path}: 2 invalid settings:",
        "  - training_args.max_steps: got -1 (from --set training_args.max_steps=-1); expected a number of at least 1",
        "  - peft_config.r: got 0; expected a number of at least 1",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("a: [1,\n", "not valid YAML at line", id="yaml-syntax"),
        pytest.param("- just\n- a list\n", "expected a mapping", id="not-a-mapping"),
        pytest.param(b"\xff\xfe\x00bad", "not UTF-8", id="not-utf8"),
    ],
)
def test_unreadable_configs_name_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == TrainConfig()


def test_section_digest_changes_only_with_its_section():
    base = TrainConfig()
    assert base.section_digest("preprocess") == parse_config({"training_args": {"max_steps": 7}}).section_digest("preprocess")
    assert base.section_digest("preprocess") != parse_config({"preprocess": {"dev_ratio": 0.2}}).section_digest("preprocess")


@pytest.mark.parametrize(
    "values, message",
    [
        pytest.param({"min_answer_chars": 50, "max_answer_chars": 10}, "min_answer_chars must not exceed", id="answer-limits"),
        pytest.param({"min_question_chars": 9, "max_question_chars": 3}, "min_question_chars must not exceed", id="question-limits"),
        pytest.param({"dev_ratio": -0.1}, "expected a number of at least 0", id="negative-ratio"),
    ],
)
def test_preprocess_section_rules(values, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"preprocess": values})
    with pytest.raises(ValueError):
        PreprocessConfig(**values)
