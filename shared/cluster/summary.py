"""What a finished run tells its user: the report, the gate's verdict and what serving will pull."""

from __future__ import annotations

from shared.core.settings import Settings
from shared.store.artifacts import find_manifest
from shared.store.storage import open_location


def summarize(settings: Settings, model_name: str) -> None:
    """Tell the newcomer where the report is, what the gate said, and what serving will pull."""
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
    models = open_location(settings.models_uri(model_name), settings)
    if models.exists("PROMOTED"):
        print(f"Promoted:     {settings.models_uri(model_name)}/{models.read_text('PROMOTED').strip()}  (make serve)")
    else:
        print(f"Promoted:     nothing yet under {settings.models_uri(model_name)}")
