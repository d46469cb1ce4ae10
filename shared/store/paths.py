"""Names read from the artifact store that become local paths: checked before anything is written.

Whoever can write the store must not get to write anywhere else. A manifest's file paths become
``<target>/<path>`` in fetch-model's init container, evaluate and publish, and ``PROMOTED``'s
content becomes ``models/<name>/<version>``: an absolute path, a ``..`` or a ``/`` there would
reach outside the folder the reader means. Both are refused as bad input (exit 2), naming the
value and where it was read.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.core.errors import ConfigError, IntegrityError

# What publish writes and the serving chart's model.version pattern accepts.
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def unsafe_relative_path(path: str) -> str | None:
    """Why ``path`` cannot name a file inside a folder (None when it can).

    Manifests hold POSIX paths as ``commit_dir`` writes them: relative, ``/``-separated, no
    empty, ``.`` or ``..`` parts, no backslash or NUL (the last two: a path another platform
    or a C library would read differently)."""
    if not path:
        return "is empty"
    if "\x00" in path or "\\" in path:
        return "holds a NUL or a backslash"
    if path.startswith("/"):
        return "is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "climbs out with '..'"
    if "" in parts or "." in parts:
        return "has an empty or '.' part"
    return None


def check_relative_path(path: str) -> str:
    """``path`` itself, or ValueError saying why it cannot name a file inside a folder."""
    reason = unsafe_relative_path(path)
    if reason:
        raise ValueError(f"path {path!r} {reason}")
    return path


def inside(root: Path, path: str, source: str) -> Path:
    """``root / path``, refused (IntegrityError naming ``source``) unless it resolves inside ``root``.

    The checked manifest path alone would do; resolving as well catches a symlink already
    under ``root`` that points elsewhere."""
    reason = unsafe_relative_path(path)
    dest = root / path
    if reason is None and not dest.resolve().is_relative_to(root.resolve()):
        reason = f"resolves outside {root}"
    if reason:
        raise IntegrityError(f"{source}: file path {path!r} {reason}; refused")
    return dest


def check_version(version: str, source: str) -> str:
    """A version name as read from ``source`` (``.../PROMOTED``, ``--version``): one path part,
    letters, digits and ``._-``, starting with a letter or digit; ConfigError (exit 2) otherwise."""
    if not _VERSION.fullmatch(version):
        raise ConfigError(f"{source} holds {version!r}; expected a version name (letters, digits, '._-', "
                          "starting with a letter or digit): refused")
    return version
