"""The preprocess pipeline, streaming: rows → cleaned candidates → one per question → splits.

Pass 1: the parent cuts the file into pieces of whole records (``Source.chunks``: counting
only, no parsing) and worker processes parse, clean and check them; rejects go to
``rejected.jsonl`` and candidates are spilled to hash buckets on disk, in file order. A
file whose stray quotes defeat the cutting is detected and parsed by the parent instead
(``Source.rows``), with the same result. Pass 2: each bucket is grouped on its own
(``dedup.resolve`` keeps one row per question) and written to per-bucket split files, which
are finally concatenated in bucket order. Memory is bounded by a few pieces and one bucket
per worker, never by the file; the output is the same for any number of workers.

Several inputs (``--input a.csv --input b.jsonl``) run pass 1 one after another into the same
buckets, so a question asked in two inputs is kept once (the earlier input wins a tie). An
input's sampling ``weight`` below 1 keeps that share of its questions (a hash of the
question decides, so reruns keep the same ones); above 1 its train examples are written
``weight`` times (the fraction by the same hash); dev and test never repeat. ``report.json``
counts every input on its own under ``sources``.

lawzhidao rows become a conversation like this: the user turn is the title, plus the
``question`` field on a new line when it adds detail (it is neither empty, nor the title
again, nor contained in it; when it already contains the title it replaces it); the
assistant turn is the reply. The row's identity (dedup and split) is that user turn's, as in every
other shape, so the replies to one question must repeat its title and detail (a Zhidao export
does); a row with the same title and another detail is another question. ``system_prompt`` from
the config, when set, is prepended to every conversation that has no system turn of its own.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import heapq
import io
import json
import logging
import marshal
import os
import shutil
import statistics
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

from shared.data.export import export_rejected_csv
from shared.data.cleaning import clean_text, length_problem
from shared.core.config import PreprocessConfig
from shared.data.conversation import SchemaError, dumps, normalise_key, question_key, validate
from shared.data.dedup import Candidate, bucket_of, buckets_for, parse_flag, read_groups, resolve, spill_record
from shared.core.errors import DataError
from shared.core.log import progress
from shared.data.readers import BadRow, CannotCut, ChatRow, CsvRow, Source, csv_records, jsonl_records
from shared.data.shapes import CHAT, Layout
from shared.data.split import SPLITS, assign, split_point_bytes, top_up

log = logging.getLogger(__name__)
BATCH_ROWS = 2000  # rows per batch when the parent parses (the fallback)
PIECE_CHARS = 1 << 20  # characters per piece when workers parse
SMALL_INPUT = 8 << 20  # below this, worker processes cost more than they save
MAX_WORKERS = 8  # one parent feeds them; beyond this it cannot keep up


@dataclass(frozen=True)
class Context:
    """What a worker needs to know; small and picklable."""

    cfg: PreprocessConfig
    source_name: str
    fmt: str
    header: list[str] | None
    columns: dict[str, int] | None
    buckets: int
    spill: str
    layout: Layout = CHAT
    source: int = 0  # the input being read (pass 1)
    inputs: tuple[tuple[str, tuple[str, ...] | None, float], ...] = ()  # every input's (name, header, weight)

    def for_source(self, index: int) -> "Context":
        """This context as seen from input ``index`` (pass 2 reports rows of every input)."""
        if not self.inputs or (index == self.source and self.source_name):
            return self
        name, header, _ = self.inputs[index]
        return replace(self, source_name=name, header=list(header) if header else None, source=index)

    def weight(self, index: int) -> float:
        return self.inputs[index][2] if self.inputs else 1.0


def compose_user(title: str, question: str, title_key: str | None = None) -> str:
    if not question:
        return title
    if not title:
        return question
    t = normalise_key(title) if title_key is None else title_key
    q = normalise_key(question)
    if q in t:
        return title
    if t in q:
        return question
    return f"{title}\n{question}"


def _candidate(
    cfg: PreprocessConfig, key: str, flag: bool, line: int, turns: list[dict[str, str]], raw: Any, source: int = 0
) -> Candidate:
    key_bytes = key.encode("utf-8")
    digest = hashlib.blake2b(key_bytes, digest_size=8).digest()
    question = answer = 0
    for turn in turns:
        if turn["role"] == "user":
            question += len(turn["content"])
        elif turn["role"] == "assistant":
            answer += len(turn["content"])
    record = dumps({"id": digest.hex(), "conversations": turns}).encode("utf-8")
    u = split_point_bytes(key_bytes, cfg.split_seed)
    return Candidate(key, digest, flag, answer, question, line, u, record, marshal.dumps(raw), source)


def share_point(digest: bytes) -> float:
    """Where a question falls in [0, 1) for sampling weights (independent of the split point)."""
    return int.from_bytes(digest[:4], "little") / 2.0**32


def copies(weight: float, digest: bytes) -> int:
    """How often a train example of an input with ``weight`` >= 1 is written."""
    whole = int(weight)
    return whole + (share_point(digest) < weight - whole)


def from_csv(row: CsvRow, cfg: PreprocessConfig, reply_at: int | None = None, source: int = 0) -> Candidate | tuple[str, str]:
    """A candidate, or ``(reason, detail)`` when the row is rejected.

    ``reply_at``: the reply's column; when cleaning left the reply as it was, the spilled raw
    row holds None there instead of a second copy (``Candidate.raw_row`` restores it).
    """
    flag = parse_flag(row.is_best)
    if flag is None:
        return "invalid_is_best", f"is_best {row.is_best[:40]!r} is not 1/0/true/false/empty"
    title, question, reply = clean_text(row.title), clean_text(row.question), clean_text(row.reply)
    title_key = normalise_key(title)
    user = compose_user(title, question, title_key)
    problem = length_problem(user, "question", cfg.min_question_chars, cfg.max_question_chars) or length_problem(
        reply, "answer", cfg.min_answer_chars, cfg.max_answer_chars
    )
    if problem:
        return problem, f"question {len(user)} chars, answer {len(reply)} chars"
    key = question_key([{"role": "user", "content": user}])  # the identity any other shape gives this user turn
    if not key:
        return "empty_question", "the question is only punctuation"
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if cfg.system_prompt:
        turns.insert(0, {"role": "system", "content": cfg.system_prompt})
    raw = row.raw
    if reply_at is not None and reply == row.reply:
        raw = list(raw)
        raw[reply_at] = None
    return _candidate(cfg, key, flag, row.line, turns, raw, source)


def from_chat(row: ChatRow, cfg: PreprocessConfig, source: int = 0) -> Candidate | tuple[str, str]:
    turns = [{"role": t["role"], "content": clean_text(t["content"])} for t in row.turns]
    turns = [t for t in turns if t["role"] != "system" or t["content"]]
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()  # a trailing question without an answer teaches nothing
    if not any(t["role"] == "assistant" for t in turns):
        return "empty_answer", "no assistant turn"
    try:
        validate(turns)
    except SchemaError as exc:
        return "bad_turn_order", str(exc)
    for turn in turns:
        if turn["role"] == "user":
            problem = length_problem(turn["content"], "question", cfg.min_question_chars, cfg.max_question_chars)
        elif turn["role"] == "assistant":
            problem = length_problem(turn["content"], "answer", cfg.min_answer_chars, cfg.max_answer_chars)
        else:
            continue
        if problem:
            return problem, f"a {turn['role']} turn of {len(turn['content'])} chars"
    key = question_key(turns)
    if not key.replace("\n", ""):
        return "empty_question", "the question is only punctuation"
    if cfg.system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": cfg.system_prompt})
    return _candidate(cfg, key, False, row.line, turns, row.raw, source)


def _reject_line(ctx: Context, line: int, reason: str, detail: str, raw: Any) -> str:
    if isinstance(raw, list) and ctx.header and len(raw) == len(ctx.header):
        raw = dict(zip(ctx.header, raw))
    record = {"source": ctx.source_name, "line": line, "reason": reason, "detail": detail, "raw": raw}
    return json.dumps(record, ensure_ascii=False) + "\n"


@contextmanager
def _no_gc():
    """No cyclic GC in the hot loops: they build no cycles, and collection passes over
    millions of short-lived rows cost ~10% of the run."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def convert_batch(ctx: Context, batch: list | tuple[int, str]) -> tuple[dict[int, bytes], bytes, Counter, int] | None:
    """Pass 1 on a batch (parsed rows, or a ``(first line, text)`` piece to parse here):
    spill bytes per bucket, reject lines, reasons counted, rows sampled out (weight < 1). None: the piece was cut where
    the file's quoting makes cutting unsafe (see ``Source.chunks``)."""
    with _no_gc():
        if isinstance(batch, tuple):
            first, text = batch
            lines = io.StringIO(text, newline="")
            try:
                if ctx.fmt == "csv":
                    rows = list(csv_records(lines, first - 1, ctx.columns, len(ctx.header), strict=True,
                                            name=ctx.source_name, layout=ctx.layout))
                else:
                    rows = list(jsonl_records(lines, first - 1, name=ctx.source_name, layout=ctx.layout))
            except csv.Error:
                return None
        else:
            rows = batch
        return _convert_batch(ctx, rows)


