"""docs/gitops: the Argo CD Applications and Flux HelmReleases point at charts that exist, and the
values they carry render manifests that pass the strict schemas (Argo CD and Flux CRDs are not in
kubernetes-validate, so their own fields are checked here by shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm_utils import REPO, by_kind, render, validate

GITOPS = REPO / "docs" / "gitops"


def load(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((GITOPS / rel).read_text()) if d]


@pytest.mark.parametrize("rel", ["argocd/lawtune-pipeline.yaml", "argocd/lawtune-serving.yaml"])
def test_argocd_applications_render_valid_manifests(rel, tmp_path):
    (app,) = load(rel)
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    chart = REPO / source["path"]
    assert (chart / "Chart.yaml").is_file()
    set_files = {p["name"]: (chart / p["path"]).resolve() for p in source["helm"].get("fileParameters", [])}
    for path in set_files.values():
        assert path.is_file() and REPO in path.parents, f"{path} must exist inside the repository"
    objects = render(source["path"], source["helm"]["valuesObject"], set_files=set_files,
                     release=source["helm"]["releaseName"], namespace=app["spec"]["destination"]["namespace"])
    assert objects and validate(objects) == []
    if "pipeline" in rel:
        waves = [int(j["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for j in by_kind(objects, "Job")]
        assert waves == sorted(waves) and len(set(waves)) == 4


def test_flux_source_and_releases_fit_together(tmp_path):
    (source,) = load("flux/source.yaml")
    assert source["kind"] == "GitRepository"
    releases = {r["metadata"]["name"]: r for rel in ("flux/lawtune-pipeline.yaml", "flux/lawtune-serving.yaml") for r in load(rel)}
    assert releases["assistant"]["spec"]["dependsOn"] == [{"name": "lawtune"}]
    config = tmp_path / "config.yaml"
    config.write_text("seed: 3\n")
    for release in releases.values():
        spec = release["spec"]
        ref = spec["chart"]["spec"]["sourceRef"]
        assert (ref["kind"], ref["name"], ref["namespace"]) == ("GitRepository", source["metadata"]["name"], source["metadata"]["namespace"])
        chart_path = spec["chart"]["spec"]["chart"].removeprefix("./")
        extra = []
        for ref in spec.get("valuesFrom", []):  # the ConfigMap holds `make flux-values` output
            values_file = tmp_path / f"{ref['name']}.yaml"
            values_file.write_text(_flux_values(config), encoding="utf-8")
            extra += ["-f", str(values_file)]
        objects = render(chart_path, spec["values"], release=release["metadata"]["name"],
                         namespace=release["metadata"]["namespace"], extra_args=extra)
        assert objects and validate(objects) == []


def test_the_pipeline_release_waits_long_enough_for_a_run():
    (release,) = load("flux/lawtune-pipeline.yaml")
    hours = int(release["spec"]["timeout"].removesuffix("h"))
    assert hours >= 6  # hooks block the release until publish finished


# ---------------------------------------------------------------- how Flux hands the config over

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _flux_values(config: Path) -> str:
    """What `make flux-values CONFIG=...` prints: the values file the ConfigMap carries."""
    import subprocess

    return subprocess.run(["make", "-s", "flux-values", f"CONFIG={config}"], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout


def _rendered_config(**kwargs) -> str:
    base = {"runId": "r", "artifactRoot": "s3://b/a", "input": {"uri": "s3://b/x.csv"}}
    (cm,) = by_kind(render("charts/lawtune-pipeline", base, **kwargs), "ConfigMap")
    return cm["data"]["config.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_a_targetpath_value_would_be_split_at_commas(config):
    """Why the shipped HelmRelease uses a values file: Flux parses a targetPath value with Helm's
    --set parser (strvals), which `helm template --set` runs too; every shipped config breaks."""
    from tests.helm_utils import RenderError

    text = config.read_text(encoding="utf-8")
    assert "," in text
    try:
        survived = _rendered_config(extra_args=["--set", f"config={text}"]) == text.rstrip("\n")
    except RenderError:
        survived = False
    assert not survived


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_survives_the_way_flux_receives_it(config, tmp_path):
    """Values file (what the example ships) and Flux's `literal: true` (helm --set-literal) both
    carry the file byte for byte into the ConfigMap the stages read."""
    text = config.read_text(encoding="utf-8")
    values = tmp_path / "values.yaml"
    values.write_text(_flux_values(config), encoding="utf-8")
    assert _rendered_config(extra_args=["-f", str(values)]) == text.rstrip("\n")
    assert _rendered_config(extra_args=["--set-literal", f"config={text}"]) == text.rstrip("\n")


def test_the_flux_pipeline_release_takes_the_config_as_a_values_file():
    (release,) = load("flux/lawtune-pipeline.yaml")
    for ref in release["spec"]["valuesFrom"]:
        assert "targetPath" not in ref or ref.get("literal") is True, ref
    assert "make -s flux-values" in (GITOPS / "flux" / "lawtune-pipeline.yaml").read_text()


def test_the_flux_pipeline_reruns_only_on_a_chart_version_change():
    """Revision would upgrade (and re-run every stage hook) on any commit under charts/."""
    (release,) = load("flux/lawtune-pipeline.yaml")
    assert release["spec"]["chart"]["spec"]["reconcileStrategy"] == "ChartVersion"


def _argocd_pipeline_objects():
    (app,) = load("argocd/lawtune-pipeline.yaml")
    source = app["spec"]["source"]
    chart = REPO / source["path"]
    set_files = {p["name"]: (chart / p["path"]).resolve() for p in source["helm"].get("fileParameters", [])}
    return app, render(source["path"], source["helm"]["valuesObject"], set_files=set_files,
                       release=source["helm"]["releaseName"], namespace=app["spec"]["destination"]["namespace"])


def test_argocd_schedules_every_gpu_stage_on_the_gpu_pool():
    """Evaluate requests a GPU too: a toleration on finetune alone stalls the run at evaluate."""
    _, objects = _argocd_pipeline_objects()
    gpu_jobs = [j for j in by_kind(objects, "Job")
                if "nvidia.com/gpu" in j["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert sorted(j["metadata"]["labels"]["lawtune.io/stage"] for j in gpu_jobs) == ["evaluate", "finetune"]
    for job in gpu_jobs:
        tolerations = job["spec"]["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in tolerations), job["metadata"]["name"]


def test_argocd_never_retries_a_run_and_runs_plain_jobs():
    """A sync retry would re-create hook Jobs and re-run a stage that exited 2; plain Jobs that
    completed unchanged are not run again on the next sync."""
    app, objects = _argocd_pipeline_objects()
    assert "retry" not in app["spec"].get("syncPolicy", {})
    assert not [o for o in objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]


def _serving_examples() -> list[tuple[str, dict, str]]:
    (app,) = load("argocd/lawtune-serving.yaml")
    (release,) = load("flux/lawtune-serving.yaml")
    return [("argocd", app["spec"]["source"]["helm"]["valuesObject"], app["spec"]["source"]["helm"]["releaseName"]),
            ("flux", release["spec"]["values"], release["metadata"]["name"])]


@pytest.mark.parametrize("example", [0, 1], ids=["argocd", "flux"])
def test_serving_examples_pin_the_model_version(example):
    """With autoscaling on (the chart's default) a floating version lets a scale-up serve a newer
    model beside older pods: the examples pin it, and their manifests carry no floating warning."""
    import json
    import re

    _, values, release = _serving_examples()[example]
    version = values["model"].get("version")
    schema = json.loads((REPO / "charts" / "lawtune-serving" / "values.schema.json").read_text())
    assert version and re.fullmatch(schema["properties"]["model"]["properties"]["version"]["pattern"], version)
    objects = render("charts/lawtune-serving", values, release=release, namespace="lawtune")
    (vllm,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    assert vllm["spec"]["template"]["metadata"]["annotations"]["lawtune.io/model-version"] == version
    assert "lawtune.io/warning" not in vllm["metadata"].get("annotations", {})
    assert any(h.get("kind") == "HorizontalPodAutoscaler" for h in objects)  # the case the pin protects
