"""One place for artifact I/O: a ``Location`` is a prefix in S3 or a local folder.

Both backends speak the same small vocabulary (list, read, write, upload, download, delete)
in paths relative to the location, so stages and tests never care which one they have.
S3 goes through boto3's transfer manager (parallel multipart) with retries; credentials are
boto3's business and never pass through here.

Fault handling lives here and nowhere else (docs/reliability.md has the table of what was
tried): every S3 call retries under botocore's ``standard`` (or ``adaptive``) mode —
throttling (503 SlowDown), 500/502/504, connection resets and read timeouts — up to
``LAWTUNE_S3_MAX_ATTEMPTS`` with exponential backoff; a connection that sends nothing for
``LAWTUNE_S3_READ_TIMEOUT`` seconds counts as failed. A body cut off *after* the call
returned (botocore's retries end at the headers) is re-read here, as the transfer manager
does for downloads. What still fails becomes a ``StorageError`` (exit 1: the Job retries).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from shared.core.errors import StorageError
from shared.core.settings import Settings
from shared.core.uri import ParsedURI, join, parse_uri

MULTIPART_CHUNK = 8 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024
# Names starting with this are the store's bookkeeping (temp files, the writer lease), never artifact files.
HIDDEN_PREFIX = ".lawtune-"
TMP_PREFIX = ".lawtune-tmp-"


class Location(ABC):
    """A folder-like prefix. Relative paths use '/' on every backend."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @abstractmethod
    def child(self, rel: str) -> "Location": ...

    @abstractmethod
    def list_files(self) -> list[str]:
        """Every file below this location, as sorted relative paths."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, local: Path, rel: str) -> None: ...

    @abstractmethod
    def download_file(self, rel: str, local: Path) -> None: ...

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove one file; missing is fine."""

    @abstractmethod
    def sizes(self) -> dict[str, int]:
        """Every file below this location (as ``list_files`` names them) and its size in bytes."""

    @abstractmethod
    def sha256(self, rel: str) -> str:
        """The sha256 of one stored file, read from the store in chunks (never whole into memory)."""

    @abstractmethod
    def sweep_temporaries(self) -> int:
        """Remove what a writer killed mid-write left behind (temp files, unfinished multipart
        uploads) below this location; the count removed. Only the lease holder calls it."""

    def delete_all(self) -> None:
        for rel in self.list_files():
            self.delete(rel)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    @abstractmethod
    def read_with_token(self, rel: str) -> tuple[bytes | None, str | None]:
        """(content, a token naming this exact content) or (None, None) when the file is missing."""

    @abstractmethod
    def write_if(self, rel: str, data: bytes, token: str | None) -> bool:
        """Compare-and-swap: write only while the file still has ``token`` (None: does not exist yet).

        False when someone else changed it first; then nothing was written.
        """

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))