def _convert_batch(ctx: Context, rows: list) -> tuple[dict[int, bytes], bytes, Counter, int]:
    reply_at = ctx.columns.get("reply") if ctx.columns and ctx.fmt == "csv" else None
    spill: dict[int, list[bytes]] = {}
    rejects: list[str] = []
    reasons: Counter = Counter()
    weight, sampled_out = ctx.weight(ctx.source), 0
    for row in rows:
        if isinstance(row, BadRow):
            made: Any = (row.reason, row.detail)
        elif isinstance(row, CsvRow):
            made = from_csv(row, ctx.cfg, reply_at, ctx.source)
        else:
            made = from_chat(row, ctx.cfg, ctx.source)
        if isinstance(made, Candidate):
            if weight < 1.0 and share_point(made.digest) >= weight:
                sampled_out += 1
                continue
            spill.setdefault(bucket_of(made, ctx.buckets), []).append(spill_record(made))
        else:
            reasons[made[0]] += 1
            rejects.append(_reject_line(ctx, row.line, made[0], made[1], row.raw))
    return {b: b"".join(parts) for b, parts in spill.items()}, "".join(rejects).encode("utf-8"), reasons, sampled_out


@dataclass
class BucketResult:
    counts: dict[str, int]
    reasons: Counter
    question_chars: array
    answer_chars: array
    reserve: list[tuple]  # (u, key, line, input, copies): the train lines nearest the dev band
    by_input: dict[int, Counter]  # per input: kept per split, repeated train lines, rejections by reason


