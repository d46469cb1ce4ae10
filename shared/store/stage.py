"""A stage's output: skip when the same inputs are committed, else stage locally and commit.

    with StageOutput(settings, "data", output_uri, inputs) as out:
        if out.skipped:            # same inputs already committed
            return out.skipped
        write files under out.workdir ...
        manifest = out.commit(extra={...})

Leaving the block without ``commit`` (an exception, a bad row count) commits nothing, so a
failed stage leaves no manifest a later stage could read.

Entering the block (when not skipped) takes the folder's writer lease (shared/store/lease.py:
a second process on the same folder exits 1 naming the holder) and then sweeps what a writer
killed mid-write left there (temp files, unfinished multipart uploads). The output must lie
inside the artifact root: a URI elsewhere, or one with a ``..`` segment, is exit 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.core.errors import ConfigError, IntegrityError
from shared.core.settings import Settings
from shared.core.uri import parse_uri
from shared.store.artifacts import Manifest, commit_dir, damaged_files, fetch_dir, find_manifest, now_iso, should_skip
from shared.store.lease import Lease
from shared.store.storage import Location, open_location

log = logging.getLogger(__name__)
# Written by publish into runs/<run_id>/: this run's stages are part of published models' lineage.
PUBLISHED = "PUBLISHED"


class StageOutput:
    def __init__(self, settings: Settings, stage: str, output_uri: str, inputs: dict[str, Any], *, force: bool = False):
        self.settings = settings
        self.stage = stage
        check_inside_root(settings, output_uri)
        self.location: Location = open_location(output_uri, settings)
        self.inputs = {**inputs, "code_version": settings.resolved_code_version}
        self.started_at = now_iso()
        self.skipped: Manifest | None = None if force else should_skip(self.location, self.inputs)
        if not self.skipped:
            _refuse_rewriting_published(self.location, output_uri, settings)
        self.workdir: Path | None = None
        self.manifest: Manifest | None = None
        self.lease: Lease | None = None

    def __enter__(self) -> "StageOutput":
        if self.skipped:
            self._check_before_skipping()
        if not self.skipped and os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
            self.lease = Lease(self.location, self.settings.lease_ttl_s).acquire()
            try:
                # The writer we may have waited behind could have committed these very inputs.
                self.skipped = should_skip(self.location, self.inputs)
                if self.skipped:
                    self._check_before_skipping()
                if not self.skipped:
                    swept = self.location.sweep_temporaries()
                    if swept:
                        log.info("%s: removed %d temporary object(s) an interrupted writer left in %s", self.stage,
                                 swept, self.location.uri)
            except BaseException:
                self._release()  # __exit__ does not run when __enter__ raises
                raise
        if self.skipped:
            self._release()
            log.info("%s: inputs unchanged since %s, skipping (%s)", self.stage, self.skipped.finished_at, self.location.uri)
            return self
        work_root = self.settings.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.stage}-", dir=work_root))
        return self

    def _check_before_skipping(self) -> None:
        """A skip trusts the committed files for good: check them first (sizes, sha256). Damaged ones make
        the stage run again and overwrite them, unless the run is published (then exit 2, naming them)."""
        damaged = damaged_files(self.location, self.skipped)
        if not damaged:
            return
        self.skipped = None
        what = f"{self.location.uri} is committed with these inputs, but {len(damaged)} file(s) differ from its manifest: " + \
            ", ".join(damaged[:5]) + (" …" if len(damaged) > 5 else "")
        _refuse_rewriting_published(self.location, self.location.uri, self.settings, because=what)
        log.warning("%s: %s; running the stage again", self.stage, what)

    def commit(self, extra: dict[str, Any] | None = None) -> Manifest:
        assert self.workdir is not None, "commit() on a skipped stage"
        self.check_lease()
        self.manifest = commit_dir(
            self.workdir,
            self.location,
            stage=self.stage,
            inputs=self.inputs,
            started_at=self.started_at,
            run_id=self.settings.run_id,
            code_version=self.settings.resolved_code_version,
            extra=extra,
            max_workers=self.settings.s3_max_concurrency,
            guard=self.check_lease,  # again immediately before the manifest: the uploads may have taken minutes
        )
        log.info("%s: committed %d file(s) to %s", self.stage, len(self.manifest.files), self.location.uri)
        return self.manifest

    def check_lease(self) -> None:
        """Raises StorageError when another process took the folder over: call before every write into it."""
        if self.lease is not None:
            self.lease.check()

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __exit__(self, *exc_info) -> None:
        self._release()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _refuse_rewriting_published(location: Location, output_uri: str, settings: Settings, because: str = "") -> None:
    """A committed stage of a published run keeps its content: published versions' lineage points at it."""
    if find_manifest(location) is None:
        return
    run_root = open_location(output_uri.rstrip("/").rsplit("/", 1)[0], settings)
    if run_root.exists(PUBLISHED):
        if because:
            raise IntegrityError(
                f"{because}; it belongs to a published run ({run_root.uri}/{PUBLISHED}), so it is not rewritten: "
                "restore the files from a backup, or train again under a new run id")
        raise ConfigError(
            f"{output_uri} belongs to a published run ({run_root.uri}/{PUBLISHED}) and its inputs changed; "
            "re-running it would change what published models' lineage points at: use a new run id (LAWTUNE_RUN_ID / --run-id)")


def check_inside_root(settings: Settings, uri: str) -> None:
    """Refuse (exit 2) an output that escapes ``<artifact_root>``: nothing is written outside it."""
    raw = uri.split("://", 1)[-1]
    if ".." in raw.replace("\\", "/").split("/"):
        raise ConfigError(f"output URI {uri!r} has a '..' segment; artifact URIs name folders below {settings.artifact_root}")
    root, target = parse_uri(settings.artifact_root), parse_uri(uri)
    inside = (root.scheme, root.bucket) == (target.scheme, target.bucket) and (
        target.path == root.path or target.path.startswith(root.path.rstrip("/") + "/") or not root.path)
    if not inside:
        raise ConfigError(f"output URI {uri!r} is outside the artifact root {settings.artifact_root} "
                          "(LAWTUNE_ARTIFACT_ROOT); stages write only below it")


def fetch_stage(settings: Settings, uri: str, dest: Path, only: list[str] | None = None) -> Manifest:
    """Download a committed upstream artifact into ``dest``, verified."""
    return fetch_dir(open_location(uri, settings), dest, max_workers=settings.s3_max_concurrency, only=only)
