"""Reading Q&A datasets as a stream: CSV, JSONL and JSON arrays, in whatever encoding they came.

Formats (which columns mean what: shared/data/shapes.py, the config's ``preprocess.columns``)
  - CSV with a header: lawzhidao ``title,question,reply,is_best`` (``title`` and ``reply``
    required), Alpaca ``instruction,input,output[,system,history]``, ``prompt,response``, or
    the user's own names mapped by ``preprocess.columns``; column order and case are free.
    RFC 4180 quoting, so quoted fields may hold commas, quotes and line breaks; CRLF or LF.
  - JSONL (one object per line) or a JSON array of objects, each either a row of one of the
    layouts above (Alpaca's ``history`` kept as turns) or a conversation in any of
      ChatGLM3  ``{"conversations": [{"role": "user", "content": "..."}, ...]}``
      OpenAI    ``{"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": "..."}]}, ...]}``
      ShareGPT  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``
  - Parquet files and saved Hugging Face dataset folders: shared/data/hf_datasets.py
    (``shared.data.inputs.open_source`` picks the reader).

Encodings: UTF-8 with or without a BOM, UTF-16 with a BOM, and GB18030 (which covers GBK
and GB2312, as exported by Chinese Excel) are read correctly; the encoding found is
reported. A file that is empty, binary (NUL bytes, archive magic), in no encoding we can
read, or a CSV without the required columns raises ``DataError`` naming the file and the
problem; so does a header or first object whose names fit no layout (naming the names found
and a mapping that would fit). Rows that are merely bad come back as ``BadRow`` with their line number, so the
caller can reject them and go on.
"""

from __future__ import annotations

import codecs
import csv
import json
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from shared.core.config import ColumnsConfig
from shared.data.conversation import SchemaError
from shared.core.errors import DataError
from shared.data.shapes import CHAT, Layout, match, prompt_turns, text_of

_SNIFF_OBJECTS = 50  # JSONL lines looked at for the first object, which decides the layout
_SNIFF_BYTES = 64 * 1024
_FIELD_LIMIT = 64 * 1024 * 1024  # long replies; the 128 KiB default would abort a file on one
_MAGIC = {
    b"PK\x03\x04": "a zip archive (an .xlsx workbook?)",
    b"\x1f\x8b": "gzip-compressed",
    b"%PDF": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"SQLite format 3": "an SQLite database",
    b"\xd0\xcf\x11\xe0": "an OLE document (an .xls workbook?)",
    b"PAR1": "a Parquet file",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
}
# Maps the speaker names of the chat formats onto our three roles.
_ROLE = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


class CannotCut(Exception):
    """The file cannot be cut into pieces for parallel parsing; read it with ``rows()``."""


def _record_boundary(text: str, quoted: bool) -> int:
    """The index just after the last line break at which the quotes seen so far balance, or 0."""
    end = text.rfind("\n")
    if end < 0 or not quoted:
        return end + 1
    odd = text.count('"', 0, end) & 1
    while odd:
        previous = text.rfind("\n", 0, end)
        if previous < 0:
            return 0
        odd ^= text.count('"', previous, end) & 1
        end = previous
    return end + 1


class BadRow(NamedTuple):
    """A row that cannot be used: where, why, and what it held."""

    line: int
    reason: str
    detail: str
    raw: Any


class CsvRow(NamedTuple):
    line: int
    title: str
    question: str
    reply: str
    is_best: str
    raw: list[str]


class ChatRow(NamedTuple):
    line: int
    turns: list[dict[str, str]]
    raw: str


