"""Preprocess: a Q&A CSV or chat JSONL → cleaned, de-duplicated train/dev/test chat JSONL.

    python -m jobs.preprocess --input configs/data/legal_qa_sample.csv
    python -m jobs.preprocess --input s3://bucket/raw/qa.csv --output s3://bucket/runs/r1/data --config configs/x.yaml

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_S3_ENDPOINT_URL``,
``LAWTUNE_CACHE_DIR`` (see shared/core/settings.py); AWS credentials the standard way.

Input: a local path or an s3:// / file:// URI of a lawzhidao CSV (``title,question,reply,
is_best``) or a chat JSONL (ChatGLM3, OpenAI or ShareGPT) — see shared/data/readers.py.

Output (default ``<artifact_root>/runs/<run_id>/data/``): the train, dev and test splits
(``{"id", "conversations"}`` per line) under the names ``data_config`` gives them (default
``train.jsonl``, ``dev.jsonl``, ``test.jsonl``; the ChatGLM3 demo's ``train.json``/``dev.json``
work as they are; the manifest's ``extra.files`` maps role -> name), ``rejected.jsonl`` (source, line,
reason, detail, raw row), ``rejected.csv`` (the same for a spreadsheet, formula-like cells
prefixed with ``'``), ``report.json`` (counts by reason, lengths in characters), and
``MANIFEST.json`` last. The stage is skipped when the input's sha256, the ``preprocess``
config section and the code version match the committed manifest.

Exit codes: 0 done or skipped; 1 storage failure (retry); 2 the input is not a dataset or
the config is invalid (one line on stderr names the file and the problem; no manifest).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.store.artifacts import Manifest, sha256_file
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.errors import DataError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.data.preprocessing import build
from shared.data.split_files import name_splits
from shared.data.readers import Source
from shared.core.settings import Settings, load_settings
from shared.store.stage import StageOutput
from shared.store.storage import open_location
from shared.core.uri import parse_uri

STAGE = "data"
log = logging.getLogger("lawtune.preprocess")


@dataclass
class Result:
    manifest: Manifest
    skipped: bool
    report: dict[str, Any] | None


def _local_input(settings: Settings, uri: str, scratch: Path) -> tuple[Path, str]:
    """A local path to read the input from (downloaded when remote) and its display name."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        path = Path(parsed.path)
        if not path.is_file():
            raise DataError(f"input {uri} does not exist or is not a file")
        return path, path.name
    parent, _, name = parsed.path.rpartition("/")
    loc = open_location(f"s3://{parsed.bucket}/{parent}", settings)
    if not name or not loc.exists(name):
        raise DataError(f"input {uri} does not exist")
    local = scratch / name
    loc.download_file(name, local)
    return local, name


def run(settings: Settings, config: TrainConfig, input_uri: str, output_uri: str | None = None, *, force: bool = False) -> Result:
    output_uri = output_uri or settings.run_uri(STAGE)
    scratch_root = settings.cache_dir / "work"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="preprocess-input-", dir=scratch_root))
    try:
        path, name = _local_input(settings, input_uri, scratch)
        source = Source(path, name)  # refuses non-datasets before anything is written
        inputs = {
            "input": {"name": name, "sha256": sha256_file(path)},
            "preprocess_config": config.section_digest("preprocess", "data_config"),
        }
        with StageOutput(settings, STAGE, output_uri, inputs, force=force) as out:
            if out.skipped:
                return Result(out.skipped, True, None)
            log.info("reading %s (%s, %s)", input_uri, source.format, source.encoding)
            report = build(source, out.workdir, scratch / "spill", config.preprocess, path.stat().st_size)
            files = name_splits(out.workdir, config.data_config)
            manifest = out.commit(extra={"splits": report["splits"], "files": files, "rejected": report["rejected"],
                                         "source": report["source"], "input_uri": input_uri})
            return Result(manifest, False, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="CSV/JSONL file or URI")
    parser.add_argument("--output", help="output URI (default <artifact_root>/runs/<run_id>/data)")
    add_config_arguments(parser)  # its preprocess and data_config sections apply
    parser.add_argument("--force", action="store_true", help="run even when the same inputs are committed")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        result = run(settings, config_from_args(args), args.input, args.output, force=args.force)
        if result.skipped:
            log.info("skipped: %s already holds this input's output", args.output or settings.run_uri(STAGE))

    return run_main("preprocess", body)


if __name__ == "__main__":
    raise SystemExit(main())
