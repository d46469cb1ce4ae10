"""The built images themselves: a code change rebuilds only the code layers."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.containers


def _build_module():
    spec = importlib.util.spec_from_file_location("lawtune_images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context_copy(dest: Path) -> None:
    """The build context as git has it (wheels hardlinked), so the test never edits the checkout."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "shared", "jobs", "images",
                            "pyproject.toml", "constraints.txt", "configs/data", ".dockerignore"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    for wheel in (REPO / "images" / "wheels").glob("*.whl"):
        os.link(wheel, dest / "images" / "wheels" / wheel.name)


@pytest.mark.parametrize("image", ["preprocess", "finetune"])
def test_a_one_line_code_change_rebuilds_only_the_code_layers(engine, images, image, tmp_path):
    """The same flags `make images DEVICE=cpu` uses, on a copy of the context: built as it is (all from
    the cache when the images are current), then with one comment line added to shared/: every
    step before the code comes from the cache, and the code is copied again."""
    build = _build_module()
    context = tmp_path / "context"
    _context_copy(context)
    name = f"lawtune-test/{image}:code-change"
    tag = os.environ.get("LAWTUNE_TEST_IMAGE_TAG", "0.1.0")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            flags = build.build_flags(engine, "auto", "cpu", Path(scratch))
            build.build(engine, image, name, "cpu", tag, flags, None, context=context)
            touched = context / "shared" / "core" / "__init__.py"
            touched.write_text(touched.read_text() + "# a one-line change\n")
            result = build.build(engine, image, name, "cpu", tag, flags, None, context=context)
        layers = [s for s in result["steps"] if not re.search(r"\] FROM ", s["step"])]  # FROM resolves; it builds nothing
        code = next(i for i, s in enumerate(layers) if "COPY shared/" in s["step"])
        assert all(s["cached"] for s in layers[:code]), [s["step"] for s in layers[:code] if not s["cached"]]
        assert not layers[code]["cached"], "the changed code was not copied again"
    finally:
        subprocess.run([*engine, "image", "rm", "-f", name], capture_output=True)
