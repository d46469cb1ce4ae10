"""Publish: merge the best adapter into its base, store it as a model version, promote it if the gate passed.

    python -m jobs.publish --model-name legal-assistant [--config C] [--artifact merged|adapter|both]
    python -m jobs.publish --finetune s3://b/runs/r1/finetune --evaluate s3://b/runs/r1/evaluate \\
        --model-name legal-assistant [--force] [--trust-remote-code]

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_S3_ENDPOINT_URL``,
``LAWTUNE_CACHE_DIR`` (shared/core/settings.py); AWS credentials the standard way.

Inputs: the committed ``finetune/`` (``adapter/``; the base model its manifest names) and
``evaluate/`` (the gate verdict in its manifest). The merge runs shard by shard (peak memory
about two safetensors shards + the adapter; every merged weight checked against LoRA's forward,
small models against base+adapter logits too), or in memory in float32 with peft's
``merge_and_unload`` for adapters the sharded merge cannot do (shared/publish/merge.py).

``publish.artifact`` in the config (or ``--artifact``) says what a version carries: ``merged``
(the default: the merged model), ``adapter`` (the verified adapter under ``adapter/``, served on a
shared base by the serving chart's ``serving.mode=adapters``; the base goes to
``bases/<digest>/`` once) or ``both``. An adapter vLLM cannot serve (modules_to_save, embedding
or head weights, a rank above ``publish.max_lora_rank``, a base it does not fit or that differs
from the one finetune trained on) is refused before anything is written
(shared/publish/adapter_publish.py).

Before the version is committed, it is checked against what evaluate recorded
(shared/serve/parity.py): chat template, end-of-turn ids, tokenizer rendering, the merge's LoRA
scale, and, with ``evaluation.parity.enabled``, a passing gate and ``publish.served_parity``, vLLM
serving the merged folder must answer the golden questions as evaluate did. An adapter-only
version is checked on the base it is served on (template, stop ids, tokenizer); its served check
is not run, and its ``parity.json`` says so. A failed check keeps PROMOTED where it is (and
``lawtune models promote``/``canary`` refuse the version without ``--force``).

Output: ``<artifact_root>/models/<name>/<version>/`` (sharded safetensors, tokenizer, chat
template, generation config, ``lawtune-vllm.yaml`` (the serving contract's engine settings), and/or
``adapter/``; ``parity.json``, ``lawtune-model.json`` provenance, ``MANIFEST.json`` last, its
``extra.serving`` the serving contract, shared/store/serving_contract.py),
where ``<version>`` is ``<run_id>-<10 hex of the inputs digest>``: the same finetune and
evaluate artifacts give the same version, so publishing a run twice is a no-op. Then
``models/<name>/PROMOTED`` (content: the version) is moved to it only when the gate and the
checks above passed, or with ``--force`` (logged loudly), by compare-and-swap (shared/publish/registry.py), and
the move is recorded in ``models/<name>/history/``. A version trained before the promoted one
does not move PROMOTED back without ``--force`` (or ``lawtune models promote/rollback``).
The base model's own code (ChatGLM3) runs only with ``--trust-remote-code`` (the operator's
switch, never the finetune manifest's), and only the files finetune recorded by sha256; they
are copied beside the weights and recorded again in the version's ``extra.remote_code``.
``runs/<run_id>/PUBLISHED`` lists the versions made from the run, which then refuses to be
overwritten.

Exit codes: 0 published (promoted or not: stdout says which); 1 storage/runtime failure
(retry), or another publish promoted first (the line names the winner); 2 missing/corrupt
inputs, a quantised base, a merge that fails its check, or an adapter vLLM cannot serve.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.store.artifacts import Manifest, digest_inputs, find_manifest, now_iso, read_manifest
from shared.evaluate.gate import gate_passed
from shared.core.cli import STAGE_ENV, command_parser
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.store.model_code import RECORD, check_folder, code_files
from shared.store.stage import PUBLISHED, StageOutput, fetch_stage
from shared.store.storage import Location, open_location
from shared.core.uri import join
from shared.publish.registry import PROMOTED, Pointer, PromotionConflict, move_pointer, read_pointer, repair_history

STAGE = "publish"
log = logging.getLogger("lawtune.publish")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass
class Result:
    version: str
    version_uri: str
    manifest: Manifest
    skipped: bool  # the version was already published with these inputs
    gate_passed: bool
    promoted: bool  # PROMOTED names this version now
    forced: bool
    artifact: str = "merged"
    parity: dict | None = None  # the pre-promotion check (shared/serve/parity.py); None for a version published without one


ARTIFACTS = ("merged", "adapter", "both")


def run(settings: Settings, model_name: str, finetune_uri: str | None = None, evaluate_uri: str | None = None,
        *, force: bool = False, max_shard_size: str = "2GB", artifact: str = "merged", max_lora_rank: int = 16,
        promote: bool = True, served_parity: bool = True, config: TrainConfig | None = None,
        trust_remote_code: bool = False) -> Result:
    """``artifact``, ``max_lora_rank``, ``promote``, ``served_parity``: the config's publish section (``--artifact`` wins).
    ``config``: the --config/--base-model/--set every stage takes; an explicit base model other
    than the one finetune recorded is refused (TrainConfig.expect_base_model). ``trust_remote_code``:
    the operator's switch (never the config's or a manifest's) to run the base model's own code."""
    from shared.core.errors import ConfigError

    if artifact not in ARTIFACTS:
        raise ConfigError(f"--artifact {artifact!r}: expected one of {', '.join(ARTIFACTS)}")
    if not _NAME.match(model_name):
        raise ConfigError(f"--model-name {model_name!r}: expected 1-63 lowercase letters, digits, '.', '_' or '-'")
    finetune_uri = finetune_uri or settings.run_uri("finetune")
    evaluate_uri = evaluate_uri or settings.run_uri("evaluate")
    ft_manifest = read_manifest(open_location(finetune_uri, settings))
    ev_manifest = read_manifest(open_location(evaluate_uri, settings))
    if ev_manifest.inputs.get("finetune") != ft_manifest.digest:
        # Otherwise one run's passing verdict could promote another run's adapter.
        raise ConfigError(f"{evaluate_uri} evaluated another finetune artifact than {finetune_uri}; "
                          "publish the pair that belongs together (re-run evaluate on this finetune output)")
    gate = ev_manifest.extra.get("gate")
    passed = gate_passed(gate)
    evaluated = _evaluated(settings, evaluate_uri, ev_manifest)
    base_ref = ft_manifest.extra.get("base_model")
    if not base_ref:
        raise ConfigError(f"{finetune_uri}/MANIFEST.json names no base_model in its extra; cannot merge")
    if config is not None:
        config.expect_base_model(base_ref, finetune_uri)

    inputs = {"finetune": ft_manifest.digest, "evaluate": ev_manifest.digest, "code_version": settings.resolved_code_version,
              # merged versions keep the names they always had; an adapter version is another publication
              **({"artifact": artifact} if artifact != "merged" else {})}
    version = f"{settings.run_id}-{digest_inputs(inputs)[:10]}"
    model_root = open_location(settings.models_uri(model_name), settings)
    version_uri = join(settings.models_uri(model_name), version)
    # Read before the (long) merge: the swap below succeeds only if nobody promoted meanwhile.
    pointer = read_pointer(model_root)

    with StageOutput(settings, STAGE, version_uri, inputs) as out:
        if out.skipped:
            log.info("version %s is already published with these inputs; nothing to merge", version)
            manifest = out.skipped
        else:
            manifest = _merge_and_commit(settings, out, ft_manifest, ev_manifest, finetune_uri, evaluate_uri, base_ref,
                                         gate, version, max_shard_size, trust_remote_code, artifact, max_lora_rank,
                                         model_root, evaluated, serve_check=passed or force, served_parity=served_parity)
    mark_published(settings, finetune_uri, version_uri)
    parity = manifest.extra.get("parity")
    parity_ok = not isinstance(parity, dict) or parity.get("passed") is True
    if passed and not parity_ok:
        failures = "; ".join(c["message"] for c in parity.get("checks", []) if not c.get("passed"))
        log.error("the version does not serve as evaluated (%s)", failures)
    if promote or force:
        promoted = _promote(model_root, pointer, version, manifest, passed and parity_ok, force, gate, settings.run_id,
                            None if parity_ok else parity)
    else:  # the parity result stays in the manifest: lawtune models promote/canary refuse a failed one without --force
        log.info("publish.promote is false: PROMOTED stays at %s (lawtune models canary %s %s --weight 10 tries it on "
                 "a share of the traffic)", pointer.version or "<none>", model_name, version)
        promoted = pointer.version == version
    return Result(version, version_uri, manifest, out.skipped is not None, passed, promoted, force and not (passed and parity_ok),
                  manifest.extra.get("artifact", "merged"), parity if isinstance(parity, dict) else None)


def _evaluated(settings: Settings, evaluate_uri: str, ev_manifest: Manifest):
    """What evaluate recorded for the parity check, or None for an evaluation that recorded no serving profile."""
    from shared.serve.parity import Evaluated
    from shared.store.artifacts import read_verified

    names = {f.path for f in ev_manifest.files}
    if not {"metrics.json", "predictions.jsonl"} <= names:
        return None
    loc = open_location(evaluate_uri, settings)
    metrics = json.loads(read_verified(loc, "metrics.json", ev_manifest))
    return Evaluated.from_artifact(metrics, read_verified(loc, "predictions.jsonl", ev_manifest).decode("utf-8"))


def mark_published(settings: Settings, finetune_uri: str, version_uri: str) -> None:
    """Leave ``PUBLISHED`` in the run folder: its stages may no longer be overwritten (StageOutput refuses)."""
    run_root = open_location(finetune_uri.rstrip("/").rsplit("/", 1)[0], settings)
    known = json.loads(run_root.read_text(PUBLISHED)) if run_root.exists(PUBLISHED) else []
    if version_uri not in known:
        run_root.write_text(PUBLISHED, json.dumps([*known, version_uri], indent=2) + "\n")


def _merge_and_commit(settings, out: StageOutput, ft_manifest: Manifest, ev_manifest: Manifest, finetune_uri: str,
                      evaluate_uri: str, base_ref: str, gate, version: str, max_shard_size: str, trust: bool,
                      artifact: str = "merged", max_lora_rank: int = 16, model_root: Location | None = None, evaluated=None,
                      serve_check: bool = False, served_parity: bool = True) -> Manifest:
    from shared.publish.adapter_publish import prepare_adapter, publish_base
    from shared.publish.merge import merge_adapter
    from shared.train.models import resolve_base_model

    base_dir = resolve_base_model(base_ref, settings, trust, switch="--trust-remote-code")
    if trust:  # only the code finetune ran, by digest
        check_folder(base_dir, ft_manifest.extra.get(RECORD), record=f"{finetune_uri}/MANIFEST.json")
    prepared, merge_check = None, None
    with tempfile.TemporaryDirectory(prefix="publish-in-", dir=out.workdir.parent) as scratch:
        adapter_files = [f.path for f in ft_manifest.files if f.path.startswith("adapter/")]
        fetch_stage(settings, finetune_uri, Path(scratch) / "finetune", only=adapter_files)
        model_dir = out.workdir
        adapter_dir = Path(scratch) / "finetune" / "adapter"
        if artifact != "merged":  # refused adapters stop here, before the (long) merge
            prepared = prepare_adapter(adapter_dir, base_dir, base_ref=base_ref,
                                       trained_digest=ft_manifest.extra.get("base_model_digest"), max_lora_rank=max_lora_rank,
                                       where=f"{finetune_uri}/adapter", model_root=model_root)
        if artifact != "adapter":
            result = merge_adapter(base_dir, adapter_dir, model_dir, max_shard_size=max_shard_size, trust_remote_code=trust)
            merge_check = {"max_abs_logit_diff": result.max_abs_diff, "saved_max_abs_logit_diff": result.saved_max_abs_diff,
                           "saved_dtype": result.saved_dtype, "method": result.method,
                           "max_forward_rel_err": result.max_forward_rel_err}
        contract, parity = _serving_checks(model_dir, evaluated, base_dir, adapter_dir, trust, serve_check, Path(scratch),
                                           adapter_only=artifact == "adapter", served_parity=served_parity)
        if prepared:
            prepared.place(model_dir)
    provenance = {
        "version": version, "run_id": settings.run_id, "base_model": base_ref, "best_step": ft_manifest.extra.get("best_step"),
        "finetune": finetune_uri, "evaluate": evaluate_uri, "gate": gate, "published_at": now_iso(),
        "artifact": artifact, "merge_check": merge_check, **({"adapter": prepared.extra} if prepared else {}),
    }
    (model_dir / "lawtune-model.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if prepared:  # the base is in the store before any manifest names it
        publish_base(settings, prepared)
    return out.commit(extra={
        "serving": contract, "parity": parity,
        "gate": gate, "base_model": base_ref, "best_step": ft_manifest.extra.get("best_step"),
        "artifact": artifact, **({"adapter": prepared.extra} if prepared else {}),
        "merge_check": merge_check, "run_id": settings.run_id, "trained_at": ft_manifest.finished_at,
        "metrics": ev_manifest.extra.get("metrics", {}), "data": ft_manifest.inputs.get("data"),
        # URI and digest of each upstream artifact: lineage follows these and notices changed content.
        "lineage": {"finetune": {"uri": finetune_uri, "digest": ft_manifest.digest},
                    "evaluate": {"uri": evaluate_uri, "digest": ev_manifest.digest}},
        # The code files copied beside the weights (the ones finetune ran), for fetch-model and deploy to check.
        RECORD: code_files(model_dir) if trust else None,
    })


def _serving_checks(model_dir: Path, evaluated, base_dir: Path, adapter_dir: Path, trust: bool, serve_check: bool,
                    scratch: Path, *, adapter_only: bool = False, served_parity: bool = True) -> tuple[dict | None, dict | None]:
    """The serving contract and the pre-promotion check (shared/serve/parity.py), whose result also goes into
    the version folder as parity.json; (None, None) for an evaluation that recorded no serving profile.

    A merged (or both) version is checked as its merged folder; an adapter-only version as the base it is
    served on in serving.mode=adapters (template, stop ids, tokenizer: the adapter changes none of them), with
    no merge to audit and no served check, which its result says in ``note``."""
    from shared.serve import parity
    from shared.store.serving_contract import build, write_vllm_config

    if evaluated is None:
        log.warning("the evaluate artifact records no serving profile (an older evaluation): no serving contract, no parity check")
        return None, None
    served_folder = base_dir if adapter_only else model_dir
    contract = build(served_folder, evaluated.serving)
    if not adapter_only:
        write_vllm_config(model_dir, contract)
    note = None
    if evaluated.parity.enabled:
        if adapter_only:
            note = ("adapter-only version: served parity not checked (it is served as an adapter on its base by "
                    "serving.mode=adapters; the static checks ran on the base, no merge to audit)")
        elif not serve_check:
            note = "not served: the gate failed, nothing will be promoted"
        elif not served_parity:
            note = ("served parity not run: publish.served_parity is false (where publish runs there is no vLLM, e.g. the "
                    "pipeline chart's publish image); only the static checks ran")
    if note and note != "not served: the gate failed, nothing will be promoted":
        log.warning("parity: %s", note)
    report = parity.check(served_folder, evaluated, contract, base_dir=base_dir, adapter_dir=adapter_dir, trust_remote_code=trust,
                          served=False if note else None, log_dir=scratch, merged=not adapter_only)
    result = report.as_dict()
    if note:
        result["note"] = note
    (model_dir / parity.PARITY_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return contract, result


def _promote(model_root: Location, pointer: Pointer, version: str, manifest: Manifest, passed: bool, force: bool,
             gate, run_id: str, parity_failed: dict | None = None) -> bool:
    if repair_history(model_root):  # an earlier attempt swapped PROMOTED and died before recording it
        log.warning("recorded the promotion to %s that an interrupted publish left unrecorded", read_pointer(model_root).version)
    current = pointer.version
    if not passed and not force:
        if parity_failed is not None:
            reasons = "; ".join(c["message"] for c in parity_failed.get("checks", []) if not c.get("passed"))
            log.warning("parity check FAILED (%s): PROMOTED stays at %s", reasons, current or "<none>")
            return current == version
        reasons = "; ".join(gate.get("reasons", [])) if isinstance(gate, dict) else "no verdict recorded"
        log.warning("gate FAILED (%s): PROMOTED stays at %s", reasons, current or "<none>")
        return current == version
    if current == version:
        log.info("PROMOTED already names %s", version)
        return True
    compared = gate.get("promoted", current) if isinstance(gate, dict) else current
    if compared != current:
        # The verdict compared this candidate with another production model than the one serving now.
        raise PromotionConflict(f"{model_root.uri}/{PROMOTED} moved to {current or '<none>'} after evaluate compared "
                                f"{version} with {compared or '<none>'}; the other promotion won (re-run evaluate)")
    if isinstance(gate, dict) and gate.get("verdict") == "inconclusive" and current is not None and current != version:
        # allow_first lets an undecided comparison through only while nothing is promoted.
        log.warning("the gate's verdict was inconclusive and allowed only as a first promotion; %s is promoted now: "
                    "PROMOTED stays", current)
        if not force:
            return False
    if current is not None and not force:
        champion = find_manifest(model_root.child(current))
        if champion is not None and (champion.extra.get("trained_at") or "") > (manifest.extra.get("trained_at") or ""):
            log.warning("%s was trained before the promoted %s: PROMOTED stays (use --force, or lawtune models "
                        "promote/rollback, to move it back)", version, current)
            return False
    if not passed:
        banner = "!" * 72
        what = "PARITY CHECK" if parity_failed is not None else "QUALITY GATE"
        why = ("; ".join(c["message"] for c in parity_failed.get("checks", []) if not c.get("passed")) if parity_failed is not None
               else "; ".join(gate.get("reasons", [])) if isinstance(gate, dict) else "no verdict recorded")
        log.warning("%s\n--force: PROMOTING %s ALTHOUGH ITS %s FAILED (%s)\n%s", banner, version, what, why, banner)
    kind = "promote" if passed and not force else "forced"
    move_pointer(model_root, pointer, version, {"kind": kind, "gate": gate, "run_id": run_id})
    log.info("PROMOTED: %s -> %s", current or "<none>", version)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("publish", __doc__, module="jobs.publish", image=True,
                            env=(*STAGE_ENV, "LAWTUNE_BASE_MODEL", "LAWTUNE_ACTOR"))
    parser.add_argument("--finetune", metavar="URI", help="finetune artifact URI (default <artifact_root>/runs/<run_id>/finetune)")
    parser.add_argument("--evaluate", metavar="URI", help="evaluate artifact URI (default <artifact_root>/runs/<run_id>/evaluate)")
    parser.add_argument("--model-name", metavar="NAME", required=True, help="published as <artifact_root>/models/<name>/<version>")
    parser.add_argument("--force", action="store_true", help="promote even if the quality gate failed (logged loudly)")
    parser.add_argument("--max-shard-size", metavar="SIZE", default="2GB", help="safetensors shard size of the merged model (default 2GB)")
    parser.add_argument("--artifact", choices=ARTIFACTS, help="what the version carries (default: the config's publish.artifact, "
                        "else merged)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the base model repository's own code (ChatGLM3), only the files finetune recorded; "
                             "make train passes it when the config sets trust_remote_code: true")
    add_config_arguments(parser, reads="the publish section and base_model (the merge uses the base finetune recorded)",
                         base_model="expect")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        config = config_from_args(args)
        r = run(settings, args.model_name, args.finetune, args.evaluate, force=args.force, max_shard_size=args.max_shard_size,
                artifact=args.artifact or config.publish.artifact, max_lora_rank=config.publish.max_lora_rank,
                promote=config.publish.promote, served_parity=config.publish.served_parity, config=config,
                trust_remote_code=args.trust_remote_code)
        print(f"model: {r.version_uri} ({r.artifact}){' (already published)' if r.skipped else ''}")
        print(f"gate: {'PASSED' if r.gate_passed else 'FAILED'}")
        if r.parity is not None:
            print(f"parity: {'PASSED' if r.parity.get('passed') else 'FAILED'}")
            for check in r.parity.get("checks", []):
                print(f"  - {'ok' if check.get('passed') else 'FAIL'} {check.get('message')}")
            if r.parity.get("note"):
                print(f"  - note: {r.parity['note']}")
        state = "promoted (FORCED)" if r.forced else "promoted" if r.promoted else "not promoted"
        print(f"PROMOTED: {state}: {settings.models_uri(args.model_name)}/{PROMOTED}")

    return run_main("publish", body)


if __name__ == "__main__":
    raise SystemExit(main())
