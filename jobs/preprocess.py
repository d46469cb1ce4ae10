"""Preprocess: Q&A tables, Alpaca or chat data → cleaned, de-duplicated train/dev/test chat JSONL.

    python -m jobs.preprocess --input configs/data/legal_qa_sample.csv
    python -m jobs.preprocess --input s3://bucket/raw/qa.csv --output s3://bucket/runs/r1/data --config configs/x.yaml
    python -m jobs.preprocess --input a.csv --input alpaca.json:0.5 --input qa.parquet --input saved_dataset/

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_S3_ENDPOINT_URL``,
``LAWTUNE_CACHE_DIR`` (see shared/core/settings.py); AWS credentials the standard way.

Input: one or more local paths or s3:// / file:// URIs (``PATH:WEIGHT`` samples one; without
``--input`` the config's ``preprocess.inputs``): CSV, JSONL or a JSON array — lawzhidao
(``title,question,reply,is_best``), Alpaca (``instruction,input,output,system,history``),
``prompt,response``, chat (ChatGLM3, OpenAI, ShareGPT) or the user's own names mapped by
``preprocess.columns`` — a Parquet file, or a local folder saved by ``datasets``
(docs/data.md; shared/data/readers.py, shapes.py, hf_datasets.py).

Output (default ``<artifact_root>/runs/<run_id>/data/``): the train, dev and test splits
(``{"id", "conversations"}`` per line) under the names ``data_config`` gives them (default
``train.jsonl``, ``dev.jsonl``, ``test.jsonl``; the ChatGLM3 demo's ``train.json``/``dev.json``
work as they are; the manifest's ``extra.files`` maps role -> name), ``rejected.jsonl`` (source, line,
reason, detail, raw row), ``rejected.csv`` (the same for a spreadsheet, formula-like cells
prefixed with ``'``), ``report.json`` (counts by reason, lengths in characters), and
``MANIFEST.json`` last. The stage is skipped when the inputs' sha256, the ``preprocess``
config section and the code version match the committed manifest.

Exit codes: 0 done or skipped; 1 storage failure (retry); 2 the input is not a dataset or
the config is invalid (one line on stderr names the file and the problem; no manifest).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.store.artifacts import Manifest
from shared.core.cli import STAGE_ENV, command_parser
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.errors import DataError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.data.preprocessing import build
from shared.data.inputs import InputSpec, input_bytes, input_digest, input_specs, open_source
from shared.data.split_files import name_splits
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
        if not path.exists():
            raise DataError(f"input {uri} does not exist")
        if path.is_dir() and not any(path.glob("*.json")):
            raise DataError(f"input {uri} is a folder but not a saved Hugging Face dataset (no dataset_info.json/state.json)")
        return path, path.name
    parent, _, name = parsed.path.rpartition("/")
    loc = open_location(f"s3://{parsed.bucket}/{parent}", settings)
    if not name or not loc.exists(name):
        raise DataError(f"input {uri} does not exist")
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / name
    loc.download_file(name, local)
    return local, name


def run(settings: Settings, config: TrainConfig, input_uri: str | list[str] | None = None, output_uri: str | None = None,
        *, force: bool = False) -> Result:
    """``input_uri``: one input, several (``PATH:WEIGHT`` each), or None for ``preprocess.inputs``."""
    output_uri = output_uri or settings.run_uri(STAGE)
    specs = input_specs([input_uri] if isinstance(input_uri, str) else input_uri, config.preprocess)
    scratch_root = settings.cache_dir / "work"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="preprocess-input-", dir=scratch_root))
    try:
        sources, described, sizes = [], [], []
        for number, spec in enumerate(specs):
            path, name = _local_input(settings, spec.uri, scratch / str(number))
            # Opening reads the header/first object: non-datasets are refused before anything is written.
            sources.append(open_source(path, _unique(name, sources), spec.columns or config.preprocess.columns, spec.weight))
            sizes.append(input_bytes(path))
            described.append({"name": sources[-1].name, "sha256": input_digest(path), **_weight(spec)})
        inputs = {
            **({"input": described[0]} if len(described) == 1 else {"inputs": described}),
            "preprocess_config": config.section_digest("preprocess", "data_config"),
        }
        with StageOutput(settings, STAGE, output_uri, inputs, force=force) as out:
            if out.skipped:
                return Result(out.skipped, True, None)
            for spec, source in zip(specs, sources):
                log.info("reading %s (%s, %s; %s)", spec.uri, source.format, source.encoding, source.layout.describe())
            report = build(sources, out.workdir, scratch / "spill", config.preprocess, sizes)
            files = name_splits(out.workdir, config.data_config)
            manifest = out.commit(extra={"splits": report["splits"], "files": files, "rejected": report["rejected"],
                                         "source": report["source"], "input_uri": input_uri})
            return Result(manifest, False, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _unique(name: str, earlier: list) -> str:
    """Input names as reports show them: a second ``data.csv`` becomes ``data.csv#2``."""
    taken = {s.name for s in earlier}
    if name not in taken:
        return name
    return next(f"{name}#{n}" for n in range(2, len(taken) + 3) if f"{name}#{n}" not in taken)


def _weight(spec: InputSpec) -> dict[str, float]:
    return {"weight": spec.weight} if spec.weight != 1.0 else {}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("preprocess", __doc__, module="jobs.preprocess", image=True, env=STAGE_ENV)
    parser.add_argument("--input", action="append", metavar="PATH[:WEIGHT]",
                        help="CSV, JSON, JSONL, Parquet file, saved dataset folder, or URI; repeat for several "
                             "(default: the config's preprocess.inputs)")
    parser.add_argument("--output", metavar="URI", help="output URI (default <artifact_root>/runs/<run_id>/data)")
    add_config_arguments(parser, reads="its preprocess and data_config sections", base_model="unused")
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