class FileLocation(Location):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"file://{self.path}")

    def child(self, rel: str) -> "FileLocation":
        return FileLocation(self.path / rel)

    def list_files(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.is_file() and not p.name.startswith(HIDDEN_PREFIX)
        )

    def sweep_temporaries(self) -> int:
        if not self.path.is_dir():
            return 0
        stale = [p for p in self.path.rglob(f"{TMP_PREFIX}*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def sizes(self) -> dict[str, int]:
        return {rel: (self.path / rel).stat().st_size for rel in self.list_files()}

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        try:
            with open(self.path / rel, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
        except FileNotFoundError as exc:
            raise StorageError(f"{join(self.uri, rel)} does not exist") from exc
        return h.hexdigest()

    def read_bytes(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{join(self.uri, rel)} does not exist") from exc

    def _atomic_target(self, rel: str) -> tuple[Path, Path]:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        # mkstemp makes 0600 files; artifacts must stay readable by other users of the volume.
        os.fchmod(fd, 0o644)
        os.close(fd)
        return target, Path(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        target, tmp = self._atomic_target(rel)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local: Path, rel: str) -> None:
        target, tmp = self._atomic_target(rel)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def download_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self.path / rel, local)
        except FileNotFoundError as exc:
            raise StorageError(f"{join(self.uri, rel)} does not exist") from exc

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink(missing_ok=True)

    def read_with_token(self, rel: str) -> tuple[bytes | None, str | None]:
        try:
            data = (self.path / rel).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, rel: str, data: bytes, token: str | None) -> bool:
        import fcntl

        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # flock serialises the compare and the rename among every process on this host (and on
        # NFSv4 clients); the rename keeps readers from ever seeing a half-written file.
        with open(target.parent / f".{target.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.read_with_token(rel)[1] != token:
                    return False
                self.write_bytes(rel, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class S3Location(Location):
    """An S3 prefix. Its ``write_if`` serialises writers under an expiring lock object, then writes conditionally.

    SeaweedFS honours If-Match and If-None-Match (412 on a stale ETag). Whether concurrent
    conditional PUTs from one ETag let exactly one through depends on the store and its version: an
    early measurement on SeaweedFS 4.48 saw more than one succeed; the pinned one gave one winner
    in 20 batches of 8 (docs/reliability.md, tests/shared/publish/test_registry.py). So the lock
    (``<rel>.lock``: owner and expiry, taken by writing it and reading it back after a pause; a
    dead holder's lock expires) keeps lawtune's own writers in line on any store, and the
    conditional PUT inside it (where ``conditional`` is on: AWS S3, MinIO, SeaweedFS) still
    refuses a write the lock let through by mistake on a store whose conditional writes are atomic.
    """

    LOCK_TTL_S = 30.0
    SETTLE_S = 0.3
    WAIT_S = 60.0

    def __init__(self, bucket: str, prefix: str, client, transfer_config, *, conditional: bool = True, lock: bool = True):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._transfer = transfer_config
        self.conditional, self.lock = conditional, lock
        super().__init__(f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def child(self, rel: str) -> "S3Location":
        return S3Location(self.bucket, self._key(rel), self._client, self._transfer, conditional=self.conditional, lock=self.lock)

    def _wrap(self, action: str, rel: str, exc: Exception) -> StorageError:
        # str(exc) from botocore names the operation and the error code, never credentials.
        hint = ""
        if _status(exc) == 403:
            # Static keys rotated under a running pod, or a session token past its expiry: the retried
            # Job's new pod reads the current Secret / token. Seen again there, it is the credentials.
            hint = ("; the store refused this process's credentials (expired or rotated?): the retry starts with "
                    "fresh ones, and if it fails the same way, check AWS_ACCESS_KEY_ID / the role and the bucket policy")
        return StorageError(f"S3 {action} {join(self.uri, rel)} failed: {exc}{hint}")

    def list_files(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.extend(obj["Key"][len(base):] for obj in page.get("Contents", [])
                           if not obj["Key"].rpartition("/")[2].startswith(HIDDEN_PREFIX))
        except Exception as exc:  # botocore raises many unrelated types
            raise self._wrap("list", "", exc) from exc
        return sorted(out)

    def sizes(self) -> dict[str, int]:
        base = f"{self.prefix}/" if self.prefix else ""
        out: dict[str, int] = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.update((obj["Key"][len(base):], obj["Size"]) for obj in page.get("Contents", [])
                           if not obj["Key"].rpartition("/")[2].startswith(HIDDEN_PREFIX))
        except Exception as exc:
            raise self._wrap("list", "", exc) from exc
        return out

    def sha256(self, rel: str) -> str:
        def digest(body) -> str:
            h = hashlib.sha256()
            for chunk in body.iter_chunks(_HASH_CHUNK):
                h.update(chunk)
            return h.hexdigest()

        return self._read_body(rel, digest)

    def _read_body(self, rel: str, consume):
        """``consume(body)`` of the object, read again from the start when the body is cut off."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        # botocore retries a call until its headers arrive; a body cut off after that is ours to re-read.
        streaming = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, BotoConnectionError)
        attempts = self._client.meta.config.retries.get("total_max_attempts", 3)
        for attempt in range(1, attempts + 1):
            try:
                return consume(self._client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"])
            except streaming as exc:
                if attempt == attempts:
                    raise self._wrap("get", rel, exc) from exc
                time.sleep(min(2.0, 0.1 * 2**attempt))
            except Exception as exc:
                raise self._wrap("get", rel, exc) from exc
        raise AssertionError("unreachable")

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._wrap("head", rel, exc) from exc

    def read_bytes(self, rel: str) -> bytes:
        return self._read_body(rel, lambda body: body.read())

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as exc:
            raise self._wrap("put", rel, exc) from exc

    def upload_file(self, local: Path, rel: str) -> None:
        try:
            self._client.upload_file(str(local), self.bucket, self._key(rel), Config=self._transfer)
        except Exception as exc:
            raise self._wrap("upload", rel, exc) from exc

    def download_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client.download_file(self.bucket, self._key(rel), str(local), Config=self._transfer)
        except Exception as exc:
            raise self._wrap("download", rel, exc) from exc

    def sweep_temporaries(self) -> int:
        base = f"{self.prefix}/" if self.prefix else ""
        aborted = 0
        try:
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
        except Exception as exc:
            raise self._wrap("abort unfinished uploads under", "", exc) from exc
        return aborted

    # Conditional writes (S3 If-None-Match / If-Match): the run-folder lease and PROMOTED's swap build on them.
    def put_if_absent(self, rel: str, data: bytes) -> str | None:
        """Create ``rel`` only if it does not exist: its ETag, or None when someone else's is there."""
        return self._conditional_put(rel, data, IfNoneMatch="*")

    def put_if_match(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``rel`` only if it still has ``etag``: the new ETag, or None when it changed."""
        return self._conditional_put(rel, data, IfMatch=etag)

    def delete_if_match(self, rel: str, etag: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(rel), IfMatch=etag)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "404", "NoSuchKey"):
                raise self._wrap("delete", rel, exc) from exc
        except Exception as exc:
            raise self._wrap("delete", rel, exc) from exc

    def _conditional_put(self, rel: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **condition)["ETag"]
        except ClientError as exc:
            # 412: the object changed (or appeared); 409: a concurrent conditional write won.
            if (exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)):
                if exc.response.get("ResponseMetadata", {}).get("RetryAttempts"):
                    # An earlier attempt may have been applied and only its answer lost (a reset, a timeout):
                    # botocore's retry then fails its own condition. The object holding exactly our bytes
                    # is that write of ours (callers put a unique id in what they write).
                    held, etag = self.read_with_token(rel)
                    if held == data:
                        return etag
                return None
            raise self._wrap("conditional put", rel, exc) from exc
        except Exception as exc:
            raise self._wrap("put", rel, exc) from exc

    def delete(self, rel: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception as exc:
            raise self._wrap("delete", rel, exc) from exc

    def read_with_token(self, rel: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(rel))
            return obj["Body"].read(), obj["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise self._wrap("get", rel, exc) from exc
        except Exception as exc:
            raise self._wrap("get", rel, exc) from exc

    def write_if(self, rel: str, data: bytes, token: str | None) -> bool:
        if not self.lock:
            return self._swap(rel, data, token)
        owner, acquired = self._acquire(f"{rel}.lock")
        try:
            # A contender takes the lock over once it saw it unchanged for LOCK_TTL_S: swap well before that.
            held_for = time.monotonic() - acquired
            if held_for > self.LOCK_TTL_S * 5 / 6:
                raise StorageError(f"{join(self.uri, rel)}.lock was taken {held_for:.0f} s ago (this process stalled); "
                                   "not swapping under a lock another writer may have taken over: retry")
            return self._swap(rel, data, token)
        finally:
            held, _ = self.read_with_token(f"{rel}.lock")
            if held is not None and json.loads(held).get("owner") == owner:
                self.delete(f"{rel}.lock")

    def _swap(self, rel: str, data: bytes, token: str | None) -> bool:
        if not self.conditional:
            if self.read_with_token(rel)[1] != token:
                return False
            self.write_bytes(rel, data)
            return True
        etag = self.put_if_absent(rel, data) if token is None else self.put_if_match(rel, data, token)
        return etag is not None

    def _acquire(self, lock: str) -> tuple[str, float]:
        """Take the lock object: (our owner id, the monotonic time it became ours).

        A held lock is taken over only after it stayed unchanged for ``LOCK_TTL_S`` on this process's own
        monotonic clock: the ``expires`` it records is another machine's wall clock, and a contender whose
        clock runs ahead would otherwise take a live holder's lock (both would then swap)."""
        me = uuid.uuid4().hex
        deadline = time.monotonic() + self.WAIT_S
        seen: tuple[str | None, float] | None = None  # (the lock's ETag, when we first saw that one)
        while True:
            held, etag = self.read_with_token(lock)
            now = time.monotonic()
            if held is not None and (seen is None or seen[0] != etag):
                seen = (etag, now)
            if held is None or now - seen[1] > self.LOCK_TTL_S:
                self.write_bytes(lock, json.dumps({"owner": me, "expires": time.time() + self.LOCK_TTL_S}).encode())
                taken = time.monotonic()
                time.sleep(self.SETTLE_S)  # a writer that read "free" with us has written by now: last one owns it
                mine, _ = self.read_with_token(lock)
                if mine is not None and json.loads(mine).get("owner") == me:
                    return me, taken
            if time.monotonic() > deadline:
                raise StorageError(f"{join(self.uri, lock)} stayed locked for {self.WAIT_S:.0f}s; is another promotion stuck?")
            time.sleep(self.SETTLE_S * (0.5 + random.random()))


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind a botocore/boto3 error (boto3's transfer errors wrap the ClientError)."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None


def s3_client(settings: Settings):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.s3_region,
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": settings.s3_retry_mode},
        s3={"addressing_style": settings.s3_addressing_style},
        max_pool_connections=max(10, settings.s3_max_concurrency * 2),
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def transfer_config(settings: Settings):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_CHUNK,
        multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=settings.s3_max_concurrency,
        use_threads=True,
    )


_CLIENTS: dict[tuple, object] = {}


def open_location(uri: str, settings: Settings) -> Location:
    parsed: ParsedURI = parse_uri(uri)
    if parsed.scheme == "file":
        return FileLocation(parsed.path)
    key = (settings.s3_endpoint_url, settings.s3_region, settings.s3_addressing_style, settings.s3_max_concurrency,
           settings.s3_retry_mode, settings.s3_max_attempts, settings.s3_connect_timeout, settings.s3_read_timeout)
    if key not in _CLIENTS:
        _CLIENTS[key] = s3_client(settings)
    return S3Location(parsed.bucket, parsed.path, _CLIENTS[key], transfer_config(settings),
                      conditional=settings.s3_conditional_writes, lock=settings.s3_promotion_lock)
