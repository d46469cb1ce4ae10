"""The artifact contract: a folder is complete only when its MANIFEST.json exists.

A stage writes its files first and ``MANIFEST.json`` last (sizes, sha256, inputs, times,
status). Readers refuse a folder without a manifest and verify every file they fetch.
A stage whose manifest records the same inputs digest is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError, field_validator

from shared.core.errors import IntegrityError, StorageError
from shared.core.failpoints import failpoint
from shared.store.paths import check_relative_path, inside
from shared.store.storage import Location

MANIFEST = "MANIFEST.json"
SCHEMA = "lawtune.manifest/v1"
_HASH_CHUNK = 1024 * 1024


class FileEntry(BaseModel):
    path: str  # relative, '/'-separated, inside the folder: checked, since readers write <target>/<path>
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_the_folder(cls, path: str) -> str:
        return check_relative_path(path)


class Manifest(BaseModel):
    schema_: str = Field(default=SCHEMA, alias="schema")
    stage: str
    status: str = "complete"
    run_id: str | None = None
    code_version: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    inputs_digest: str
    started_at: str
    finished_at: str
    files: list[FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict)

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        """What downstream stages record as this artifact's identity."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise IntegrityError(f"manifest of stage {self.stage!r} lists no file {path!r}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_inputs(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def digest_file_or_text(value: str | bytes) -> str:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


def _local_files(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(loc: Location) -> Manifest:
    """The folder's manifest, or IntegrityError naming the folder when it is incomplete."""
    if not loc.exists(MANIFEST):
        raise IntegrityError(
            f"{loc.uri} has no {MANIFEST}: the stage that writes it did not finish, so it is not read"
        )
    try:
        return Manifest.model_validate_json(loc.read_bytes(MANIFEST))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise IntegrityError(f"{loc.uri}/{MANIFEST} is not a valid manifest, refused: {problems}") from exc
    except ValueError as exc:
        raise IntegrityError(f"{loc.uri}/{MANIFEST} is not a valid manifest: {exc}") from exc


def find_manifest(loc: Location) -> Manifest | None:
    try:
        return read_manifest(loc)
    except IntegrityError:
        return None


def should_skip(loc: Location, inputs: dict[str, Any]) -> Manifest | None:
    """The committed manifest when it records exactly these inputs (the stage can be skipped).

    Only the manifest is read: ``damaged_files`` checks the files under it before a skip is final."""
    manifest = find_manifest(loc)
    if manifest and manifest.status == "complete" and manifest.inputs_digest == digest_inputs(inputs):
        return manifest
    return None


def damaged_files(loc: Location, manifest: Manifest) -> list[str]:
    """The manifest's files whose stored bytes are missing or differ from it (size, then sha256), each
    with what is wrong. A skip trusts the files under a manifest for good; a file that rotted, was
    overwritten or removed since must not be skipped over (every later reader would fail on it)."""
    sizes = loc.sizes()
    damaged = []
    for entry in manifest.files:
        size = sizes.get(entry.path)
        if size is None:
            damaged.append(f"{entry.path} (missing)")
        elif size != entry.size:
            damaged.append(f"{entry.path} (size {size} bytes, manifest says {entry.size})")
        elif (digest := loc.sha256(entry.path)) != entry.sha256:
            damaged.append(f"{entry.path} (sha256 {digest[:12]}… , manifest says {entry.sha256[:12]}…)")
    return damaged


def commit_dir(
    local_dir: Path,
    loc: Location,
    *,
    stage: str,
    inputs: dict[str, Any],
    started_at: str,
    run_id: str | None = None,
    code_version: str | None = None,
    extra: dict[str, Any] | None = None,
    max_workers: int = 8,
    clean: bool = True,
    guard: Callable[[], None] | None = None,
) -> Manifest:
    """Upload every file of ``local_dir`` to ``loc`` and then, last, its manifest.

    Any earlier manifest is deleted first, so a crash mid-upload leaves a folder that
    readers refuse rather than a mix of old and new files that looks complete. ``guard``
    (the writer lease's check) runs immediately before the manifest is written: uploads can
    take minutes, and a writer that lost its folder meanwhile must not commit over the new one.
    """
    loc.delete(MANIFEST)
    files = _local_files(local_dir)
    entries: list[FileEntry] = []

    def _one(path: Path) -> FileEntry:
        rel = path.relative_to(local_dir).as_posix()
        entry = FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path))
        loc.upload_file(path, rel)
        return entry

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        entries = list(pool.map(_one, files))

    if clean:
        # Leftovers of an earlier attempt with other inputs would otherwise linger unlisted.
        keep = {e.path for e in entries}
        for rel in loc.list_files():
            if rel not in keep and rel != MANIFEST and not rel.startswith("checkpoints/"):
                loc.delete(rel)

    manifest = Manifest(
        stage=stage,
        run_id=run_id,
        code_version=code_version,
        inputs=inputs,
        inputs_digest=digest_inputs(inputs),
        started_at=started_at,
        finished_at=now_iso(),
        files=entries,
        extra=extra or {},
    )
    failpoint(f"commit:{stage}")
    if guard is not None:
        guard()
    loc.write_text(MANIFEST, manifest.to_json())
    return manifest


