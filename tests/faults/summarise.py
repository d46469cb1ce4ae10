"""Print the kill trials of a FAULTS_REPORT file as the markdown rows of docs/reliability.md.

    .venv/bin/python tests/faults/summarise.py .cache/faults-report.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if "stage" not in row:  # serving rows: printed as they are below
            continue
        groups[(row["stage"], row["backend"])].append(row)
    print("| stage | backend | kills | survived | data lost | killed at (log line + delay) | committed before kill | reference run (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (stage, backend), trials in sorted(groups.items()):
        print(f"| {stage} | {backend} | {len(trials)} | {sum(t['survived'] for t in trials)} | "
              f"{sum(t['lost_files'] for t in trials)} | {', '.join(repr(t['marker']) + ' +' + str(t['delay_s']) + 's' for t in trials)} | "
              f"{sum(t['after_kill'] == 'committed' for t in trials)} | {trials[0]['reference_s']} |")
    for row in rows:
        if "stage" not in row:
            print(f"\n{json.dumps(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
