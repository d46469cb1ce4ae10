"""A model repository's own Python code (``trust_remote_code``), allowed only by its sha256.

Models such as ChatGLM3 run ``*.py`` files from their own folder once remote code is on. Whether
it is on is always the operator's switch (the config's ``trust_remote_code``, ``--trust-remote-code``,
the chart's ``vllm.trustRemoteCode``), never something an artifact says; and which code may run is
fixed when it first runs: finetune records every code file of the base model's folder in its
manifest (``extra.remote_code``: path -> sha256), publish checks the base folder against that record
and carries it into the published version, and evaluate, publish, fetch-model and ``lawtune deploy``
compare the code they are about to run with it. A code file the record does not list, one whose
sha256 differs, or a recorded one that is missing is refused (ConfigError, exit 2, naming the file).
So whoever can write the store can no longer slip new code under a run or a release that trusted
the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.core.errors import ConfigError

RECORD = "remote_code"  # the manifest ``extra`` key


def code_files(folder: Path) -> dict[str, str]:
    """Every ``*.py`` below ``folder`` (relative POSIX path -> sha256): what transformers may import from it."""
    from shared.store.artifacts import sha256_file

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.py")) if p.is_file()}


def manifest_code(manifest: Any) -> dict[str, str]:
    """The ``*.py`` files a manifest lists, with the sha256 every reader verifies them against."""
    return {f.path: f.sha256 for f in manifest.files if f.path.endswith(".py")}


def check_code(present: dict[str, str], recorded: dict[str, str] | None, *, where: str, record: str) -> None:
    """Refuse unless the code files ``present`` at ``where`` are exactly those ``record`` lists (same sha256)."""
    if not present and not recorded:
        return
    if recorded is None:
        name = sorted(present)[0]
        raise ConfigError(f"{where}/{name}: {record} records no remote-code digests (the run that trained this model "
                          "did not run its code, or predates the record): re-run finetune with trust_remote_code: true; refused")
    for name in sorted(present):
        if name not in recorded:
            raise ConfigError(f"{where}/{name}: a code file {record} does not list; refused")
        if present[name] != recorded[name]:
            raise ConfigError(f"{where}/{name}: sha256 {present[name][:12]}… differs from the {recorded[name][:12]}… "
                              f"{record} recorded; refused")
    if missing := sorted(set(recorded) - set(present)):
        raise ConfigError(f"{where}/{missing[0]}: recorded in {record} but missing; refused")


def check_folder(folder: Path, recorded: dict[str, str] | None, *, record: str) -> dict[str, str]:
    """``check_code`` for a model folder on disk; returns its code files."""
    present = code_files(folder)
    check_code(present, recorded, where=str(folder), record=record)
    return present


def foreign_code(config: dict[str, Any]) -> str | None:
    """An ``auto_map`` entry naming code in another repository (``owner/repo--module.Class``): code no
    folder holds, so no record can cover it."""
    for key, value in (config.get("auto_map") or {}).items():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and "--" in ref:
                return f"auto_map.{key} = {ref!r}"
    return None
