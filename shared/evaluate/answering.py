"""Who answers which question, and whether an earlier evaluation already holds the answer.

Evaluate needs the answers of up to three models (base, candidate = base + adapter,
production = the PROMOTED version) to the same rendered prompts. ``collect`` looks each one up
in the answers of earlier evaluations (shared/evaluate/answers.py: the same model, decoding
settings, engine and prompt tokens), generates only what is missing, in one engine session
for base and candidate, and returns every answer with where it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from shared.core.config import EvaluationConfig
from shared.core.settings import Settings
from shared.evaluate import answers as book_of
from shared.evaluate.generation import (
    Answer, Answers, Engine, choose_backend, engine_version, generate, prompt_turns, render_prompts, resolve_dtype,
)
from shared.store.artifacts import find_manifest, read_verified
from shared.store.storage import open_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    set: str  # test | golden
    id: str
    turns: list[dict[str, str]]
    reference: str
    prompt: list[int]  # token ids after the chat template (cut to max_input_length, keeping the end)
    key: str  # answers.prompt_key(prompt)
    truncated: bool = False  # the rendered prompt was longer than max_input_length


@dataclass(frozen=True)
class Model:
    role: str  # base | candidate | production
    key: str  # answers.base_key / adapter_key / a published version's key
    weights: Path | None  # the folder that answers (base model or published version); None: generated elsewhere
    adapter: Path | None = None  # candidate: its adapter on ``weights``


def questions_of(tokenizer, sets: Sequence[tuple[str, list[dict]]], max_input_length: int) -> list[Question]:
    """The questions of each (set name, records), rendered by the chat template; a prompt longer than
    ``max_input_length`` keeps its end (the generation prompt) and is marked truncated."""
    out = []
    for name, records in sets:
        if not records:
            continue
        turns, refs = zip(*(prompt_turns(r["conversations"]) for r in records))
        for r, t, ref, ids in zip(records, turns, refs, render_prompts(tokenizer, list(turns), 10**9)):
            cut = ids[-max_input_length:]
            out.append(Question(name, r["id"], list(t), ref, cut, book_of.prompt_key(cut), len(ids) > max_input_length))
    return out


def add_earlier(book: book_of.Book, settings: Settings, uri: str) -> None:
    """Answers of a committed evaluate artifact at ``uri`` (verified against its manifest), when there is one."""
    loc = open_location(uri, settings)
    manifest = find_manifest(loc)
    if manifest is None or not any(f.path == book_of.ANSWERS for f in manifest.files):
        return
    try:
        book.add(book_of.read(read_verified(loc, book_of.ANSWERS, manifest).decode("utf-8")), uri)
    except Exception as exc:  # noqa: BLE001 - reuse saves time; a bad earlier artifact only means generating again
        log.warning("not reusing answers from %s: %s", uri, exc)


def production_key(settings: Settings, version_uri: str, book: book_of.Book) -> str:
    """The answer key of a published version, merged or adapter: the candidate key of the evaluation that published
    it (its answers join ``book``); a key of the version's own when that evaluation is gone or older than answer keys
    (its manifest's digest, which covers the weights or the adapter's files and, for an adapter, its base's digest)."""
    import json

    version = find_manifest(open_location(version_uri, settings))
    evaluated = ((version.extra.get("lineage") or {}).get("evaluate") or {}).get("uri") if version else None
    if evaluated:
        try:
            metrics = json.loads(read_verified(open_location(evaluated, settings), "metrics.json"))
            key = ((metrics.get("answers") or {}).get("keys") or {}).get("candidate")
            if key:
                add_earlier(book, settings, evaluated)
                return key
        except Exception as exc:  # noqa: BLE001 - production is then answered from its own folder
            log.info("production's evaluation %s gives no answers to reuse (%s)", evaluated, exc)
    return f"published:{version.digest if version else version_uri}"


def planned_engine(ev: EvaluationConfig, seed: int) -> Engine:
    """The engine ``generate`` will use, known before it starts, so stored answers can be looked up first."""
    import torch

    name = choose_backend(ev.backend)
    version = engine_version(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Engine(name, version, resolve_dtype(ev.dtype), device, ev.batch_size if name == "transformers" else None, seed)


def collect(models: Sequence[Model], questions: Sequence[Question], book: book_of.Book, ev: EvaluationConfig, *,
            max_input_length: int, seed: int, trust_remote_code: bool, tokenizer,
            production_weights: Callable[[], tuple[Path, Path | None]] | None = None) -> tuple[dict[str, list[book_of.Row]], Engine]:
    """Rows of answers per role, in question order, reused where found and generated otherwise.

    ``production_weights`` fetches the production version when its answers must be generated
    (called at most once, and only then): (the folder that answers, the adapter on it or None for
    a merged version)."""
    engine = planned_engine(ev, seed)
    decoding = book_of.decoding_key(ev.generation, max_input_length, engine)
    keys = [q.key for q in questions]
    rows: dict[str, list[book_of.Row | None]] = {}
    for model in models:
        found = book.lookup(model.key, decoding, keys)
        rows[model.role] = [None if hit is None else _row(model, decoding, q, hit[0], hit[1]) for q, hit in zip(questions, found)]
        reused = sum(r is not None for r in rows[model.role])
        if reused:
            log.info("%s: %d of %d answers reused from earlier evaluations", model.role, reused, len(questions))

    by_role = {m.role: m for m in models}
    pending = {role: [i for i, r in enumerate(found) if r is None] for role, found in rows.items()}
    used = engine
    base, cand = by_role.get("base"), by_role.get("candidate")
    if base and cand and pending["base"] and pending["base"] == pending.get("candidate"):
        # The usual first run: both models on the same prompts, one model load.
        got = _generate(cand, pending["base"], questions, ("base", "tuned"), ev, max_input_length, seed, trust_remote_code, tokenizer)
        used = got.engine
        _fill(rows, base, pending["base"], questions, got.base_answers, got.engine, ev, max_input_length)
        _fill(rows, cand, pending["candidate"], questions, got.tuned_answers, got.engine, ev, max_input_length)
    else:
        for model, side in ((base, "base"), (cand, "tuned")):
            if model and pending[model.role]:
                got = _generate(model, pending[model.role], questions, (side,), ev, max_input_length, seed, trust_remote_code,
                                tokenizer)
                used = got.engine
                _fill(rows, model, pending[model.role], questions, got.base_answers if side == "base" else got.tuned_answers,
                      got.engine, ev, max_input_length)
    prod = by_role.get("production")
    if prod and pending["production"]:
        log.info("generating the production model's answers to %d question(s)", len(pending["production"]))
        weights, adapter = production_weights() if production_weights else (prod.weights, prod.adapter)
        # A merged version answers alone; an adapter version (serving.mode=adapters) as its adapter on its base.
        side = "tuned" if adapter is not None else "base"
        got = _generate(replace(prod, weights=weights, adapter=adapter), pending["production"], questions, (side,), ev,
                        max_input_length, seed, trust_remote_code, tokenizer)
        used = got.engine
        _fill(rows, prod, pending["production"], questions, got.tuned_answers if adapter is not None else got.base_answers,
              got.engine, ev, max_input_length)
    return {role: [r for r in found if r is not None] for role, found in rows.items()}, used


def _generate(model: Model, indices: list[int], questions: Sequence[Question], sides, ev: EvaluationConfig,
              max_input_length: int, seed: int, trust_remote_code: bool, tokenizer) -> Answers:
    log.info("generating answers of %s to %d question(s)", " and ".join(model.role if s == "tuned" else "base" if model.adapter else model.role for s in sides),
             len(indices))
    return generate(model.weights, model.adapter, [questions[i].prompt for i in indices], ev.generation, tokenizer, sides=sides,
                    backend=ev.backend, batch_size=ev.batch_size, max_input_length=max_input_length, seed=seed,
                    trust_remote_code=trust_remote_code, dtype=ev.dtype)


def _fill(rows, model: Model, indices: list[int], questions: Sequence[Question], got: list[Answer], engine: Engine,
          ev: EvaluationConfig, max_input_length: int) -> None:
    decoding = book_of.decoding_key(ev.generation, max_input_length, engine)
    for i, answer in zip(indices, got):
        rows[model.role][i] = _row(model, decoding, questions[i], answer, None)


def _row(model: Model, decoding: str, q: Question, answer: Answer, source: str | None) -> book_of.Row:
    return book_of.Row(model.role, model.key, decoding, q.key, q.set, q.id, answer.text, answer.tokens, answer.ended, source)
