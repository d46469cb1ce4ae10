"""One writer per output folder: a lease a stage holds from its first write to its manifest.

Two processes given the same run id (a Job retried while the first pod still runs, ``make
train`` started twice) would otherwise interleave checkpoints and files of one folder. The
second one exits 1 with a line naming the holder; its retry then finds the folder committed
(and skips) or the lease gone (and resumes).

- ``file://``: ``flock`` on ``<folder>/.lawtune-lease``. The kernel drops it when the holder
  dies, even by SIGKILL, so a re-run never waits for a dead writer.
- ``s3://``: the object ``<folder>/.lawtune-lease`` created with ``If-None-Match: *`` and
  renewed with ``If-Match`` every ``TTL/3`` seconds by a daemon thread. A lease past its
  expiry, or one held by a process of this host that no longer exists, is stale and taken
  over with ``If-Match`` on its ETag, so two contenders never both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from shared.core.errors import StorageError
from shared.store.storage import HIDDEN_PREFIX, FileLocation, Location, S3Location

LEASE = HIDDEN_PREFIX + "lease"  # hidden from list_files: bookkeeping, not an artifact file
TTL_S = 60.0
log = logging.getLogger(__name__)


class LeaseHeld(StorageError):
    """Another live process writes this folder (exit 1: retrying later can succeed)."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}


def _describe(uri: str, info: dict) -> str:
    since = time.strftime("%H:%M:%S", time.gmtime(info.get("since", 0)))
    return (f"{uri} is being written by pid {info.get('pid')} on {info.get('host')} (since {since} UTC); "
            "not starting a second writer: wait for it, or stop it and retry")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Held by ``acquire``; ``check()`` before a commit raises if it was lost; ``release()`` frees it."""

    def __init__(self, location: Location):
        self.location = location
        self.info = {**_holder(), "since": time.time()}
        self._fh = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # --- file:// -------------------------------------------------------------------------
    def _acquire_file(self, loc: FileLocation) -> None:
        loc.path.mkdir(parents=True, exist_ok=True)
        fh = open(loc.path / LEASE, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                info = json.loads(fh.read() or "{}")
            except ValueError:
                info = {}
            fh.close()
            raise LeaseHeld(_describe(loc.uri, info)) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(self.info))
        fh.flush()
        self._fh = fh

    # --- s3:// ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.info, "expires": time.time() + TTL_S}).encode()

    def _acquire_s3(self, loc: S3Location) -> None:
        for _ in range(5):
            etag = loc.put_if_absent(LEASE, self._body())
            if etag:
                self._etag = etag
                break
            held, held_etag = loc.read_with_token(LEASE)
            if held is None:
                continue  # released between our two calls
            try:
                info = json.loads(held)
            except ValueError:
                info = {}
            if not self._stale(info):
                raise LeaseHeld(_describe(loc.uri, info))
            etag = loc.put_if_match(LEASE, self._body(), held_etag)
            if etag:
                log.warning("%s: took over a stale lease of pid %s on %s", loc.uri, info.get("pid"), info.get("host"))
                self._etag = etag
                break
        else:
            raise LeaseHeld(f"{loc.uri}: could not take the writer lease after 5 tries (contended)")
        self._thread = threading.Thread(target=self._renew, args=(loc,), name="lawtune-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _stale(info: dict) -> bool:
        if info.get("expires", 0) < time.time():
            return True
        return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])

    def _renew(self, loc: S3Location) -> None:
        while not self._stop.wait(TTL_S / 3):
            try:
                etag = loc.put_if_match(LEASE, self._body(), self._etag)
            except StorageError as exc:
                log.warning("lease renewal failed (%s); retrying", exc)
                continue
            if etag is None:
                self._lost = f"{loc.uri}: the writer lease was taken over by another process; not committing"
                return
            self._etag = etag

    # --- both ----------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        if isinstance(self.location, FileLocation):
            self._acquire_file(self.location)
        elif isinstance(self.location, S3Location):
            self._acquire_s3(self.location)
        else:  # pragma: no cover - a new backend must bring its own lease
            raise TypeError(f"no lease for {type(self.location).__name__}")
        return self

    def check(self) -> None:
        if self._lost:
            raise StorageError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        if self._etag is not None and isinstance(self.location, S3Location) and not self._lost:
            with contextlib.suppress(StorageError):
                self.location.delete_if_match(LEASE, self._etag)
            self._etag = None

