"""The split files' names: the data stage writes each split under ``data_config``'s name for it.

``build`` (shared/data/preprocessing.py) writes the splits by role, ``train.jsonl``,
``dev.jsonl`` and ``test.jsonl``; ``name_splits`` then gives each the name ``data_config``
asks for (the ChatGLM3 demo's ``train.json`` / ``dev.json``), and the data manifest records
role -> name under ``extra.files``. When ``test_file`` names the ``val_file`` (the demo's own
lora.yaml: it has no test set) the dev and test rows share that file, as in the demo.
Downstream stages ask ``split_file`` for a role's name, which fails (exit 2, naming the key)
when the artifact was written under other names than the config says.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.core.config import DataConfig
from shared.core.errors import ConfigError

log = logging.getLogger(__name__)

KEYS = {"train": "data_config.train_file", "dev": "data_config.val_file", "test": "data_config.test_file"}


def name_splits(folder: Path, data_config: DataConfig) -> dict[str, str]:
    """Rename ``<role>.jsonl`` in ``folder`` to the configured names; role -> file name."""
    files = data_config.files()
    # Move every role file aside first, so names that swap roles (train_file: dev.jsonl) cannot clobber.
    staged = {role: folder / f".split-{role}" for role in files}
    for role, path in staged.items():
        (folder / f"{role}.jsonl").rename(path)
    written: set[str] = set()
    for role, name in files.items():
        with open(folder / name, "ab" if name in written else "wb") as dst, open(staged[role], "rb") as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        staged[role].unlink()
        written.add(name)
    if files["dev"] == files["test"]:
        log.warning(
            "data_config.test_file names the val_file (%s): the dev and test rows share it, as in the ChatGLM3 demo; "
            "evaluation then scores examples that also chose the best checkpoint", files["dev"],
        )
    return files


def split_file(data_extra: dict[str, Any], data_config: DataConfig, role: str, where: str) -> str:
    """The file holding ``role`` in a data artifact (manifest ``extra``), checked against the config."""
    wanted = data_config.files()[role]
    recorded = (data_extra.get("files") or {}).get(role)
    if recorded is not None and recorded != wanted:
        raise ConfigError(
            f"{KEYS[role]} is {wanted!r} but the data artifact {where} holds the {role} split as {recorded!r}; "
            "run preprocess with the same config, or set the key to the artifact's name"
        )
    return wanted
