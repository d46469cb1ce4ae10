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
        # valuesFrom targetPath=config stands for the training config the ConfigMap holds.
        set_files = {v["targetPath"]: config for v in spec.get("valuesFrom", [])}
        objects = render(chart_path, spec["values"], set_files=set_files, release=release["metadata"]["name"],
                         namespace=release["metadata"]["namespace"])
        assert objects and validate(objects) == []


def test_the_pipeline_release_waits_long_enough_for_a_run():
    (release,) = load("flux/lawtune-pipeline.yaml")
    hours = int(release["spec"]["timeout"].removesuffix("h"))
    assert hours >= 6  # hooks block the release until publish finished
