"""Logging set up once per process, and progress bars for long loops.

Progress goes to stderr through tqdm; under Kubernetes (no TTY) it redraws at most every
``LAWTUNE_PROGRESS_INTERVAL`` seconds so Job logs stay readable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(configure_logging, "_done", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "jieba", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_logging._done = True  # type: ignore[attr-defined]


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    interval = float(os.environ.get("LAWTUNE_PROGRESS_INTERVAL", "0.1" if interactive else "10"))
    yield from tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        mininterval=interval,
        disable=os.environ.get("LAWTUNE_NO_PROGRESS") == "1",
        dynamic_ncols=interactive,
    )