def sniff_encoding(path: Path) -> str:
    """The codec to read ``path`` with, or DataError when it is not text we can read."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head.strip():
        raise DataError(f"{path}: the file is empty")
    if head.startswith(codecs.BOM_UTF8):
        return _checked(path, head, "utf-8-sig")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _checked(path, head, "utf-16")
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path}: not a dataset: the file is {what}; expected a CSV or JSONL text file")
    if head.count(b"\x00") > max(1, len(head) // 100):
        raise DataError(f"{path}: not a dataset: binary content (NUL bytes); expected a CSV or JSONL text file")
    for encoding in ("utf-8", "gb18030"):
        try:
            # final=False: the sample may end inside a multi-byte character.
            text = codecs.getincrementaldecoder(encoding)().decode(head, final=False)
        except UnicodeDecodeError:
            continue
        controls = sum(1 for ch in text if ch < " " and ch not in "\t\r\n")
        if controls > max(1, len(text) // 20):
            raise DataError(f"{path}: not a dataset: binary content (control bytes); expected a CSV or JSONL text file")
        if encoding == "gb18030" and not _plausible_chinese(text):
            break  # GB18030 maps almost any byte pair to some character; this is not text
        return encoding
    raise DataError(f"{path}: not a dataset: binary content, or text in neither UTF-8 nor GB18030")


def _checked(path: Path, head: bytes, encoding: str) -> str:
    """``encoding`` when the sample decodes to text, else DataError (a BOM can be chance bytes)."""
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: starts with a {encoding} byte-order mark but is not {encoding} text ({exc.reason})") from None
    if sum(1 for ch in text if ch < " " and ch not in "\t\r\n") > max(1, len(text) // 20):
        raise DataError(f"{path}: not a dataset: binary content (control bytes); expected a CSV or JSONL text file")
    return encoding


def _plausible_chinese(text: str) -> bool:
    """Mostly ASCII, CJK ideographs and CJK/full-width punctuation, as GB18030 text is."""
    common = sum(
        1
        for ch in text
        if " " <= ch <= "~" or ch in "\t\r\n" or "\u4e00" <= ch <= "\u9fff" or "\u3000" <= ch <= "\u303f"
        or "\uff00" <= ch <= "\uffef" or "\u2010" <= ch <= "\u206f"
    )
    return common >= 0.9 * len(text)


def _first_bad_line(path: Path, encoding: str) -> int:
    """The 1-based line holding the first byte ``encoding`` cannot decode (slow; errors only)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # exc.start counts from the decoder's pending bytes plus this chunk.
                pending = len(exc.object) - len(chunk)
                return line + chunk[: max(0, exc.start - pending)].count(b"\n")
            line += chunk.count(b"\n")
    return line


