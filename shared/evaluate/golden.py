"""The golden question set: a fixed CSV/JSONL of questions with reference answers, scored on every run.

It goes through the same readers and cleaning as preprocess (shared/data), so a file that
preprocess accepts works here; a row that preprocess would reject is an error naming the file
and the line, because a golden set with silently dropped rows is no longer fixed ground.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.core.config import PreprocessConfig
from shared.core.errors import DataError
from shared.data.dedup import Candidate
from shared.data.preprocessing import from_chat, from_csv
from shared.data.readers import BadRow, CsvRow, Source


def load_golden(path: Path, name: str, cfg: PreprocessConfig) -> list[dict[str, Any]]:
    """Records ``{"id", "conversations"}`` in file order."""
    records, problems = [], []
    for row in Source(path, name).rows():
        if isinstance(row, BadRow):
            problems.append(f"line {row.line}: {row.reason} ({row.detail})")
            continue
        made = from_csv(row, cfg) if isinstance(row, CsvRow) else from_chat(row, cfg)
        if not isinstance(made, Candidate):  # (reason, detail)
            problems.append(f"line {row.line}: {made[0]} ({made[1]})")
            continue
        records.append(json.loads(made.record))
    if problems:
        raise DataError(f"golden question set {name}: {len(problems)} unusable row(s): " + "; ".join(problems[:5]))
    if not records:
        raise DataError(f"golden question set {name} has no questions")
    return records
