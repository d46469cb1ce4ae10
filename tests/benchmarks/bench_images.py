"""Measure every CPU image: its size, its cold build time, and its rebuild time after a one-line code
change, and write the numbers where they are read (make bench-images).

    python tests/benchmarks/bench_images.py [--registry R] [--tag T] [--no-write]

1. Cold: BuildKit's cache (pip's cache mount included) is pruned and the images are built in
   `make images DEVICE=cpu` order on the local bases (`make base-images`: Debian packages).
   Images that share a dependency layer (finetune/evaluate/publish, preprocess/fetch-model)
   build it once: the later ones show only what they add.
2. Rebuild: one comment line appended to shared/core/__init__.py (restored afterwards), the same
   build again: the baseline beside it is the cold build, what a Dockerfile that copies the code
   before installing would pay on every change.
3. Sizes: each image's unpacked size, and how much of it is shared with the others (docker system df).

Writes the table to docs/benchmarks.md, the README's image table and each Dockerfile's
`measured:` line, with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORDER = ["preprocess", "finetune", "evaluate", "publish", "fetch-model", "vllm-cpu"]
TOUCHED = REPO / "shared" / "core" / "__init__.py"
SECTION = "## Container images (issue 23)"


def load_build():
    spec = importlib.util.spec_from_file_location("lawtune_images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_all(registry: str, tag: str, report: Path) -> list[dict]:
    report.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--device", "cpu", "--bases", "local",
                    "--registry", registry, "--tag", tag, "--report", str(report), *ORDER], check=True)
    return [json.loads(line) for line in report.read_text().splitlines()]


def shared_sizes(cli: list[str]) -> dict[str, tuple[float, float]]:
    """{repository:tag: (shared bytes, unique bytes)} from `docker system df -v`."""
    out = subprocess.run([*cli, "system", "df", "-v", "--format", "{{json .}}"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    sizes = {}
    for image in data.get("Images") or []:
        name = f"{image['Repository']}:{image['Tag']}"
        sizes[name] = (parse_size(image["SharedSize"]), parse_size(image["UniqueSize"]))
    return sizes


def parse_size(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)\s*([kKMGT]?B)", text.strip())
    if not match:
        return 0.0
    return float(match.group(1)) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[match.group(2)]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    return f"{platform.machine()}, {os.cpu_count()} cores ({model}), load average {load:.1f} at the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="ghcr.io/lawtune")
    parser.add_argument("--tag", default="0.1.0")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    build = load_build()
    cli = build.buildkit_cli()
    started = dt.datetime.now(dt.timezone.utc)

    subprocess.run([*cli, "builder", "prune", "-af"], check=True, capture_output=True)
    for image in ORDER:
        subprocess.run([*cli, "image", "rm", "-f", build.image_name(image, args.registry, args.tag, "cpu")], capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        cold = {r["image"]: r for r in build_all(args.registry, args.tag, Path(tmp) / "cold.jsonl")}
        original = TOUCHED.read_text()
        try:
            TOUCHED.write_text(original + f"# bench_images: a one-line change, {started.isoformat()}\n")
            warm = {r["image"]: r for r in build_all(args.registry, args.tag, Path(tmp) / "warm.jsonl")}
        finally:
            TOUCHED.write_text(original)
    sizes = shared_sizes(cli)

    rows = []
    for image in ORDER:
        name = cold[image]["name"]
        shared, unique = sizes.get(name, (0.0, 0.0))
        rebuilt = [s["step"] for s in warm[image]["steps"] if not s["cached"]]
        rows.append({"image": image, "name": name, "size": cold[image]["size_bytes"] / 1e9, "unique": unique / 1e9,
                     "cold": cold[image]["seconds"], "rebuild": warm[image]["seconds"], "rebuilt": rebuilt})
    when = started.strftime("%Y-%m-%d")
    where = machine()
    table = render_table(rows, when, where)
    print(table)
    if args.no_write:
        return
    write_benchmarks(table)
    write_readme(rows, when)
    write_dockerfiles(rows, when)


def _metadata(step: str) -> bool:
    """FROM and WORKDIR print as rerun on every build of an imported base; they write no layer."""
    return re.sub(r"^\[[^\]]*\]\s*", "", step).split(" ", 1)[0] in ("FROM", "WORKDIR")


def step_label(step: str) -> str:
    """``COPY jobs/__init__.py jobs/evaluate.py /opt/...`` → ``COPY jobs/…``: what the step takes in."""
    words = re.sub(r"^\[[^\]]*\]\s*", "", step).split()
    return " ".join(words[:2]) + (" …" if len(words) > 3 else "")


def render_table(rows: list[dict], when: str, where: str) -> str:
    lines = [f"### {where}, {when} (BuildKit of Debian's docker.io 20.10, local bases, pip through this machine's proxy)", "",
             "| image | size | of it unique | cold build | rebuild after a one-line code change | steps rebuilt |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        rebuilt = "; ".join(step_label(s) for s in r["rebuilt"] if not _metadata(s)) or "none (no lawtune code inside)"
        lines.append(f"| `{r['image']}` | {r['size']:.2f} GB | {r['unique']:.2f} GB | {r['cold']:.0f} s | {r['rebuild']:.0f} s | {rebuilt} |")
    total_cold = sum(r["cold"] for r in rows)
    total_warm = sum(r["rebuild"] for r in rows)
    lines += ["", f"All six, one after another as `make images DEVICE=cpu` builds them: cold {total_cold:.0f} s, "
              f"after a one-line change {total_warm:.0f} s. A cold build shares the dependency layer of "
              "finetune/evaluate/publish and of preprocess/fetch-model, so the later images of each pair or "
              "triple cost only their own layers; \"unique\" is what an image adds on disk beside the others."]
    return "\n".join(lines)


def write_benchmarks(table: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text()
    body = (f"{SECTION}\n\n`make bench-images` (tests/benchmarks/bench_images.py): every CPU image built cold "
            "(BuildKit cache pruned), then again after a one-line change in `shared/`; the cold build is the "
            "baseline a Dockerfile without a separate dependency layer would pay on every change.\n\n" + table + "\n")
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def write_readme(rows: list[dict], when: str) -> None:
    path = REPO / "README.md"
    text = path.read_text()
    start, end = text.index("<!-- image-table -->"), text.index("<!-- /image-table -->")
    lines = ["<!-- image-table -->", "", f"| image | `DEVICE=cpu`, measured {when} | cold build | rebuild after a one-line change | `DEVICE=cuda` |",
             "|---|---|---|---|---|"]
    for r in rows:
        cuda = "n/a (CPU server)" if r["image"] == "vllm-cpu" else "not built here"
        lines.append(f"| `{r['image']}` | {r['size']:.2f} GB | {r['cold']:.0f} s | {r['rebuild']:.0f} s | {cuda} |")
    path.write_text(text[:start] + "\n".join(lines) + "\n\n" + text[end:])


def write_dockerfiles(rows: list[dict], when: str) -> None:
    for r in rows:
        path = REPO / "images" / f"{r['image']}.Dockerfile"
        line = (f"#   measured: cpu {r['size']:.2f} GB, cold build {r['cold']:.0f} s, rebuild after a one-line code change "
                f"{r['rebuild']:.0f} s ({when}, make bench-images on 2 cores)")
        text = re.sub(r"^#   measured: cpu .*$", line, path.read_text(), count=1, flags=re.M)
        path.write_text(text)


if __name__ == "__main__":
    main()