def sniff_format(path: Path, encoding: str) -> str:
    """``csv``, ``jsonl`` or ``json`` (an array): by extension, else by the first character."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    with open(path, encoding=encoding, errors="replace") as fh:
        first = fh.read(4096).lstrip().lstrip("\ufeff")
    if first.startswith("["):
        return "json"
    if suffix in (".jsonl", ".json", ".ndjson") or first.startswith("{"):
        return "jsonl"
    return "csv"


class Source:
    """One input file: its encoding, format, layout and a row iterator that never loads it whole."""

    def __init__(self, path: Path, name: str | None = None, columns: ColumnsConfig | None = None, weight: float = 1.0):
        self.path = Path(path)
        self.name = name or self.path.name
        self.weight = weight
        self._mapping = columns
        self.encoding = sniff_encoding(self.path)
        self.format = sniff_format(self.path, self.encoding)
        self.header: list[str] | None = None
        self.layout: Layout = CHAT
        if self.format == "csv":
            self._index = self._read_header()
        else:
            self.layout = self._sniff_layout()

    def _fail(self, message: str) -> DataError:
        return DataError(f"{self.name}: {message}")

    def rows(self) -> Iterator[CsvRow | ChatRow | BadRow]:
        """Every row, parsed in this process (exact CSV semantics, any quoting)."""
        with self._decoding(), self._open() as fh:
            if self.format == "csv":
                yield from csv_records(fh, 0, self._index, len(self.header or ()), skip_header=True, name=self.name,
                                       layout=self.layout)
            elif self.format == "json":
                yield from json_array_records(fh, name=self.name, layout=self.layout)
            else:
                yield from jsonl_records(fh, 0, name=self.name, layout=self.layout)

    def chunks(self, size: int) -> Iterator[tuple[int, str]]:
        """``(first line, text)`` pieces of whole records, about ``size`` characters each, for
        worker processes to parse (``csv_records``/``jsonl_records``).

        A CSV piece ends at a line break after an even number of ``"`` — a record boundary in
        any file whose quotes are well formed. Workers parse CSV pieces with ``strict=True``,
        which raises ``csv.Error`` when that did not hold (stray quotes); the caller then
        falls back to ``rows()``. Only C-level counting happens here, so one process feeds
        several workers. ``CannotCut``: no line break to cut at (e.g. old Mac CR line ends).
        """
        if self.format == "json":
            raise CannotCut(f"{self.name}: a JSON array is parsed in one stream")
        quoted = self.format == "csv"
        with self._decoding(), self._open() as fh:
            line = 0
            if quoted:  # skip the header record (checked in __init__)
                odd = 0
                while header_line := fh.readline():
                    line += 1
                    odd ^= header_line.count('"') & 1
                    if not odd:
                        break
            carry = ""
            while True:
                block = fh.read(size)
                text = carry + block if carry else block
                if not block:
                    if text:
                        yield line + 1, text
                    return
                cut = _record_boundary(text, quoted)
                if cut <= 0:
                    if not quoted and len(text) > _FIELD_LIMIT:
                        raise self._fail(_too_long(line + 1, len(text)))
                    if len(text) > _FIELD_LIMIT:
                        raise CannotCut(f"{self.name}: no record boundary within {_FIELD_LIMIT} characters")
                    carry = text
                    continue
                piece, carry = text[:cut], text[cut:]
                yield line + 1, piece
                line += piece.count("\n") + piece.count("\r") - piece.count("\r\n")

    @contextmanager
    def _decoding(self):
        try:
            yield
        except UnicodeDecodeError as exc:
            line = _first_bad_line(self.path, self.encoding)
            raise self._fail(
                f"not valid {self.encoding} at line {line} ({exc.reason}); the file mixes encodings: re-save it as UTF-8"
            ) from None

    def _open(self):
        return open(self.path, encoding=self.encoding, newline="")

    def _read_header(self) -> dict[str, int]:
        """Column positions, or DataError when the file is not a lawzhidao CSV."""
        csv.field_size_limit(_FIELD_LIMIT)
        with self._open() as fh:
            try:
                header = next(csv.reader(fh), None)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise self._fail(f"not a CSV file: {exc}") from None
        if header is None:
            raise self._fail("the file is empty")
        self.header = [h.strip().lstrip("\ufeff") for h in header]
        self.layout = match(self.header, self._mapping, where=self.name, what="CSV header")
        position = {h: i for i, h in reversed(list(enumerate(self.header)))}  # the first of repeated names
        return {role: position[name] for role, name in self.layout.fields}

    def _sniff_layout(self) -> Layout:
        """The layout the first JSON object's keys fit (conversations fit the chat layout)."""
        with self._decoding(), self._open() as fh:
            if self.format == "json":
                first = next((row for row in _array_objects(fh, self.name)), None)
                obj = first[1] if first else None
            else:
                obj = None
                for line in islice(fh, _SNIFF_OBJECTS):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        break
        if not isinstance(obj, dict):
            return CHAT  # nothing to go by: every line is rejected with its reason
        return match(obj.keys(), self._mapping, where=self.name, what="keys of the first object", chat=True)

    @property
    def columns(self) -> dict[str, int] | None:
        return getattr(self, "_index", None)


def csv_records(
    lines: Iterable[str], offset: int, index: dict[str, int], width: int,
    *, skip_header: bool = False, strict: bool = False, name: str = "", layout: Layout | None = None,
) -> Iterator[CsvRow | ChatRow | BadRow]:  # fmt: skip
    """Rows of CSV text whose first line is line ``offset + 1`` of the file: ``CsvRow`` for a
    Q&A table, ``ChatRow`` for a prompt/response table (``layout`` then names the columns)."""
    csv.field_size_limit(_FIELD_LIMIT)  # per process: workers start with the default
    prompt = "title" not in index
    t, r = index.get("title"), index.get("reply")
    q, b = index.get("question"), index.get("is_best")
    reader = csv.reader(lines, strict=strict)
    if skip_header:
        next(reader, None)
    end = reader.line_num
    while True:
        start = offset + end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if strict:
                raise
            raise DataError(f"{name}: unreadable CSV at line {start}: {exc}") from None
        end = reader.line_num
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            yield BadRow(start, "malformed_row", f"{len(row)} field(s), the header has {width}", row)
            continue
        if prompt:
            try:
                values = {column: row[index[role]] for role, column in layout.fields}
                yield ChatRow(start, prompt_turns(values, layout), row)
            except SchemaError as exc:
                yield BadRow(start, "bad_schema", str(exc), row)
            continue
        yield CsvRow(start, row[t], row[q] if q is not None else "", row[r], row[b] if b is not None else "", row)


def _too_long(line: int, chars: int) -> str:
    return (f"line {line} is over {chars // 2**20} Mi characters, more than one record may hold "
            f"({_FIELD_LIMIT // 2**20} Mi); split it or remove it")


