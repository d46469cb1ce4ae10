"""shared/data/inputs.py: PATH:WEIGHT, the config's inputs, folder digests."""

import pytest

from shared.core.config import parse_config
from shared.core.errors import ConfigError
from shared.data.inputs import InputSpec, input_digest, input_specs, parse_input


@pytest.mark.parametrize(
    "text, spec",
    [
        pytest.param("a.csv", InputSpec("a.csv"), id="plain"),
        pytest.param("a.csv:0.5", InputSpec("a.csv", 0.5), id="weight"),
        pytest.param("s3://b/k.jsonl:3", InputSpec("s3://b/k.jsonl", 3.0), id="uri-weight"),
        pytest.param("s3://b/k.jsonl", InputSpec("s3://b/k.jsonl"), id="uri"),
        pytest.param("a.csv:.5", InputSpec("a.csv", 0.5), id="leading-dot"),
        pytest.param("s3://b/2024:01.csv", InputSpec("s3://b/2024:01.csv"), id="uri-key-with-a-colon"),
    ],
)
def test_parse_input(text, spec):
    assert parse_input(text) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("file:abc", "--input file:abc: the weight 'abc' is not a number, and no file file:abc exists; "
                     "PATH:WEIGHT takes a number above 0, e.g. file:0.5", id="not-a-number"),
        pytest.param("a.csv:-1", "--input a.csv:-1: the weight -1 is not above 0", id="negative"),
        pytest.param("a.csv:nan", "--input a.csv:nan: the weight nan is not above 0", id="nan"),
        pytest.param("s3://b/k.csv:0", "--input s3://b/k.csv:0: the weight 0 is not above 0", id="uri-zero"),
    ],
)
def test_a_bad_weight_says_the_weight_is_bad(text, message):
    with pytest.raises(ConfigError) as info:
        parse_input(text)
    assert str(info.value).startswith(message)


def test_an_existing_file_with_a_colon_is_never_split(tmp_path):
    path = tmp_path / "export:2"
    path.write_text("title,reply\n")
    assert parse_input(str(path)) == InputSpec(str(path))


def test_a_zero_weight_is_refused():
    with pytest.raises(ConfigError, match="the weight 0 is not above 0"):
        parse_input("a.csv:0")


def test_cli_inputs_win_over_the_configs():
    cfg = parse_config({"preprocess": {"inputs": [{"path": "c.csv", "weight": 2}]}}).preprocess
    assert input_specs(["a.csv"], cfg) == [InputSpec("a.csv")]
    assert input_specs(None, cfg) == [InputSpec("c.csv", 2.0)]


def test_a_folder_digest_changes_with_any_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.arrow").write_bytes(b"1")
    before = input_digest(tmp_path / "d")
    (tmp_path / "d" / "x.arrow").write_bytes(b"2")
    assert input_digest(tmp_path / "d") != before
