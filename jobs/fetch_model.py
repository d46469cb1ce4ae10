"""Fetch a published model for serving: the promoted version (or a named one), verified, all or nothing.

    python -m jobs.fetch_model s3://bucket/prefix/models/legal-assistant /models/current
    python -m jobs.fetch_model s3://bucket/prefix/models/legal-assistant/sample-0123abcd45 /models/current

The serving chart's init container runs exactly this. Environment: ``LAWTUNE_S3_ENDPOINT_URL``
(and the other ``LAWTUNE_S3_*`` settings); AWS credentials the standard way.

Input: ``models/<name>`` (``PROMOTED`` names the version) or ``models/<name>/<version>``.
Every file of the version's manifest is downloaded in parallel into a temporary sibling of
the target and checked (size, sha256) before one rename puts it in place, so the target
directory is either complete (with its ``MANIFEST.json``) or absent. A target that already
holds exactly this version, every file checked against its sha256, is left as it is (a
restarted pod does not download again; a file damaged on the volume is fetched anew), and
fetches into one target are serialised by a lock file beside it (``.<target>.lock``), so
replicas sharing a ReadWriteMany claim download once.

The version's serving contract (``extra.serving`` of its manifest: chat template, tokenizer
files, stop ids; shared/store/serving_contract.py) is checked too; a folder that breaks it is
removed.

With ``--trust-remote-code`` (the serving chart passes it when ``vllm.trustRemoteCode`` is on;
``make serve`` with ``TRUST_REMOTE_CODE=1``) the version's ``*.py`` files must be exactly those
its manifest's ``extra.remote_code`` records (the code finetune ran), checked before anything
is downloaded.

Exit codes: 0 fetched or already there; 1 storage failure (retry); 2 nothing published or
promoted at that URI, a checksum mismatch, a broken serving contract, code files the record does
not allow, or a manifest path or PROMOTED content that would reach outside the target (absolute,
``..``; one line on stderr says which).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.store.artifacts import MANIFEST, Manifest, fetch_dir, read_manifest, verify_file
from shared.store.model_code import RECORD, check_code, manifest_code
from shared.store.paths import check_version, inside
from shared.core.errors import ConfigError, IntegrityError
from shared.core.cli import command_parser
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.store.storage import open_location
from shared.core.uri import join

PROMOTED = "PROMOTED"
log = logging.getLogger("lawtune.fetch_model")


@dataclass
class Result:
    version_uri: str
    manifest: Manifest
    target: Path
    downloaded: bool


def resolve_version(settings: Settings, uri: str) -> str:
    """The URI of the version folder ``uri`` means: itself when committed, else what its PROMOTED names."""
    uri = uri.rstrip("/")
    loc = open_location(uri, settings)
    if loc.exists(MANIFEST):
        return uri
    if loc.exists(PROMOTED):
        version = check_version(loc.read_text(PROMOTED).strip(), f"{uri}/{PROMOTED}")
        log.info("%s/%s names version %s", uri, PROMOTED, version)
        return join(uri, version)
    raise ConfigError(f"{uri} has neither {MANIFEST} (a model version) nor {PROMOTED} (a promoted model): nothing to fetch")


def _same_version(target: Path, manifest: Manifest) -> bool:
    """The target holds exactly this version: its manifest, and every file's size and sha256 (a file that
    rotted or was edited on the volume since is fetched again, not served)."""
    try:
        local = Manifest.model_validate_json((target / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    if local.digest != manifest.digest:
        return False
    for entry in manifest.files:
        try:
            verify_file(inside(target, entry.path, str(target / MANIFEST)), entry, str(target))
        except (OSError, IntegrityError) as exc:
            log.warning("%s: %s; fetching the version again", target, exc)
            return False
    return True


def run(settings: Settings, uri: str, target: Path, config: TrainConfig | None = None, *,
        trust_remote_code: bool = False) -> Result:
    """``config``: the --config/--base-model/--set every stage takes; a version trained on another
    base model than one explicitly asked for is refused before anything is downloaded.
    ``trust_remote_code``: the server will run the version's code, so its code files must be the
    ones finetune ran (its manifest's record), also checked before any download."""
    version_uri = resolve_version(settings, uri)
    loc = open_location(version_uri, settings)
    manifest = read_manifest(loc)
    if manifest.extra.get("artifact") == "adapter":  # nothing here vLLM could load as a model
        raise ConfigError(f"{version_uri} carries only an adapter (publish.artifact=adapter): serve it on its base with the "
                          "serving chart's serving.mode=adapters (make serve --mode adapters), or publish it merged")
    if config is not None:
        config.expect_base_model(manifest.extra.get("base_model"), version_uri)
    if trust_remote_code:
        check_code(manifest_code(manifest), manifest.extra.get(RECORD), where=version_uri, record=f"{version_uri}/{MANIFEST}")
    target = Path(target).resolve()
    # Replicas sharing one ReadWriteMany claim start together: one downloads, the others wait
    # and then find the version in place, instead of replacing a folder a server is loading.
    with _exclusive(target.parent / f".{target.name}.lock"):
        _sweep_partials(target)
        if _same_version(target, manifest):
            log.info("%s already holds %s; nothing to download", target, version_uri)
            _check_contract(target, manifest, version_uri)
            return Result(version_uri, manifest, target, False)
        log.info("fetching %d file(s) of %s into %s", len(manifest.files), version_uri, target)
        fetch_dir(loc, target, max_workers=settings.s3_max_concurrency)
        _check_contract(target, manifest, version_uri)
    return Result(version_uri, manifest, target, True)


def _check_contract(target: Path, manifest: Manifest, version_uri: str) -> None:
    """The folder matches the serving contract publish wrote (shared/store/serving_contract.py); a folder that
    does not is removed, so serving never starts on it."""
    import shutil

    from shared.store.serving_contract import ContractError, verify

    contract = manifest.extra.get("serving")
    if contract is None:
        log.warning("%s carries no serving contract (published before lawtune wrote one); not verified beyond checksums",
                    version_uri)
        return
    try:
        verify(target, contract)
    except ContractError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ConfigError(f"{version_uri} breaks its serving contract: {exc}") from None
    else:
        log.info("serving contract verified: chat template, %d tokenizer file(s), stop ids %s",
                 len(contract.get("tokenizer_files") or {}), contract.get("eos_token_ids"))


def _sweep_partials(target: Path) -> None:
    """Half-built siblings a fetch killed mid-download left (build_atomically's staging folders);
    under the lock, so none of them belongs to a live fetch."""
    import shutil

    for stale in target.parent.glob(f".{target.name}.partial-*"):
        log.info("removing %s, left by an interrupted fetch", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # NFS/CephFS/EFS claims honour flock (Linux emulates it with POSIX locks)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("fetch-model", __doc__, module="jobs.fetch_model", image=True,
                            env=("LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_BASE_MODEL", "LAWTUNE_LOG_LEVEL"))
    parser.add_argument("uri", help="models/<name> (follows PROMOTED) or models/<name>/<version>")
    parser.add_argument("target", type=Path, help="local directory to create (replaced only when complete)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="the server will run the model's own code: refuse a version whose code files are not "
                             "exactly those its manifest records (extra.remote_code)")
    add_config_arguments(parser, reads="only base_model (checked against the version's)", base_model="expect")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        result = run(settings, args.uri, args.target, config=config_from_args(args),
                     trust_remote_code=args.trust_remote_code)
        state = "fetched" if result.downloaded else "already present"
        print(f"{state}: {result.version_uri} -> {result.target} ({len(result.manifest.files)} files verified)")

    return run_main("fetch-model", body)


if __name__ == "__main__":
    raise SystemExit(main())