def jsonl_records(lines: Iterable[str], offset: int, *, name: str = "", layout: Layout = CHAT) -> Iterator[CsvRow | ChatRow | BadRow]:
    """Rows of JSON Lines text whose first line is line ``offset + 1`` of the file."""
    for number, line in enumerate(lines, offset + 1):
        if not line.strip():
            continue
        if len(line) > _FIELD_LIMIT:
            raise DataError(f"{name}: {_too_long(number, len(line))}")
        raw = line.rstrip("\r\n")
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield BadRow(number, "unparseable_line", f"not JSON: {exc}", raw)
            continue
        yield object_row(number, obj, raw, layout)


def json_array_records(text: Iterable[str], *, name: str = "", layout: Layout = CHAT) -> Iterator[CsvRow | ChatRow | BadRow]:
    """Rows of a JSON array file, streamed: one element at a time, numbered by its first line."""
    for line, obj in _array_objects(text, name):
        yield object_row(line, obj, json.dumps(obj, ensure_ascii=False), layout)


def _array_objects(text: Iterable[str], name: str) -> Iterator[tuple[int, Any]]:
    """``(line, element)`` of a JSON array, decoded piece by piece so the file is never whole in memory."""
    decoder = json.JSONDecoder()
    blocks = iter(text) if not hasattr(text, "read") else iter(lambda: text.read(1 << 16), "")
    buffer, pos, line, started = "", 0, 1, False
    for block in blocks:
        buffer = buffer[pos:] + block
        pos = 0
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,\ufeff":
                line += buffer[pos] == "\n"
                pos += 1
            if pos >= len(buffer):
                break
            if not started:
                if buffer[pos] != "[":
                    raise DataError(f"{name}: not a JSON array (line {line} starts with {buffer[pos]!r})")
                started, pos = True, pos + 1
                continue
            if buffer[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buffer, pos)
            except ValueError as exc:
                if len(buffer) - pos > _FIELD_LIMIT:
                    raise DataError(f"{name}: not valid JSON at line {line}: {exc}") from None
                break  # the element goes on in the next block
            yield line, obj
            line += buffer.count("\n", pos, end)
            pos = end
    if started:
        raise DataError(f"{name}: the JSON array is not closed or not valid JSON after line {line}")


def object_row(line: int, obj: Any, raw: Any, layout: Layout) -> CsvRow | ChatRow | BadRow:
    """One JSON object (a JSONL line, an array element, a Parquet row) as a row of ``layout``."""
    try:
        if layout.kind == "chat":
            return ChatRow(line, chat_turns(obj), raw)
        if not isinstance(obj, dict):
            raise SchemaError(f"a JSON {type(obj).__name__}; expected an object")
        if layout.kind == "prompt":
            return ChatRow(line, prompt_turns(obj, layout), raw)
        for role in ("title", "reply"):
            if layout.get(role) not in obj:
                raise SchemaError(f"no {layout.get(role)!r} (the {role})")
        cell = {role: text_of(obj.get(key), role, key) for role, key in layout.fields}
        return CsvRow(line, cell["title"], cell.get("question", ""), cell["reply"], cell.get("is_best", ""), raw)
    except SchemaError as exc:
        return BadRow(line, "bad_schema", str(exc), raw)


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
        raise SchemaError(f"turn {index} has non-text content parts (only text is supported)")
    raise SchemaError(f"turn {index} has content of type {type(value).__name__}; expected text")


def chat_turns(obj: Any) -> list[dict[str, str]]:
    """The turns of a ChatGLM3, OpenAI or ShareGPT object as ``{role, content}`` (not yet cleaned)."""
    if not isinstance(obj, dict):
        raise SchemaError(f"a JSON {type(obj).__name__}; expected an object with 'conversations' or 'messages'")
    turns = obj.get("messages", obj.get("conversations"))
    if not isinstance(turns, list):
        raise SchemaError("no 'conversations' or 'messages' list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SchemaError(f"turn {index} is not an object")
        if "from" in turn:  # ShareGPT
            speaker, value = turn.get("from"), turn.get("value")
        else:
            speaker, value = turn.get("role"), turn.get("content")
        role = _ROLE.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise SchemaError(f"turn {index} has speaker {speaker!r}; expected system, user/human or assistant/gpt")
        out.append({"role": role, "content": _content(value, index)})
    return out
