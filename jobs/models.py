"""Models in production: list published versions, promote one, roll back to the previous one.

    lawtune models list legal-assistant
    lawtune models promote legal-assistant sample-1a2b3c4d5e [--force]
    lawtune models rollback legal-assistant
    lawtune models canary legal-assistant sample-5f6a7b8c9d --weight 10 [--sticky conversation]
    lawtune models canary legal-assistant promote      # the challenger becomes PROMOTED, the canary ends
    lawtune models canary legal-assistant abort        # the canary ends, the champion takes all traffic again

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_S3_ENDPOINT_URL`` (shared/core/settings.py),
``LAWTUNE_ACTOR`` (who is recorded in the history; default the host user).

``list`` prints each version with its created time, gate verdict, key metrics, data digest
and a ``*`` on the PROMOTED one, then the releases ``lawtune deploy`` recorded (which version
each runs), then the history. ``promote`` moves PROMOTED to a version
(``--force`` for one whose gate or parity check failed); ``rollback`` moves it to the version promoted before
the current one. Both swap PROMOTED atomically and record the event
(shared/publish/registry.py).

``canary`` gives a challenger version a share of the traffic beside the champion (PROMOTED):
``--weight`` percent of clients, sticky per API key (or per conversation with ``--sticky
conversation``: the ``X-Lawtune-Conversation`` header), recorded in ``models/<name>/CANARY``
(shared/store/serving.py). The serving agents poll it: in ``serving.mode=adapters`` every vLLM
replica loads the challenger's adapter and the gateway splits by the weight within a few
seconds, no restart; a merged-mode release runs the challenger in its own Deployment
(``lawtune deploy`` adds it). ``--weight`` again moves the split (100: all traffic to the
challenger), ``promote`` makes it the champion, ``abort`` ends it. Each move is in the history.

Exit codes: 0 done; 1 storage failure or another promotion moved PROMOTED first (the line
names it); 2 an unknown model or version (the line lists the known ones), nothing to roll
back to, or a failed gate or parity check without ``--force`` (promote, canary and canary promote).
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
from shared.store.serving import Canary, read_canary, record_event, serving_state, write_canary
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
    state = serving_state(name, root, with_history=True)
    weights = state.weights()
    lines = [f"{'':2}{'VERSION':<28} {'CREATED':<27} {'GATE':<7} {'ROUGE-L':>8} {'BLEU-4':>8}  {'DATA':<12}  {'ARTIFACT':<8} TRAFFIC"]
    for v in registry.versions(root):
        metrics = v.manifest.extra.get("metrics") or {}
        scores = [f"{metrics[m]:8.2f}" if isinstance(metrics.get(m), (int, float)) else f"{'-':>8}" for m in _KEY_METRICS]
        gate = "passed" if gate_passed(v.gate) else "FAILED"
        data = (v.manifest.extra.get("data") or "-")[:12]
        artifact = v.manifest.extra.get("artifact", "merged")
        traffic = f"{weights[v.name]}%" if v.name in weights else ""
        lines.append(f"{'*' if v.name == current else ' ':2}{v.name:<28} {v.created:<27} {gate:<7} {' '.join(scores)}  "
                     f"{data:<12}  {artifact:<8} {traffic}".rstrip())
    lines += ["", f"PROMOTED: {current or '<none>'}"]
    canary, _ = read_canary(root)
    if canary:
        lines.append(f"CANARY: {canary.version} answers {canary.weight}% (sticky per {canary.sticky}; "
                     f"since {canary.at} by {canary.actor})")
    split = ", ".join(f"{v} {w}%" for v, w in weights.items())
    for r in releases(root):  # what `lawtune deploy` last put in each release
        where = f"serving: {release_name(r)}"
        failed = " — ROLLOUT FAILED (not ready in time)" if r.get("status") == "failed" else ""
        when = f"(helm revision {r.get('helm_revision') or '?'}, deployed {r['deployed_at']} by {r.get('actor', '?')})"
        if r.get("mode") == "adapters":  # adapters follow the store at runtime: the split now is the release's
            lines.append(f"{where} serves adapters on base {str(r.get('base_model_digest'))[:12]}…: {split}{failed} {when}")
        else:
            # A merged release runs the versions deploy put in it; with a challenger Deployment the gateway splits
            # between the two by the store's weights.
            shown = r["version"] if not r.get("challenger") else \
                ", ".join(f"{v} {weights.get(v, 0)}%" for v in (r["version"], r["challenger"]))
            lines.append(f"{where} runs {shown}{failed} {when}")
    lines.append("history:")
    for e in registry.history(root):
        if e.get("kind", "").startswith("canary") and not e.get("to"):
            move = f"{e.get('challenger')} at {e.get('weight')}%"
        else:
            move = f"{e.get('from') or '<none>'} -> {e.get('to')}"
        lines.append(f"  {e['at']}  {e.get('kind', '?'):<8} {move}  by {e.get('actor', '?')}  run {e.get('run_id') or '-'}")
    return lines


def promote(settings: Settings, name: str, version: str, *, force: bool = False) -> dict:
    root = _model_root(settings, name)
    target = registry.require_version(root, name, version)
    registry.repair_history(root)  # an interrupted move is recorded before this one decides
    pointer = registry.read_pointer(root)
    if pointer.version == version:
        log.info("PROMOTED already names %s", version)
        return {"from": version, "to": version}
    passed = _checks_passed(name, version, target, force, "promote")
    kind = "promote" if passed else "forced"
    return registry.move_pointer(root, pointer, version, {"kind": kind, "gate": target.gate,
                                                          "run_id": target.manifest.extra.get("run_id")})


def _checks_passed(name: str, version: str, target, force: bool, action: str) -> bool:
    """Whether the version passed its quality gate and its parity check (publish's, in its manifest); a failed
    one is refused unless ``force`` (then False: the move is recorded as forced)."""
    passed = gate_passed(target.gate)
    if not passed and not force:
        raise ConfigError(f"{name}/{version} failed its quality gate; {action} it anyway with --force")
    parity = target.manifest.extra.get("parity")
    if isinstance(parity, dict) and parity.get("passed") is False:
        failed = "; ".join(c.get("message", "?") for c in parity.get("checks", []) if not c.get("passed"))
        if not force:
            raise ConfigError(f"{name}/{version} does not serve as it was evaluated ({failed}); {action} it anyway with --force")
        passed = False
    return passed


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


def canary(settings: Settings, name: str, target: str, *, weight: int | None = None, sticky: str | None = None,
           force: bool = False) -> dict:
    """Start or move a canary (``target`` a version), or end it: ``promote`` or ``abort``."""
    root = _model_root(settings, name)
    current, token = read_canary(root)
    if target in ("promote", "abort"):
        if current is None:
            raise ConfigError(f"model {name!r} has no canary to {target} (start one: lawtune models canary {name} <version> "
                              "--weight 10)")
        if target == "abort":
            write_canary(root, None, token)
            return record_event(root, {"kind": "canary-abort", "challenger": current.version, "weight": current.weight})
        version = registry.require_version(root, name, current.version)
        passed = _checks_passed(name, current.version, version, force, "promote")
        pointer = registry.read_pointer(root)
        event = registry.move_pointer(root, pointer, current.version, {
            "kind": "canary-promote", "gate": version.gate, "run_id": version.manifest.extra.get("run_id"),
            "weight": current.weight, **({} if passed else {"forced": True})})
        write_canary(root, None, token)  # after the swap: for a moment both name the same version, which is harmless
        return event
    version = registry.require_version(root, name, target)
    if registry.read_pointer(root).version == target:
        raise ConfigError(f"{name}/{target} is PROMOTED already (the champion); a canary tries another version")
    _checks_passed(name, target, version, force, "canary")
    if version.manifest.extra.get("artifact", "merged") == "merged":
        log.warning("%s carries no adapter (publish.artifact=merged): a release in serving.mode=adapters cannot load it; "
                    "a merged-mode release serves it once `lawtune deploy` adds the challenger Deployment", target)
    same = current is not None and current.version == target
    chosen = Canary(target, 10 if weight is None and not same else (current.weight if weight is None else weight),
                    sticky or (current.sticky if same else "apiKey"))
    if current is not None and not same:
        log.warning("the canary of %s (%d%%) ends: %s takes its place", current.version, current.weight, target)
    write_canary(root, chosen, token)
    return record_event(root, {"kind": "canary", "challenger": target, "weight": chosen.weight, "sticky": chosen.sticky,
                               "gate": version.gate, "run_id": version.manifest.extra.get("run_id")})


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("models", __doc__, module="jobs.models",
                            env=("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_ACTOR", "LAWTUNE_LOG_LEVEL"))
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,promote,rollback,canary}")
    name_help = "the published model, <artifact_root>/models/<name>"
    sub.add_parser("list", help="versions, gate, key metrics, which is PROMOTED, and the history",
                   description="Versions, gate, key metrics, which is PROMOTED, and the history.").add_argument("name", help=name_help)
    p = sub.add_parser("promote", help="move PROMOTED to a published version", description="Move PROMOTED to a published version.")
    p.add_argument("name", help=name_help)
    p.add_argument("version", help="the version to promote (lawtune models list shows them)")
    p.add_argument("--force", action="store_true", help="promote a version whose quality gate or parity check failed")
    sub.add_parser("rollback", help="move PROMOTED back to the version promoted before it",
                   description="Move PROMOTED back to the version promoted before it.").add_argument("name", help=name_help)
    c = sub.add_parser("canary", help="give a challenger version a share of the traffic; promote or abort ends it",
                       description="Give a challenger version a share of the traffic; promote or abort ends it.")
    c.add_argument("name", help=name_help)
    c.add_argument("target", metavar="VERSION|promote|abort",
                   help="the challenger version (lawtune models list shows them), or promote / abort to end the canary")
    c.add_argument("--weight", type=int, help="percent of clients the challenger answers (0-100; default 10, or the current one)")
    c.add_argument("--sticky", choices=("apiKey", "conversation"),
                   help="what keeps a client on one side: its API key (default) or the X-Lawtune-Conversation header")
    c.add_argument("--force", action="store_true", help="canary or promote a version whose quality gate or parity check failed")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        if args.action == "list":
            print("\n".join(list_versions(settings, args.name)))
            return
        if args.action == "canary":
            event = canary(settings, args.name, args.target, weight=args.weight, sticky=args.sticky, force=args.force)
            state = serving_state(args.name, open_location(settings.models_uri(args.name), settings))
            split = ", ".join(f"{v} {w}%" for v, w in state.weights().items())
            print(f"{event['kind']}: {split} ({settings.models_uri(args.name)}; serving agents pick it up within seconds)")
            return
        event = promote(settings, args.name, args.version, force=args.force) if args.action == "promote" \
            else rollback(settings, args.name)
        print(f"PROMOTED: {event['from'] or '<none>'} -> {event['to']}: {settings.models_uri(args.name)}/{registry.PROMOTED}")

    return run_main("models", body)


if __name__ == "__main__":
    raise SystemExit(main())
