"""The test suite cleans up after itself: a full run copies the bundled model ~20 times, and a
CI machine ran out of disk with them kept (every later test failed with ENOSPC)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

MODULE = """
import pytest
from tests.conftest import module_tmp  # the fixture under test, as the suite's modules get it


@pytest.fixture(scope="module")
def published(module_tmp):
    path = module_tmp("{name}")
    (path / "model.safetensors").write_bytes(b"0" * 1024)
    return path


def test_one(published):
    assert (published / "model.safetensors").exists()


def test_two(published):
    assert {outcome}
"""


def test_module_folders_go_with_their_module_and_stay_when_a_test_failed(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_passes.py").write_text(MODULE.format(name="passes", outcome="True"))
    (project / "test_fails.py").write_text(MODULE.format(name="fails", outcome="False"))
    (project / "test_later.py").write_text(textwrap.dedent("""
        import pathlib
        def test_the_passed_module_is_already_gone(tmp_path_factory):
            base = tmp_path_factory.getbasetemp()
            assert not (base / "passes0").exists()
            assert (base / "fails0" / "model.safetensors").exists()
    """))
    base = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--basetemp={base}",
                           "test_fails.py", "test_passes.py", "test_later.py"],
                          cwd=project, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "1 failed, 4 passed" in proc.stdout, proc.stdout[-3000:]
    assert not (base / "passes0").exists()
    assert (base / "fails0" / "model.safetensors").read_bytes() == b"0" * 1024, "a failed module's folder is kept to look at"


def test_under_the_projects_settings_a_passed_tests_tmp_path_goes_when_it_ends(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_order.py").write_text(textwrap.dedent("""
        seen = {}
        def test_writes(tmp_path):
            (tmp_path / "weights.bin").write_bytes(b"0" * 1024)
            seen["path"] = tmp_path
        def test_it_is_gone():
            assert not seen["path"].exists()
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-c", str(REPO / "pyproject.toml"),
                           "--rootdir", str(project), f"--basetemp={tmp_path / 'base'}", "test_order.py"],
                          cwd=project, capture_output=True, text=True)
    assert "2 passed" in proc.stdout, proc.stdout[-3000:]
