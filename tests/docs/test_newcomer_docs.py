"""What a newcomer reads first says what the code does: licence, sample provenance, shapes, expectations."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from shared.data.shapes import DEFAULT_LAYOUTS

REPO = Path(__file__).resolve().parents[2]


def test_licence_file_is_the_apache_2_text_pyproject_declares():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (REPO / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_sample_data_states_its_provenance_and_licence():
    readme = (REPO / "configs" / "data" / "README.md").read_text()
    for name in (p.name for p in (REPO / "configs" / "data").glob("*.csv")):
        assert name in readme
    assert "wrote every row" in readme and "Apache-2.0" in readme


def test_data_docs_list_every_layout_the_readers_accept():
    table = (REPO / "docs" / "data.md").read_text()
    for _, _, roles, required in DEFAULT_LAYOUTS:
        inputs_section = table[table.index("## Inputs"):table.index("## Rules")]
        for role in required:
            assert re.search(rf"[`\",]{roles[role]}[`\",]", inputs_section), (roles, role)
    for word in ("Parquet", "save_to_disk", "preprocess.columns", "history", "conversations", "messages", "sampled_out"):
        assert word in table


def test_quickstart_sets_expectations_and_says_how_to_switch_models():
    readme = (REPO / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):readme.index("## How it fits together")]
    assert "135M" in quickstart and "Chinese" in quickstart
    assert "BASE_MODEL=Qwen/Qwen2.5-1.5B-Instruct make train" in quickstart
    # a real before/after pair, quoted from the sample run's report
    assert re.search(r"微调前.*\n.*微调后", quickstart) or ("before" in quickstart and "after" in quickstart)


def _data_docs() -> str:
    return (REPO / "docs" / "data.md").read_text(encoding="utf-8")


def test_data_docs_say_what_preprocess_does_without_a_config():
    """The table of built-in defaults against the sample config matches both (their splits differ)."""
    from shared.core.config import PreprocessConfig, load_config

    defaults, sample = PreprocessConfig(), load_config(REPO / "configs" / "smollm2-135m-cpu.yaml").preprocess
    rows = re.findall(r"^\| `preprocess\.([a-z_]+)`(?: / `([a-z_]+)`)? \| ([^|]+) \| ([^|]+) \|$", _data_docs(), re.M)
    assert {r[0] for r in rows} >= {"dev_ratio", "test_ratio", "min_dev", "min_test", "split_seed"}, rows
    for first, second, without, with_sample in rows:
        keys = [first, second] if second else [first]
        for column, config in ((without, defaults), (with_sample, sample)):
            shown = [v.strip() for v in column.split("/")]
            assert shown == [str(getattr(config, k)) for k in keys], (keys, column)
    assert defaults.dev_ratio != sample.dev_ratio  # the reason the table is there


def test_data_docs_show_the_mapping_through_set_and_it_runs(tmp_path):
    """The `lawtune preprocess ... --set preprocess.columns...` line of docs/data.md, run as written."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    (line,) = [l for l in _data_docs().splitlines() if l.startswith("lawtune preprocess --input own.csv --set ")]
    (tmp_path / "own.csv").write_text("问题,补充说明,回答,是否最佳\n"
                                      "公司不发工资怎么办,拖了三个月,可以申请劳动仲裁。,是\n"
                                      "公司不发工资怎么办,拖了三个月,去找老板。,否\n"
                                      "房东不退押金怎么办,,可以起诉要求返还。,是\n", encoding="utf-8")
    lawtune = Path(sys.executable).with_name("lawtune")
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": f"file://{tmp_path / 'root'}", "LAWTUNE_CACHE_DIR": str(tmp_path / "cache"),
           "LAWTUNE_RUN_ID": "docs"}
    result = subprocess.run([str(lawtune), *shlex.split(line)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "root" / "runs" / "docs" / "data" / "report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 2 and report["rejected_by_reason"] == {"not_best_reply": 1}
    assert report["sources"][0]["unused_columns"] == []


def test_no_page_repeats_a_section_heading():
    """Two sections with one title share one anchor: a link to the second lands on the first, and a
    reader cannot tell two benchmark runs apart (docs/benchmarks.md had the adapters section twice)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "charts").glob("*/README.md"))]
    repeated = {}
    for page in pages:
        fenced = False
        seen: set[str] = set()
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                fenced = not fenced
            if fenced or not re.match(r"#{1,2} ", line):
                continue
            if line in seen:
                repeated.setdefault(str(page.relative_to(REPO)), []).append(line)
            seen.add(line)
    assert not repeated, repeated
