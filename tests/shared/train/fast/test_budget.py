"""shared/train/fast/budget.py: the token-budget search, its cache, and the exit-2 refusal.

The search and the refusal are exercised with a memory limit that stands in for the GPU (no
GPU here): ``fits(n)`` is "n tokens fit" for a made-up card, and ``trial_step`` is replaced by
a counter of that predicate, so the test can also see that the cache saves the trials. The
real trial step (forward + backward of the prepared model on a CUDA card) is the gpu-marked
test at the end, run through the device tool.
"""

from __future__ import annotations

import pytest
import torch

from shared.core.config import parse_config
from shared.core.errors import ConfigError
from shared.train.fast import budget
from shared.train.fast.budget import STEP, largest_fitting


@pytest.mark.parametrize("limit", [1024, 3000, 4096, 5000, 12_288, 100_000, 262_144, 10**9])
def test_largest_fitting_finds_the_largest_multiple_under_the_limit(limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    expected = min(limit, budget.CAP) // STEP * STEP
    assert largest_fitting(fits) == expected
    assert len(tried) <= 20, "doubling then bisection, not a linear scan"


def test_nothing_fits_is_none():
    assert largest_fitting(lambda n: False) is None


def config(tokens):
    return parse_config({"max_input_length": 32, "max_output_length": 16,
                         "training_args": {"fast_path": "on", "tokens_per_batch": tokens},
                         "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})


def test_config_takes_auto_an_int_or_nothing_and_refuses_other_words():
    assert config("auto").training_args.tokens_per_batch == "auto"
    assert config(2048).training_args.tokens_per_batch == 2048
    with pytest.raises(ConfigError, match="tokens_per_batch"):
        config("max")
    with pytest.raises(ConfigError, match="tokens_per_batch"):
        config(8)


class FakeCard:
    """A 'GPU' whose step fits up to ``limit`` tokens; counts the trial steps."""

    def __init__(self, monkeypatch, limit):
        self.limit, self.trials = limit, 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: type("P", (), {"name": "Fake 24GB", "total_memory": 24 * 2**30})())
        monkeypatch.setattr(budget, "trial_step", self.trial)

    def trial(self, model, tokens, example_len):
        self.trials += 1
        return tokens <= self.limit, 0


@pytest.fixture
def model(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_model_dir

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "model"))
    return m


def test_auto_searches_once_then_reads_the_cache(monkeypatch, model, tmp_path):
    card = FakeCard(monkeypatch, limit=13_000)
    monkeypatch.setattr(budget, "_on_cuda", lambda m: True)
    got = budget.resolve_token_budget(model, config("auto"), tmp_path / "cache")
    assert got == 12_288 and card.trials > 0
    first = card.trials
    assert budget.resolve_token_budget(model, config("auto"), tmp_path / "cache") == 12_288
    assert card.trials == first, "the second run on the same card/model/config reads the cache"
    # another config (here: FP8 off) is another entry
    other = config("auto")
    other.training_args.fp8 = "off"
    budget.resolve_token_budget(model, other, tmp_path / "cache")
    assert card.trials > first


def test_explicit_budget_that_does_not_fit_exits_2_naming_the_largest_that_does(monkeypatch, model, tmp_path):
    FakeCard(monkeypatch, limit=9_000)
    monkeypatch.setattr(budget, "_on_cuda", lambda m: True)
    assert budget.resolve_token_budget(model, config(8192), tmp_path / "c") == 8192
    with pytest.raises(ConfigError, match=r"tokens_per_batch: 16384 does not fit Fake 24GB \(24 GiB\): the largest "
                                          r"budget whose training step fits is 8192"):
        budget.resolve_token_budget(model, config(16384), tmp_path / "c")


@pytest.mark.gpu
def test_auto_budget_on_a_real_gpu_trains_and_an_oversized_budget_is_refused(tmp_path):
    """Run on the device machine: real trial steps on a config-initialised model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run through the device tool (pytest -m gpu)")
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import precision
    from tests.tiny import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model", arch="qwen2", hidden=1024, layers=8)
    cfg = config("auto")
    hooks = training_hooks(cfg, "cuda", tmp_path / "cache")
    m = hooks.prepare_model(model_dir, cfg, precision(cfg))
    largest = budget.resolve_token_budget(m, cfg, tmp_path / "cache")
    print(f"auto budget on {torch.cuda.get_device_name()}: {largest}")
    assert largest >= 4096
    with pytest.raises(ConfigError, match=f"the largest budget whose training step fits is {largest}"):
        budget.resolve_token_budget(m, config(largest * 4 + STEP), tmp_path / "cache")
