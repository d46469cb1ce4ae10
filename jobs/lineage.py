"""Lineage of a published model version: input file -> data -> finetune -> evaluate -> version -> serving.

    lawtune lineage s3://bucket/lawtune/models/legal-assistant/sample-1a2b3c4d5e [--json]

Environment: ``LAWTUNE_S3_ENDPOINT_URL`` and AWS credentials the standard way (for s3:// URIs).

Each link prints its URI and sha256 (an input file's content digest, else the artifact's
manifest digest) and what it records: the base model with its weights' digest, the config
digest and best step; the gate verdict and the production version it was compared with; when
and by whom the version was promoted. ``[changed]`` marks an artifact whose content differs
from what the next link recorded. shared/publish/lineage.py builds the chain.

Exit codes: 0 printed; 1 storage failure; 2 not a published version (the line lists the known ones).
"""

from __future__ import annotations


from shared.core.cli import command_parser
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import load_settings
from shared.publish.lineage import as_json, as_text, trace


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("lineage", __doc__, module="jobs.lineage", env=("LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_LOG_LEVEL"))
    parser.add_argument("uri", help="<artifact_root>/models/<name>/<version>")
    parser.add_argument("--json", action="store_true", help="machine-readable: a list of links")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        links = trace(settings, args.uri)
        print(as_json(links) if args.json else "\n".join(as_text(links)))

    return run_main("lineage", body)


if __name__ == "__main__":
    raise SystemExit(main())
