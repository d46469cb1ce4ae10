"""Parquet files and saved Hugging Face dataset folders, read through ``datasets``, streamed.

    python -m jobs.preprocess --input qa.parquet
    python -m jobs.preprocess --input my_dataset/        # what Dataset.save_to_disk wrote

A Parquet file is opened with ``load_dataset("parquet", streaming=True)``, which reads it a
row group at a time; a saved dataset folder with ``load_from_disk``, whose Arrow files are
memory-mapped, and every split of a ``DatasetDict`` is read in turn (the stage re-splits by
question). Either way rows arrive in batches and never all at once, so an input larger
than memory works. Each row is an object like a JSONL line: the same layouts
(shared/data/shapes.py), the same ``preprocess.columns`` mapping, the same cleaning,
rejection and split; ``line`` in ``rejected.jsonl`` is the row's 1-based position.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from shared.core.config import ColumnsConfig
from shared.core.errors import DataError
from shared.data.readers import BadRow, CannotCut, ChatRow, CsvRow, object_row
from shared.data.shapes import match

log = logging.getLogger(__name__)
BATCH = 1000


class DatasetSource:
    """The same interface as ``readers.Source`` for data ``datasets`` reads."""

    def __init__(self, path: Path, name: str | None = None, columns: ColumnsConfig | None = None, weight: float = 1.0):
        self.path = Path(path)
        self.name = name or self.path.name
        self.weight = weight
        self.format = "hf-dataset" if self.path.is_dir() else "parquet"
        self.encoding = "arrow"
        self.columns = None  # no CSV positions: rows arrive as objects
        self.header = self._column_names()
        self.layout = match(self.header, columns, where=self.name, what="columns", chat=True)

    def _fail(self, exc: BaseException) -> DataError:
        what = "a saved Hugging Face dataset folder (Dataset.save_to_disk)" if self.format == "hf-dataset" else "a Parquet file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DataError(f"{self.name}: not readable as {what}: {reason[:300]}")

    def _datasets(self) -> list[Any]:
        import datasets

        datasets.disable_progress_bars()
        try:
            if self.format == "parquet":
                return [datasets.load_dataset("parquet", data_files=str(self.path), split="train", streaming=True)]
            loaded = datasets.load_from_disk(str(self.path))
        except DataError:
            raise
        except Exception as exc:  # datasets and pyarrow raise many kinds for a file that is not theirs
            raise self._fail(exc) from None
        return list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]

    def _column_names(self) -> list[str]:
        names: list[str] = []
        for part in self._datasets():
            for name in part.column_names or next(iter(part.iter(batch_size=1)), {}).keys():
                if name not in names:
                    names.append(name)
        if not names:
            raise DataError(f"{self.name}: the dataset has no columns")
        return names

    def rows(self) -> Iterator[CsvRow | ChatRow | BadRow]:
        line = 0
        try:
            for part in self._datasets():
                for batch in part.iter(batch_size=BATCH):
                    keys = list(batch)
                    for values in zip(*(batch[k] for k in keys)):
                        line += 1
                        obj = dict(zip(keys, values))
                        yield object_row(line, obj, json.dumps(obj, ensure_ascii=False, default=str), self.layout)
        except DataError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith(("pyarrow", "datasets")):
                raise self._fail(exc) from None
            raise
        if line == 0:
            raise DataError(f"{self.name}: the dataset has no rows")

    def chunks(self, size: int):
        raise CannotCut(f"{self.name}: {self.format} rows are read in one stream")
