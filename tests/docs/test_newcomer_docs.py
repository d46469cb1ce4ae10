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