def resolve_bucket(ctx: Context, bucket: int, reserve_size: int) -> BucketResult:
    """Pass 2 on one bucket: keep one row per question, write it to its split's part file."""
    with _no_gc():
        return _resolve_bucket(ctx, bucket, reserve_size)


def _resolve_bucket(ctx: Context, bucket: int, reserve_size: int) -> BucketResult:
    cfg, spill = ctx.cfg, Path(ctx.spill)
    out = {s: open(spill / f"out-{bucket:04d}.{s}.jsonl", "wb") for s in (*SPLITS, "repeat")}
    rejects = open(spill / f"out-{bucket:04d}.rejected.jsonl", "wb")
    result = BucketResult({s: 0 for s in SPLITS}, Counter(), array("l"), array("l"), [], {})
    path = spill / f"bucket-{bucket:04d}.bin"
    try:
        for group in read_groups([path] if path.exists() else []):
            winner, losers = resolve(group)
            for cand, reason in losers:
                result.reasons[reason] += 1
                result.by_input.setdefault(cand.source, Counter())[reason] += 1
                detail = f"same question as line {winner.line}"
                if winner.source != cand.source:
                    detail += f" of {ctx.for_source(winner.source).source_name}"
                rejects.write(_reject_line(ctx.for_source(cand.source), cand.line, reason, detail, cand.raw_row).encode("utf-8"))
            line, u = winner.record, winner.split_u
            split = assign(u, cfg.dev_ratio, cfg.test_ratio)
            out[split].write(line + b"\n")
            result.counts[split] += 1
            kept = result.by_input.setdefault(winner.source, Counter())
            kept[split] += 1
            repeat = copies(ctx.weight(winner.source), winner.digest) if split == "train" else 1
            if repeat != 1:
                out["repeat"].write((line + b"\n") * (repeat - 1))
                kept["repeated"] += repeat - 1
            result.question_chars.append(winner.question_chars)
            result.answer_chars.append(winner.answer_chars)
            if split == "train" and reserve_size:
                item = (-u, winner.key, line, winner.source, repeat)  # max-heap on u keeps the smallest u
                if len(result.reserve) < reserve_size:
                    heapq.heappush(result.reserve, item)
                elif item > result.reserve[0]:
                    heapq.heapreplace(result.reserve, item)
    finally:
        for fh in (*out.values(), rejects):
            fh.close()
        path.unlink(missing_ok=True)
    result.reserve = [(-neg, *rest) for neg, *rest in result.reserve]
    return result