def verify_file(path: Path, entry: FileEntry, source: str) -> None:
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(f"{source}/{entry.path}: size {size} bytes, manifest says {entry.size}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise IntegrityError(
            f"{source}/{entry.path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}… (corrupted)"
        )


def build_atomically(target: Path, build) -> None:
    """Fill a temporary sibling folder with ``build(staging)``, then rename it onto ``target``.

    Readers see the old ``target``, nothing, or the complete new one: never a half-built folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(staging)
        failpoint("fetch:verified")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fetch_dir(loc: Location, target: Path, *, max_workers: int = 8, only: list[str] | None = None) -> Manifest:
    """Download a committed folder to ``target``, verifying every file; all or nothing.

    Files land in a temporary sibling folder that is renamed into place only after every
    checksum passed, so ``target`` is either complete or absent.

    A file that fails its check while the folder's manifest changed or vanished meanwhile was
    not corrupted: the folder's writer is re-running and rewrote it under the reader. That is a
    ``StorageError`` (exit 1: the retry reads the new commit), not an ``IntegrityError`` (exit
    2, which fails a Job for good).
    """
    manifest = read_manifest(loc)
    failpoint("fetch:manifest-read")
    wanted = [e for e in manifest.files if only is None or e.path in only]

    def _build(staging: Path) -> None:
        def _one(entry: FileEntry) -> None:
            dest = inside(staging, entry.path, f"{loc.uri}/{MANIFEST}")
            loc.download_file(entry.path, dest)
            verify_file(dest, entry, loc.uri)

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            list(pool.map(_one, wanted))
        (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")

    try:
        build_atomically(Path(target), _build)
    except (IntegrityError, StorageError) as exc:
        _raise_if_rewritten(loc, manifest, exc)
        raise
    return manifest


def _raise_if_rewritten(loc: Location, read: Manifest, cause: Exception) -> None:
    now = find_manifest(loc)
    if now is None or now.digest != read.digest:
        state = "its manifest is gone" if now is None else f"it was committed again at {now.finished_at}"
        raise StorageError(f"{loc.uri} changed while it was being read ({state}: its writer re-ran); "
                           f"retry once it has committed ({cause})") from cause


def read_verified(loc: Location, rel: str, manifest: Manifest | None = None) -> bytes:
    """One file of a committed folder, checked against its manifest entry."""
    manifest = manifest or read_manifest(loc)
    entry = manifest.file(rel)
    data = loc.read_bytes(rel)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        error = IntegrityError(f"{loc.uri}/{rel}: content does not match the manifest (corrupted)")
        _raise_if_rewritten(loc, manifest, error)
        raise error
    return data
