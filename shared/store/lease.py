"""One writer per output folder: a lease a stage holds from its first write to its manifest.

Two processes given the same run id (a Job retried while the first pod still runs, ``make
train`` started twice) would otherwise interleave checkpoints and files of one folder. The
second one exits 1 with a line naming the holder; its retry then finds the folder committed
(and skips) or the lease gone (and resumes).

- ``file://``: ``flock`` on ``<folder>/.lawtune-lease``. The kernel drops it when the holder
  dies, even by SIGKILL, so a re-run never waits for a dead writer.
- ``s3://``: the object ``<folder>/.lawtune-lease`` created with ``If-None-Match: *`` and
  renewed with ``If-Match`` every ``TTL/3`` seconds by a daemon thread (TTL:
  ``LAWTUNE_LEASE_TTL_S``, 60 s). Conditional writes make two contenders never both win, and
  a write whose answer was lost (botocore's retry then fails its own condition) is recognised
  by its content (shared/store/storage.py).

Taking over an S3 lease never trusts another machine's clock. A lease held by a process that
is gone from this very host (same host name, boot and pid namespace; the pid dead or reused)
is taken over at once. Any other lease whose recorded expiry has passed is watched for one
TTL on this process's own monotonic clock and taken over only if it did not change meanwhile:
a holder whose clock is behind ours, or a pod of an Indexed Job that has our host name in
another pid namespace, keeps renewing and so keeps its lease.

The holder fences its own commits: ``check()`` (run by ``commit_dir`` immediately before a
manifest is written, and before every checkpoint) fails once the last renewal that reached
the store is older than ``TTL - TTL/6``, so a writer cut off from the store (down, 403) stops
before any contender can have taken the folder over (which takes a TTL unchanged).
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


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): a reused pid has another."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder() -> dict:
    """Who holds a lease: the host name alone is not enough (an Indexed Job's retried pod has the same
    one, in another pid namespace, possibly while the first pod still runs on another node)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex, "pidns": _pid_namespace(),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "start": _start_time(os.getpid())}


def _gone_from_here(info: dict) -> bool:
    """True when the holder was a process of this very host and pid namespace that no longer exists."""
    me = _holder()
    if not info.get("pidns") or any(info.get(k) != me[k] for k in ("host", "boot", "pidns")):
        return False  # another machine, boot or pid namespace: its pids mean nothing here
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    return not _pid_alive(pid) or _start_time(pid) != info.get("start")


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

    def __init__(self, location: Location, ttl_s: float | None = None):
        self.location = location
        self.ttl_s = ttl_s or TTL_S
        self.info = {**_holder(), "since": time.time()}
        self._fh = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._writes = 0
        self._renewed_at = 0.0  # monotonic time the last write of the lease that reached the store was sent

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
        self._writes += 1  # every write's bytes differ: a write whose answer was lost is recognised by them
        return json.dumps({**self.info, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s, "write": self._writes}).encode()

    def _acquire_s3(self, loc: S3Location) -> None:
        for _ in range(5):
            sent = time.monotonic()
            etag = loc.put_if_absent(LEASE, self._body())
            if etag:
                self._etag, self._renewed_at = etag, sent
                break
            held, held_etag = loc.read_with_token(LEASE)
            if held is None:
                continue  # released between our two calls
            try:
                info = json.loads(held)
            except ValueError:
                info = {}
            if not self._stale(loc, info, held_etag):
                raise LeaseHeld(_describe(loc.uri, info))
            sent = time.monotonic()
            etag = loc.put_if_match(LEASE, self._body(), held_etag)
            if etag:
                log.warning("%s: took over a stale lease of pid %s on %s", loc.uri, info.get("pid"), info.get("host"))
                self._etag, self._renewed_at = etag, sent
                break
        else:
            raise LeaseHeld(f"{loc.uri}: could not take the writer lease after 5 tries (contended)")
        self._thread = threading.Thread(target=self._renew, args=(loc,), name="lawtune-lease", daemon=True)
        self._thread.start()

    def _stale(self, loc: S3Location, info: dict, etag: str | None) -> bool:
        """Whether the lease read as (``info``, ``etag``) may be taken over; may watch it for one TTL."""
        if _gone_from_here(info):
            return True
        if info.get("expires", 0) >= time.time():
            return False  # live by its own account: the caller exits 1 and the Job retries later
        # Expired by our clock, which may run ahead of the holder's: a live holder renews within TTL/3.
        ttl = max(float(info.get("ttl_s") or 0), self.ttl_s)
        log.info("%s: the lease of pid %s on %s looks expired; watching it for %.0f s before taking it over",
                 loc.uri, info.get("pid"), info.get("host"), ttl)
        deadline = time.monotonic() + ttl
        while time.monotonic() < deadline:
            time.sleep(min(1.0, ttl / 10))
            if loc.read_with_token(LEASE)[1] != etag:
                return False  # renewed (or released and retaken): someone is alive
        return True

    def _renew(self, loc: S3Location) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            sent = time.monotonic()
            try:
                etag = loc.put_if_match(LEASE, self._body(), self._etag)
            except StorageError as exc:
                log.warning("lease renewal failed (%s); retrying", exc)
                continue
            if etag is None:
                self._lost = f"{loc.uri}: the writer lease was taken over by another process; not committing"
                return
            self._etag, self._renewed_at = etag, sent

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
        """Raise unless this writer still holds the folder: not taken over, and (S3) renewed recently
        enough that no contender can have taken it over (one TTL unchanged) by the time we write."""
        if self._lost:
            raise StorageError(self._lost)
        if self._etag is not None:
            silent = time.monotonic() - self._renewed_at
            if silent > self.ttl_s * 5 / 6:
                raise StorageError(
                    f"{self.location.uri}: the writer lease was last renewed {silent:.0f} s ago (TTL {self.ttl_s:.0f} s; "
                    "the store refused or did not answer the renewals since): another writer may take the folder "
                    "over now, so this one does not commit")

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

