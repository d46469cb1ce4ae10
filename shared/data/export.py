"""Human-facing exports of data-stage output: ``rejected.csv`` for a spreadsheet.

``rejected.jsonl`` keeps every rejected row exactly as read (the raw data, for tools).
``rejected.csv`` is what a person opens in Excel/LibreOffice/Sheets, where a cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is run as a formula
(CSV/formula injection, OWASP): such cells get a leading ``'``, which spreadsheets show as
text and never evaluate.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
COLUMNS = ("source", "line", "reason", "detail", "raw")


def neutralise(cell: object) -> str:
    """The cell as text a spreadsheet shows verbatim, never evaluates."""
    text = "" if cell is None else str(cell)
    return "'" + text if text.startswith(_FORMULA_START) else text


def export_rejected_csv(rejected_jsonl: Path, out_csv: Path) -> int:
    """One CSV row per rejected row (raw fields flattened into columns); the count written."""
    rows = [json.loads(line) for line in rejected_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    raw_keys: list[str] = []
    for row in rows:
        raw = row.get("raw")
        for key in raw if isinstance(raw, dict) else ():
            if key not in raw_keys:
                raw_keys.append(key)
    header = [*COLUMNS[:-1], *(f"raw.{k}" for k in raw_keys)] if raw_keys else list(COLUMNS)
    # utf-8-sig: Excel reads a BOM-less CSV as the local code page and garbles Chinese text.
    with open(out_csv, "w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            raw = row.get("raw")
            cells = [row.get("source"), row.get("line"), row.get("reason"), row.get("detail")]
            if raw_keys:
                cells += [raw.get(k) if isinstance(raw, dict) else (raw if i == 0 else "") for i, k in enumerate(raw_keys)]
            else:
                cells.append(raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False))
            writer.writerow([neutralise(c) for c in cells])
    return len(rows)
