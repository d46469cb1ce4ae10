"""Every answer evaluate generated, with the keys under which a later evaluation may reuse it.

``answers.jsonl`` (one row per model and question, test split and golden set) is what the gate,
the parity check and the next run read. A row's answer is reused instead of generated again
when all three keys match:

- ``model``: what answered, by content. The base model is ``base:<sha256 of its weights>``
  (finetune records it); base + adapter is ``adapter:<base sha256>:<digest of the adapter files'
  sha256>``, so a second run that trained the same adapter bit for bit reuses every answer. A published
  version is the model its run evaluated as the candidate (the parity check verifies that the
  merged folder answers as evaluated), so production's answers are that run's candidate rows.
- ``decoding``: the generation settings, the prompt budget, and the engine's name, version,
  dtype, device, seed and batch size (greedy answers are byte-identical across repeated runs of one engine
  configuration on CPU; another engine or dtype can change them).
- ``prompt``: the sha256 of the prompt's token ids after the chat template, so another template
  or tokenizer never reuses an answer.

On the second ``make train`` with the same data the base and production answers all come from
the production version's own evaluation, and only the candidate is generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from shared.core.config import GenerationConfig
from shared.evaluate.generation import Answer, Engine

log = logging.getLogger(__name__)

ANSWERS = "answers.jsonl"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def prompt_key(ids: Sequence[int]) -> str:
    return _digest(list(ids))


def decoding_key(gen: GenerationConfig, max_input_length: int, engine: Engine) -> str:
    settings = {"generation": gen.model_dump(mode="json"), "max_input_length": max_input_length, "engine": engine.name,
                "version": engine.version, "dtype": engine.dtype, "seed": engine.seed, "batch_size": engine.batch_size, "device": engine.device}
    return _digest(settings)


def base_key(base_digest: str) -> str:
    return f"base:{base_digest}"


def adapter_key(base_digest: str, adapter_files: dict[str, str], adapter_dir: Path | None = None) -> str:
    """``adapter_files``: the adapter's files and their sha256 (from the finetune manifest). Two runs that
    trained bit-identical adapters (same data, config and seed on the same kind of machine) share a key.
    With ``adapter_dir``, adapter_config.json counts by its content: peft writes ``target_modules`` from
    a set, in an order that changes from one process to the next while the weights stay bit-identical."""
    files = dict(adapter_files)
    config = adapter_dir / "adapter_config.json" if adapter_dir is not None else None
    name = next((k for k in files if k.endswith("adapter_config.json")), None)
    if config is not None and name is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        files[name] = "canonical:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()
    return f"adapter:{base_digest}:{_digest(files)}"


@dataclass(frozen=True)
class Row:
    role: str  # base | candidate | production
    model: str
    decoding: str
    prompt: str
    set: str  # test | golden
    id: str
    text: str
    tokens: int
    ended: bool
    reused_from: str | None = None  # the evaluate artifact the answer came from, when reused

    def answer(self) -> Answer:
        return Answer(self.text, self.tokens, self.ended)


def write(path: Path, rows: Iterable[Row]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def read(text: str) -> list[Row]:
    return [Row(**json.loads(line)) for line in text.splitlines() if line.strip()]


class Book:
    """Answers found in earlier evaluations, by (model, decoding, prompt)."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, str, str], tuple[Answer, str]] = {}

    def add(self, rows: Iterable[Row], source: str) -> None:
        for row in rows:
            self._found.setdefault((row.model, row.decoding, row.prompt), (row.answer(), row.reused_from or source))

    def __len__(self) -> int:
        return len(self._found)

    def lookup(self, model: str, decoding: str, prompts: Sequence[str]) -> list[tuple[Answer, str] | None]:
        """For each prompt key: (the answer, the artifact it came from), or None when none matches."""
        return [self._found.get((model, decoding, p)) for p in prompts]
