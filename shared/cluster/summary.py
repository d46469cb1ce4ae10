"""What a finished run tells its user: the report, the gate's verdict, what serving will pull,
and what to do next."""

from __future__ import annotations

import shlex

from shared.core.settings import Settings
from shared.core.uri import parse_uri
from shared.store.artifacts import find_manifest
from shared.store.storage import open_location

REPORT_PORT = 8000


def summarize(settings: Settings, model_name: str, *, target: str = "local") -> None:
    """Tell the newcomer where the report is, what the gate said, what serving will pull, and the next step."""
    evaluate = find_manifest(open_location(settings.run_uri("evaluate"), settings))
    if evaluate is None:
        return
    gate = evaluate.extra.get("gate", {})
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    report = f"{settings.run_uri('evaluate')}/report.html"
    print(f"\nReport:       {report}")
    print(f"              {settings.run_uri('evaluate')}/report.md")
    production = evaluate.extra.get("production_version")
    if production:
        print(f"Compared with production: {settings.models_uri(model_name)}/{production}")
    print(f"Quality gate: {verdict}")
    for reason in gate.get("reasons", []):
        print(f"  - {reason}")
    for line in parity_lines(settings):
        print(line)
    models = open_location(settings.models_uri(model_name), settings)
    promoted = models.exists("PROMOTED")
    if promoted:
        print(f"Promoted:     {settings.models_uri(model_name)}/{models.read_text('PROMOTED').strip()}  (make serve)")
    else:
        print(f"Promoted:     nothing yet under {settings.models_uri(model_name)}")
    for line in next_steps(settings, model_name, promoted=promoted, target=target):
        print(line)


def parity_lines(settings: Settings) -> list[str]:
    """The pre-promotion check of the version this run published (shared/serve/parity.py), in a few lines."""
    import json

    run_root = open_location(settings.run_uri(), settings)
    if not run_root.exists("PUBLISHED"):
        return []
    version_uri = json.loads(run_root.read_text("PUBLISHED"))[-1]
    manifest = find_manifest(open_location(version_uri, settings))
    parity = manifest.extra.get("parity") if manifest else None
    if not isinstance(parity, dict):
        return []
    lines = [f"Parity:       {'PASSED' if parity.get('passed') else 'FAILED'} ({version_uri}/parity.json)"]
    served = parity.get("served") or {}
    if served:
        lines.append(f"  - vLLM served {served.get('questions')} golden questions: first {served.get('first_tokens')} tokens agree "
                     f"in {served.get('first_tokens_agreement', 0):.0%}, token agreement {served.get('token_agreement', 0):.2f}, "
                     f"{served.get('identical')} identical answers")
    elif parity.get("note"):
        lines.append(f"  - {parity['note']}")
    lines += [f"  - FAIL {c['message']}" for c in parity.get("checks", []) if not c.get("passed")]
    return lines


def next_steps(settings: Settings, model_name: str, *, promoted: bool, target: str = "local") -> list[str]:
    """The lines that say what to do after a run: serve the model, open the report from elsewhere."""
    lines = ["", "Next:"]
    if promoted and target == "local":
        name = "" if model_name == "legal-assistant" else f" MODEL_NAME={shlex.quote(model_name)}"
        lines.append(f"  make serve{name}        # the promoted model behind the gateway on http://127.0.0.1:8080 (prints a curl line)")
    elif promoted:
        lines.append(f"  helm install {model_name} charts/lawtune-serving --set model.name={model_name} "
                     f"--set artifactStore.root={settings.artifact_root} --set apiKey.existingSecret=<secret>   # README: Serving")
    else:
        lines.append("  the gate kept the model from serving; read the report, change the config or data, re-run "
                     "(or publish anyway: python -m jobs.publish --force)")
    uri = settings.run_uri("evaluate")
    if uri.startswith("file://"):
        folder = shlex.quote(parse_uri(uri).path)
        lines += [
            "  open the report from another machine (this one has no browser?):",
            f"    python3 -m http.server {REPORT_PORT} --bind 127.0.0.1 --directory {folder}",
            f"    then on your laptop: ssh -N -L {REPORT_PORT}:127.0.0.1:{REPORT_PORT} <this host>  and open "
            f"http://127.0.0.1:{REPORT_PORT}/report.html",
        ]
    else:
        lines.append(f"  fetch the report: python3 -c \"import boto3,sys; boto3.client('s3').download_file(*sys.argv[1:])\" "
                     f"{shlex.quote(parse_uri(uri).bucket)} {shlex.quote(parse_uri(uri).path + '/report.html')} report.html")
    return lines
