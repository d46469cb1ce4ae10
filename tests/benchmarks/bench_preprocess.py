"""Benchmark (not a test): preprocess a synthetic 1,000,000-row lawzhidao CSV.

    .venv/bin/python tests/benchmarks/bench_preprocess.py                 # 1M rows, print the table
    .venv/bin/python tests/benchmarks/bench_preprocess.py --record        # ... and append it to docs/benchmarks.md
    .venv/bin/python tests/benchmarks/bench_preprocess.py --rows 100000   # quicker look

The CSV is built from the project's own sample (configs/data/legal_qa_sample.csv), so any
clone can run it; ``--data DIR`` builds it from the CSVs in DIR instead (the development data
in ../shared/data gave the recorded numbers). Every source row is repeated with a numbered title, every fifth row is a second reply to the previous title, ``is_best`` cycles
through ``1``, ``1.0``, ``true``, ``0``, ``0.0`` and empty, one reply in ten carries HTML
entities and tags, one in a thousand is empty. Each contender runs as its own process, so
its peak RSS (``wait4``) is its own:

  - lawtune: ``python -m jobs.preprocess`` (streaming, bucketed grouping, file:// output);
  - baseline: the tutorial way — pandas ``read_csv`` of the whole file, regex cleaning,
    ``sort_values`` + ``groupby(...).head(1)`` for the best reply, ``to_json`` per split.
Goal on the 2-core dev machine: >= 30,000 rows/s and < 1 GiB peak RSS for lawtune.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
FLAGS = ["1", "1.0", "true", "0", "0.0", ""]

BASELINE = r"""
import sys, re, html, hashlib
import pandas as pd
src, out = sys.argv[1], sys.argv[2]
df = pd.read_csv(src, dtype=str, keep_default_na=False)
tag = re.compile(r"<[^>]+>")
for col in ("title", "question", "reply"):
    df[col] = df[col].map(lambda s: re.sub(r"\s+", " ", tag.sub("", html.unescape(s))).strip())
df = df[df["reply"].str.len() > 0]
df["best"] = df["is_best"].str.lower().isin(["1", "1.0", "true"])
df["len"] = df["reply"].str.len()
df = df.sort_values(["best", "len"], ascending=False).groupby("title", sort=False).head(1)
df["user"] = df["title"].where(df["question"] == "", df["title"] + "\n" + df["question"])
df["id"] = df["title"].map(lambda t: hashlib.blake2b(t.encode(), digest_size=8).hexdigest())
u = df["id"].map(lambda h: int(h, 16) / 2**64)
df["conversations"] = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(df["user"], df["reply"])
]
for name, mask in (("test", u < 0.05), ("dev", (u >= 0.05) & (u < 0.1)), ("train", u >= 0.1)):
    df.loc[mask, ["id", "conversations"]].to_json(f"{out}/{name}.jsonl", orient="records", lines=True, force_ascii=False)
print(len(df))
"""


def source_rows(data: Path | None) -> list[tuple[str, str]]:
    """(title, reply) pairs to repeat: the sample's good rows, or every CSV of ``data``."""
    files = sorted(data.glob("*.csv")) if data else [SAMPLE]
    rows = []
    for path in files:
        with open(path, encoding="utf-8", newline="") as fh:
            rows += [(r["title"], r["reply"]) for r in csv.DictReader(fh) if r.get("title") and len(r.get("reply", "")) >= 10]
    if not rows:
        raise SystemExit(f"no title/reply rows in {data or SAMPLE}")
    return rows


def build_csv(path: Path, n: int, data: Path | None) -> None:
    base = source_rows(data)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["title", "question", "reply", "is_best"])
        title = ""
        for i in range(n):
            src_title, reply = base[i % len(base)]
            if i % 5 != 1:  # every fifth row answers the previous title again
                title = f"{src_title}（{i // len(base)}）"
            if i % 10 == 3:
                reply = f"<p>{reply}&nbsp;&amp;</p><br/>"
            if i % 1000 == 7:
                reply = "  "
            question = src_title[:20] if i % 7 == 0 else ""
            out.writerow([title, question, reply, FLAGS[i % len(FLAGS)]])
    tmp.rename(path)


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (workers count too)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys, reaped workers included) and peak RSS bytes of
    the whole process tree (sampled every 50 ms, and the kernel's own peak of the main process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{output[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, max(peak, usage.ru_maxrss * 1024)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    usable = len(os.sched_getaffinity(0))  # taskset -c 0,1 emulates a 2-core machine
    cores = f"{usable} cores" if usable == os.cpu_count() else f"{usable} of {os.cpu_count()} cores (pinned)"
    return f"{cores} ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=None, help="folder of lawzhidao CSVs to build from (default: the sample)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: not a folder")

    args.workdir.mkdir(parents=True, exist_ok=True)
    csv_path = args.workdir / f"lawzhidao-{args.rows}-{args.data.name if args.data else 'sample'}.csv"
    if not csv_path.exists():
        t0 = time.perf_counter()
        build_csv(csv_path, args.rows, args.data)
        print(f"built {csv_path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    size_mb = csv_path.stat().st_size / 2**20

    env = {**os.environ, "LAWTUNE_NO_PROGRESS": "1", "LAWTUNE_CACHE_DIR": str(args.workdir / "cache")}
    env["LAWTUNE_ARTIFACT_ROOT"] = f"file://{args.workdir}"  # stages write only below the artifact root
    results = []
    out = args.workdir / "lawtune-out"
    cmd = [sys.executable, "-m", "jobs.preprocess", "--input", str(csv_path), "--output", f"file://{out}", "--force"]
    results.append(("lawtune (python -m jobs.preprocess)", *measure(cmd, env)))
    if not args.no_baseline:
        base_out = args.workdir / "baseline-out"
        base_out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-c", BASELINE, str(csv_path), str(base_out)]
        results.append(("baseline (pandas read_csv + groupby)", *measure(cmd, env)))

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"{args.rows:,} rows, {size_mb:.0f} MiB CSV built from {args.data or 'the sample'}; {machine()}; {date}",
        "",
        "| contender | wall s | rows/s | CPU s | peak RSS MiB (process tree) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {w:.1f} | {args.rows / w:,.0f} | {c:.1f} | {r / 2**20:,.0f} |" for name, w, c, r in results]
    _, wall, _, rss = results[0]
    met = args.rows / wall >= 30_000 and rss < 2**30
    load = os.getloadavg()[0]
    lines += ["", f"goal >= 30,000 rows/s and < 1 GiB peak: {'met' if met else 'NOT met'}; load average at the end {load:.1f}"]
    print("\n".join(lines))
    if args.record:
        doc = REPO / "docs" / "benchmarks.md"
        doc.parent.mkdir(exist_ok=True)
        with open(doc, "a", encoding="utf-8") as fh:
            fh.write("\n### preprocess run\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
