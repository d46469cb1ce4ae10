"""What every stage's ``main()`` shares: logging once, exit codes, one line on failure."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from shared.core.cli import error_line
from shared.core.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRY, LawtuneError

log = logging.getLogger("lawtune")


def run_main(command: str, body: Callable[[], object]) -> int:
    """Run ``body`` and map its outcome to the stage interface's exit codes.

    Known failures end with exactly one line on stderr: ``lawtune <command>: error: <what>``, as
    argparse's own errors (shared/core/cli.py) (a multi-line config report stays together,
    prefixed once).
    """
    try:
        body()
    except KeyboardInterrupt:
        print(error_line(command, "interrupted"), file=sys.stderr)
        return EXIT_RETRY
    except Exception as exc:
        full = _out_of_space(exc)
        if full is not None:
            # The same volume is as small on the retry: exit 1 would loop until the Job's backoffLimit.
            log.debug("disk full", exc_info=True)
            print(error_line(command, disk_full(full)), file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, LawtuneError):
            print(error_line(command, exc), file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, (OSError, TimeoutError)):
            log.debug("I/O failure", exc_info=True)
            print(error_line(command, f"I/O failure, worth retrying: {exc}"), file=sys.stderr)
            return EXIT_RETRY
        # last resort: keep the traceback in the log, one line on stderr
        log.exception("unexpected failure")
        print(error_line(command, f"unexpected {type(exc).__name__}: {exc}"), file=sys.stderr)
        return EXIT_RETRY
    return EXIT_OK


def _out_of_space(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT behind ``exc``, also when a library re-raised it as its own error (torch's
    "file write failed", safetensors' I/O error) with the OS's message in its text."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        for code in (errno.ENOSPC, errno.EDQUOT):
            if os.strerror(code) in str(exc):
                return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() or not os.path.ismount(path):
        if path.parent == path:
            break
        path = path.parent
    return path


def disk_full(exc: OSError) -> str:
    """One line naming the full disk: the file the write failed on when the error names it, else every
    disk the stage writes to (scratch, a file:// store, the temp dir) with its free space."""
    from shared.core.uri import parse_uri

    candidates: list[tuple[str, str]] = []
    for name in (exc.filename, exc.filename2):
        if name:
            candidates.append((str(name), "the file written"))
    if os.environ.get("LAWTUNE_CACHE_DIR"):
        candidates.append((os.environ["LAWTUNE_CACHE_DIR"], "LAWTUNE_CACHE_DIR, the stage's scratch"))
    root = os.environ.get("LAWTUNE_ARTIFACT_ROOT", "")
    if root.startswith("file://"):
        candidates.append((parse_uri(root).path, "LAWTUNE_ARTIFACT_ROOT"))
    import tempfile

    candidates.append((tempfile.gettempdir(), "the temp dir"))
    disks: dict[Path, list[str]] = {}
    for path, role in candidates:
        mount = _mount_point(Path(path))
        disks.setdefault(mount, []).append(f"{path} ({role})")
    parts = []
    for mount, users in disks.items():
        usage = shutil.disk_usage(mount)
        parts.append(f"{mount}: {usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB, holding {', '.join(users)}")
    return (f"disk full ({exc.strerror or exc}): " + "; ".join(parts) +
            ". Retrying on the same disk cannot help: free space, or give the stage a larger volume "
            "(the pipeline chart's scratch size / LAWTUNE_CACHE_DIR)")


__all__ = ["run_main", "disk_full", "EXIT_OK", "EXIT_RETRY", "EXIT_CONFIG"]
