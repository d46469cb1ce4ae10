"""The inputs of one preprocess run: which reader each needs, its weight, size and digest.

    --input a.csv --input b.jsonl:0.5 --input my_dataset/     # or preprocess.inputs in the config

``PATH:WEIGHT`` gives an input a sampling weight (``preprocess.inputs[].weight`` in the
config); a path that exists as written is never split, so a ``:`` in a file name is safe.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from shared.core.config import ColumnsConfig, PreprocessConfig
from shared.core.errors import ConfigError
from shared.data.readers import Source
from shared.store.artifacts import sha256_file

_WEIGHTED = re.compile(r"^(?P<path>.+):(?P<weight>[^:/]+)$")


@dataclass(frozen=True)
class InputSpec:
    """One input as asked for: where, how much of it, and its own column mapping if any."""

    uri: str
    weight: float = 1.0
    columns: ColumnsConfig | None = None


def parse_input(text: str) -> InputSpec:
    """``PATH`` or ``PATH:WEIGHT`` (a weight > 0). A local path that exists as written is never
    split; one that does not, ending in ``:`` + something that is no number, is refused naming
    the weight (an s3:// key may hold a colon, so a URI's tail is a weight only when it is a number)."""
    found = _WEIGHTED.match(text)
    if not found or Path(text).exists():
        return InputSpec(text)
    try:
        weight = float(found["weight"])
    except ValueError:
        if "://" in text:
            return InputSpec(text)
        raise ConfigError(f"--input {text}: the weight {found['weight']!r} is not a number, and no file {text} exists; "
                          f"PATH:WEIGHT takes a number above 0, e.g. {found['path']}:0.5") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"--input {text}: the weight {found['weight']} is not above 0; PATH:WEIGHT takes a number above 0, "
                          f"e.g. {found['path']}:0.5 (keep half) or {found['path']}:2 (repeat twice)")
    return InputSpec(found["path"], weight)


def input_specs(cli: list[str] | None, cfg: PreprocessConfig) -> list[InputSpec]:
    """``--input`` values when given, else ``preprocess.inputs``; ConfigError when neither names one."""
    if cli:
        return [parse_input(text) for text in cli]
    if cfg.inputs:
        return [InputSpec(i.path, i.weight, i.columns) for i in cfg.inputs]
    raise ConfigError("no input: pass --input FILE (repeat it for several) or list preprocess.inputs in the config")


def open_source(path: Path, name: str | None = None, columns: ColumnsConfig | None = None, weight: float = 1.0):
    """The reader for one input: a Parquet file or a saved Hugging Face dataset folder goes
    through ``datasets``; any other file is read as text (``readers.Source``)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq") or _starts_with(path, b"PAR1"):
        from shared.data.hf_datasets import DatasetSource

        return DatasetSource(path, name, columns, weight)
    return Source(path, name, columns, weight)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def input_bytes(path: Path) -> int:
    """A file's size, or a folder's files' total."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def input_digest(path: Path) -> str:
    """sha256 of a file; of a folder, over its files' relative paths and digests (a saved dataset)."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


