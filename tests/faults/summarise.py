"""Build docs/reliability.md's tables from FAULTS_REPORT files (JSON lines), counting, never asserting.

    .venv/bin/python tests/faults/summarise.py .cache/faults-report-test.jsonl .cache/faults-report.jsonl

Rows come from three writers: the kill trials (tests/faults/test_kill_anywhere.py: one per trial,
failing ones included, ``lost_files`` from the bytes stored after the re-run), the serving soak
(tests/faults/test_serving_faults.py: one per test, with its request counts), and every test
marked ``fault("<class>")`` (tests/conftest.py: one per case, its outcome). A missing file is
skipped (``make test-faults`` alone has no ``make test`` report). Prints markdown: one row per
fault class with tried / survived / lost, then the kill trials stage by stage.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        if Path(path).is_file():
            rows += [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return rows


def counts(row: dict) -> tuple[int, int, int | None]:
    """(tried, survived, lost) of one row; lost None when the row could not tell."""
    if row.get("test") == "soak":  # one row, many requests: each answered 200 or 429 with Retry-After survived
        tried = row["requests"]
        survived = row["ok"] + row["rate_limited"]
        return tried, survived, tried - survived
    return 1, int(bool(row["survived"])), row.get("lost_files")


def fault_class(row: dict) -> str:
    if "stage" in row:
        return f"{row.get('fault', 'SIGKILL mid-stage')}, then the same command ({row['backend']})"
    if "test" in row:
        return "serving soak: requests answered 200, or 429 with Retry-After (not reset, timed out or 5xx)"
    return row["fault"]


def main(paths: list[str]) -> int:
    rows = load(paths)
    if not rows:
        print(f"no fault report rows in {', '.join(paths)}", file=sys.stderr)
        return 1
    classes: dict[str, list[int | None]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        if "test" in row and row["test"] != "soak":
            continue  # the serving tests' details; their outcomes are rows of their own (fault markers)
        tried, survived, lost = counts(row)
        total = classes[fault_class(row)]
        total[0] += tried
        total[1] += survived
        total[2] = None if lost is None or total[2] is None else total[2] + lost
    print("| fault | tried | survived | lost |")
    print("| --- | --- | --- | --- |")
    for name, (tried, survived, lost) in sorted(classes.items()):
        print(f"| {name} | {tried} | {survived} | {'?' if lost is None else lost} |")

    kills: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if "stage" in row:
            kills[(row["stage"], row["backend"])].append(row)
    if kills:
        print("\n| stage | backend | kills | survived | objects lost | killed at | refused / committed after the kill | reference run (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (stage, backend), trials in sorted(kills.items()):
            lost = [t.get("lost_files") for t in trials]
            states = [t.get("after_kill") for t in trials]
            print(f"| {stage} | {backend} | {len(trials)} | {sum(bool(t['survived']) for t in trials)} | "
                  f"{'?' if None in lost else sum(lost)} | {', '.join(t.get('killed_at') or repr(t['marker']) for t in trials)} | "
                  f"{states.count('refused')} / {states.count('committed')} | {trials[0]['reference_s']} |")
    for row in rows:
        if "test" in row:
            print(f"\n{json.dumps(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