class _Inline(Executor):
    """The executor interface, run in this process (small inputs, one CPU)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _ordered(pool: Executor, fn, ctx: Context, batches: Iterable[list], window: int):
    """``pool.map`` with at most ``window`` batches in flight, so a huge file never queues up whole."""
    pending: deque[Future] = deque()
    for batch in batches:
        pending.append(pool.submit(fn, ctx, batch))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(rows: Iterable, size: int) -> Iterable[list]:
    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a Kubernetes
    limit), which affinity does not show."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def default_workers(input_bytes: int) -> int:
    if input_bytes < SMALL_INPUT:
        return 1
    return min(MAX_WORKERS, available_cpus())


def _stats(values: array) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "count": n,
        "min": ordered[0],
        "p5": ordered[int(0.05 * (n - 1))],
        "median": statistics.median(ordered),
        "mean": round(sum(ordered) / n, 1),
        "p95": ordered[int(0.95 * (n - 1))],
        "max": ordered[-1],
    }


def _append(src, dst) -> None:
    """Append one file to another, in the kernel where it can (the splits can be gigabytes)."""
    dst.flush()
    try:
        remaining = os.fstat(src.fileno()).st_size
        while remaining > 0:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if copied == 0:
                break
            remaining -= copied
    except (AttributeError, OSError):
        shutil.copyfileobj(src, dst, 1 << 20)


def _concatenate(spill: Path, outdir: Path, buckets: int, moved: dict[str, set[bytes]]) -> None:
    gone = moved["dev"] | moved["test"]
    for split in (*SPLITS, "rejected"):
        path = outdir / f"{split}.jsonl"
        # Not "ab": copy_file_range refuses O_APPEND descriptors.
        with open(path, "r+b" if path.exists() else "wb") as dst:
            dst.seek(0, os.SEEK_END)
            # Train's repeats (weights above 1) follow all train parts.
            parts = [(b, split) for b in range(buckets)] + ([(b, "repeat") for b in range(buckets)] if split == "train" else [])
            for bucket, kind in parts:
                part = spill / f"out-{bucket:04d}.{kind}.jsonl"
                with open(part, "rb") as src:
                    if split == "train" and gone:
                        dst.writelines(line for line in src if line.rstrip(b"\n") not in gone)
                    else:
                        _append(src, dst)
                part.unlink()
            if split in moved:
                dst.writelines(line + b"\n" for line in sorted(moved[split]))


def _pool(workers: int) -> Executor:
    if workers > 1:
        try:
            return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        except OSError as exc:  # e.g. no usable /dev/shm for the pool's semaphores
            log.warning("no worker processes (%s); preprocessing in one process", exc)
    return _Inline()


def _pass1(pool: Executor, ctx: Context, source: Source, outdir: Path, *, pieces: bool, window: int) -> tuple[Counter, int]:
    """Read, clean and spill every row of one input; reject lines go to ``rejected.jsonl``.
    Returns the rejections by reason and how many rows its weight sampled out."""
    reasons: Counter = Counter()
    sampled_out = 0
    spill = Path(ctx.spill)
    mode = "ab"  # earlier inputs' rows are already there (build creates the files empty)
    bucket_files = [open(spill / f"bucket-{b:04d}.bin", mode) for b in range(ctx.buckets)]
    try:
        with open(outdir / "rejected.jsonl", mode) as rejected:
            if pieces:
                batches: Iterable = source.chunks(PIECE_CHARS)
            else:
                batches = _batches(source.rows(), BATCH_ROWS)
            results = _ordered(pool, convert_batch, ctx, batches, window)
            for result in progress(results, desc=f"read {source.name}", unit="batch"):
                if result is None:
                    raise CannotCut(f"{source.name}: stray quotes")
                by_bucket, reject_text, batch_reasons, batch_sampled_out = result
                for bucket, data in by_bucket.items():
                    bucket_files[bucket].write(data)
                rejected.write(reject_text)
                reasons.update(batch_reasons)
                sampled_out += batch_sampled_out
    finally:
        for fh in bucket_files:
            fh.close()
    return reasons, sampled_out


def _sizes(paths: list[Path]) -> list[int]:
    return [p.stat().st_size if p.exists() else 0 for p in paths]


def _truncate(paths: list[Path], sizes: list[int]) -> None:
    for path, size in zip(paths, sizes):
        with open(path, "r+b") as fh:
            fh.truncate(size)


def _source_info(source: Source, input_bytes: int) -> dict[str, Any]:
    return {"name": source.name, "format": source.format, "encoding": source.encoding, "bytes": input_bytes}


def build(
    sources: Source | list[Source], outdir: Path, spill: Path, cfg: PreprocessConfig, input_bytes: int | list[int],
    *, workers: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the splits, ``rejected.jsonl`` and ``report.json`` into ``outdir``; return the report.

    ``sources`` are read in order (one input, or several with ``weight`` attributes);
    ``input_bytes`` is each one's size (or their total), which sizes buckets and workers."""
    sources = [sources] if not isinstance(sources, (list, tuple)) else list(sources)
    sizes = list(input_bytes) if isinstance(input_bytes, (list, tuple)) else [input_bytes] + [0] * (len(sources) - 1)
    total_bytes = sum(sizes)
    spill.mkdir(parents=True, exist_ok=True)
    workers = workers or default_workers(total_bytes)
    inputs = tuple((s.name, tuple(s.header) if s.header else None, float(getattr(s, "weight", 1.0))) for s in sources)
    base = Context(cfg, "", "", None, None, buckets_for(total_bytes), str(spill), inputs=inputs)
    written = [spill / f"bucket-{b:04d}.bin" for b in range(base.buckets)] + [outdir / "rejected.jsonl"]
    for path in written:
        path.write_bytes(b"")
    reasons: Counter = Counter()
    per_input: list[Counter] = [Counter() for _ in sources]
    started = time.perf_counter()
    pool = _pool(workers)
    with pool, _no_gc():
        for index, source in enumerate(sources):
            ctx = replace(base, source_name=source.name, fmt=source.format, header=source.header,
                          columns=source.columns, layout=getattr(source, "layout", CHAT), source=index)
            if ctx.layout.unused:
                log.warning("%s", unused_warning(source.name, ctx.layout))
            before = _sizes(written)
            try:
                found, sampled_out = _pass1(pool, ctx, source, outdir, pieces=True, window=2 * workers + 1)
            except CannotCut as exc:
                if source.format in ("csv", "jsonl"):
                    log.warning("%s: cannot cut into pieces for parallel parsing (%s); parsing in one process", source.name, exc)
                _truncate(written, before)  # what the pieces wrote before the cut failed
                found, sampled_out = _pass1(pool, ctx, source, outdir, pieces=False, window=2 * workers + 1)
            reasons.update(found)
            per_input[index].update(found)
            per_input[index]["sampled_out"] += sampled_out
        log.info("pass 1 (read, clean, spill) done in %.1fs", time.perf_counter() - started)
        reserve_size = cfg.min_dev + cfg.min_test
        ctx = base
        results = list(pool.map(resolve_bucket, [ctx] * ctx.buckets, range(ctx.buckets), [reserve_size] * ctx.buckets))

    log.info("pass 2 (group, pick, split) done in %.1fs", time.perf_counter() - started)
    counts = {s: sum(r.counts[s] for r in results) for s in SPLITS}
    for r in results:
        reasons.update(r.reasons)
        for index, found in r.by_input.items():
            per_input[index].update(found)
    kept = sum(counts.values())
    sampled_out = sum(c["sampled_out"] for c in per_input)
    rejected_total = sum(reasons.values())
    rows_read = rejected_total + kept + sampled_out
    name = ", ".join(s.name for s in sources)
    if rows_read == 0:
        raise DataError(f"{name}: no data rows (only a header or blank lines)")
    if kept == 0:
        listed = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        what = f"all {rejected_total} rejected ({listed})" if rejected_total else f"all {sampled_out} sampled out by weights"
        raise DataError(f"{name}: no usable rows; {what}")
    minimum = {"dev": cfg.min_dev, "test": cfg.min_test}
    reserve = [item for r in results for item in r.reserve]
    moved = top_up(counts, minimum, reserve)
    for _, _, line, index, repeat in reserve:  # per-input counts follow the lines top_up moved
        for split in ("dev", "test"):
            if line in moved[split]:
                per_input[index]["train"] -= 1
                per_input[index][split] += 1
                per_input[index]["repeated"] -= repeat - 1
    _concatenate(spill, outdir, ctx.buckets, moved)
    export_rejected_csv(outdir / "rejected.jsonl", outdir / "rejected.csv")

    question_chars, answer_chars = array("l"), array("l")
    for r in results:
        question_chars.extend(r.question_chars)
        answer_chars.extend(r.answer_chars)
    repeated = sum(c["repeated"] for c in per_input)
    report = {
        "source": _source_info(sources[0], sizes[0]) if len(sources) == 1 else {
            "name": name, "format": "+".join(s.format for s in sources),
            "encoding": "+".join(s.encoding for s in sources), "bytes": total_bytes,
        },
        "rows_read": rows_read,
        "kept": kept,
        "rejected": rejected_total,
        "splits": counts,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "length_chars": {"question": _stats(question_chars), "answer": _stats(answer_chars)},
        "sources": [_input_report(s, sizes[i] if len(sizes) == len(sources) else None, per_input[i]) for i, s in enumerate(sources)],
        "sampled_out": sampled_out,
        "train_lines": counts["train"] + repeated,
        "config": cfg.model_dump(mode="json"),
    }
    (outdir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    for entry in report["sources"] if len(sources) > 1 else ():
        log.info("  %s: %d rows, %d kept, %d rejected, %d sampled out, weight %g", entry["name"], entry["rows_read"],
                 entry["kept"], entry["rejected"], entry["sampled_out"], entry["weight"])
    log.info(
        "%s: %d rows → %d kept (train %d, dev %d, test %d), %d rejected",
        name, rows_read, kept, counts["train"], counts["dev"], counts["test"], rejected_total,
    )  # fmt: skip
    return report


def unused_warning(name: str, layout: Layout) -> str:
    """One line naming the columns (keys) of an input that no role of its layout reads."""
    one = len(layout.unused) == 1
    names = ", ".join(layout.unused)
    return (f"{name}: {'column' if one else 'columns'} {names} {'is' if one else 'are'} read by no role of "
            f"{layout.describe()}; {'its' if one else 'their'} values are left out of the examples (map "
            f"{'it' if one else 'them'} in preprocess.columns if {'it holds' if one else 'they hold'} data)")


def _input_report(source: Source, size: int | None, found: Counter) -> dict[str, Any]:
    """One input's line in ``report.json``: what it was, and what became of its rows."""
    splits = {s: found[s] for s in SPLITS}
    reasons = {r: n for r, n in sorted(found.items()) if r not in (*SPLITS, "repeated", "sampled_out") and n}
    kept = sum(splits.values())
    return {
        **_source_info(source, size),
        "layout": getattr(source, "layout", CHAT).describe(),
        "unused_columns": list(getattr(source, "layout", CHAT).unused),  # names no role reads: their values are left out
        "weight": float(getattr(source, "weight", 1.0)),
        "rows_read": kept + sum(reasons.values()) + found["sampled_out"],
        "kept": kept,
        "rejected": sum(reasons.values()),
        "sampled_out": found["sampled_out"],
        "splits": splits,
        "train_lines": splits["train"] + found["repeated"],
        "rejected_by_reason": reasons,
    }
