"""Models in production: list published versions, promote one, roll back to the previous one.

    lawtune models list legal-assistant
    lawtune models promote legal-assistant sample-1a2b3c4d5e [--force]
    lawtune models rollback legal-assistant

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_S3_ENDPOINT_URL`` (shared/core/settings.py),
``LAWTUNE_ACTOR`` (who is recorded in the history; default the host user).

``list`` prints each version with its created time, gate verdict, key metrics, data digest
and a ``*`` on the PROMOTED one, then the releases ``lawtune deploy`` recorded (which version
each runs), then the history. ``promote`` moves PROMOTED to a version
(``--force`` for one whose gate or parity check failed); ``rollback`` moves it to the version promoted before
the current one. Both swap PROMOTED atomically and record the event
(shared/publish/registry.py).

Exit codes: 0 done; 1 storage failure or another promotion moved PROMOTED first (the line
names it); 2 an unknown model or version (the line lists the known ones), nothing to roll
back to, or a failed gate without ``--force``.
"""

from __future__ import annotations

import logging

from shared.core.errors import ConfigError
from shared.core.cli import command_parser
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.evaluate.gate import gate_passed
from shared.publish import registry
from shared.store.releases import release_name, releases
from shared.store.storage import Location, open_location

log = logging.getLogger("lawtune.models")
_KEY_METRICS = ("rouge-l", "bleu-4")


def _model_root(settings: Settings, name: str) -> Location:
    registry.check_name(name)
    root = open_location(settings.models_uri(name), settings)
    if not registry.versions(root):
        known = registry.known_models(open_location(f"{settings.artifact_root}/models", settings))
        raise ConfigError(f"no published model named {name!r} under {settings.artifact_root}/models; "
                          f"known: {', '.join(known) or '<none>'}")
    return root


def list_versions(settings: Settings, name: str) -> list[str]:
    root = _model_root(settings, name)
    current = registry.read_pointer(root).version
    lines = [f"{'':2}{'VERSION':<28} {'CREATED':<27} {'GATE':<7} {'ROUGE-L':>8} {'BLEU-4':>8}  DATA"]
    for v in registry.versions(root):
        metrics = v.manifest.extra.get("metrics") or {}
        scores = [f"{metrics[m]:8.2f}" if isinstance(metrics.get(m), (int, float)) else f"{'-':>8}" for m in _KEY_METRICS]
        gate = "passed" if gate_passed(v.gate) else "FAILED"
        data = (v.manifest.extra.get("data") or "-")[:12]
        lines.append(f"{'*' if v.name == current else ' ':2}{v.name:<28} {v.created:<27} {gate:<7} {' '.join(scores)}  {data}")
    lines += ["", f"PROMOTED: {current or '<none>'}"]
    for r in releases(root):  # what `lawtune deploy` last put in each release
        failed = " — ROLLOUT FAILED (not ready in time)" if r.get("status") == "failed" else ""
        lines.append(f"serving: {release_name(r)} runs {r['version']}{failed} "
                     f"(helm revision {r.get('helm_revision') or '?'}, deployed {r['deployed_at']} by {r.get('actor', '?')})")
    lines.append("history:")
    for e in registry.history(root):
        lines.append(f"  {e['at']}  {e.get('kind', '?'):<8} {e.get('from') or '<none>'} -> {e['to']}  "
                     f"by {e.get('actor', '?')}  run {e.get('run_id') or '-'}")
    return lines


def promote(settings: Settings, name: str, version: str, *, force: bool = False) -> dict:
    root = _model_root(settings, name)
    target = registry.require_version(root, name, version)
    registry.repair_history(root)  # an interrupted move is recorded before this one decides
    pointer = registry.read_pointer(root)
    if pointer.version == version:
        log.info("PROMOTED already names %s", version)
        return {"from": version, "to": version}
    passed = gate_passed(target.gate)
    if not passed and not force:
        raise ConfigError(f"{name}/{version} failed its quality gate; promote it anyway with --force")
    parity = target.manifest.extra.get("parity")
    if isinstance(parity, dict) and parity.get("passed") is False:
        failed = "; ".join(c.get("message", "?") for c in parity.get("checks", []) if not c.get("passed"))
        if not force:
            raise ConfigError(f"{name}/{version} does not serve as it was evaluated ({failed}); promote it anyway with --force")
        passed = False
    kind = "promote" if passed else "forced"
    return registry.move_pointer(root, pointer, version, {"kind": kind, "gate": target.gate,
                                                          "run_id": target.manifest.extra.get("run_id")})


def rollback(settings: Settings, name: str) -> dict:
    root = _model_root(settings, name)
    registry.repair_history(root)  # the target is read from the history: complete it first
    pointer = registry.read_pointer(root)
    target = registry.rollback_target(registry.history(root))
    if target is None:
        raise ConfigError(f"model {name!r}: the history has no version promoted before {pointer.version or '<none>'}; "
                          "nothing to roll back to (use lawtune models promote)")
    version = registry.require_version(root, name, target)
    return registry.move_pointer(root, pointer, target, {"kind": "rollback", "gate": version.gate,
                                                         "run_id": version.manifest.extra.get("run_id")})


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("models", __doc__, module="jobs.models",
                            env=("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_ACTOR", "LAWTUNE_LOG_LEVEL"))
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,promote,rollback}")
    name_help = "the published model, <artifact_root>/models/<name>"
    sub.add_parser("list", help="versions, gate, key metrics, which is PROMOTED, and the history",
                   description="Versions, gate, key metrics, which is PROMOTED, and the history.").add_argument("name", help=name_help)
    p = sub.add_parser("promote", help="move PROMOTED to a published version", description="Move PROMOTED to a published version.")
    p.add_argument("name", help=name_help)
    p.add_argument("version", help="the version to promote (lawtune models list shows them)")
    p.add_argument("--force", action="store_true", help="promote a version whose quality gate failed")
    sub.add_parser("rollback", help="move PROMOTED back to the version promoted before it",
                   description="Move PROMOTED back to the version promoted before it.").add_argument("name", help=name_help)
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        if args.action == "list":
            print("\n".join(list_versions(settings, args.name)))
            return
        event = promote(settings, args.name, args.version, force=args.force) if args.action == "promote" \
            else rollback(settings, args.name)
        print(f"PROMOTED: {event['from'] or '<none>'} -> {event['to']}: {settings.models_uri(args.name)}/{registry.PROMOTED}")

    return run_main("models", body)


if __name__ == "__main__":
    raise SystemExit(main())
