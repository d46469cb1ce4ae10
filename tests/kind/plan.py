"""What `make kind-test` builds and pulls, printed before it starts (read from the files it uses).

    python tests/kind/plan.py
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REGISTRY, TAG, DEVICE = "localhost/lawtune", "kind", "cpu"
STAGE_IMAGES = ["preprocess", "finetune", "evaluate", "publish", "fetch-model"]
# Expected on a 4-core / 16 GB machine with a fast network (estimated, not measured here: no Docker).
DURATION = ("about 25-35 minutes the first time (CPU images ~10 min, vLLM CPU image pull, pipeline ~8 min, "
            "vLLM start ~3 min); about 12 minutes once images are built and cached")


def built() -> list[str]:
    return [f"{REGISTRY}/{stage}:{TAG}-{DEVICE}" for stage in STAGE_IMAGES]


def bases() -> list[str]:
    """The images the CPU builds start FROM (DEVICE=cpu: the slim Python base everywhere)."""
    found = set()
    for dockerfile in (REPO / "images").glob("*.Dockerfile"):
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.M))
        found.add(args["PYTHON_IMAGE"])
    return sorted(found)


def vllm_image() -> str:
    """The image the serving chart runs with values-serving.yaml: CPU mode's vllm.cpu.image, whose
    tag defaults to vllm.image.tag (test_kind_config renders the chart to check this)."""
    chart = yaml.safe_load((REPO / "charts" / "lawtune-serving" / "values.yaml").read_text())["vllm"]
    kind = yaml.safe_load((HERE / "values-serving.yaml").read_text())["vllm"]
    tag = {**chart["image"], **kind.get("image", {})}["tag"]
    cpu = {**chart["cpu"]["image"], **(kind.get("cpu") or {}).get("image", {})}
    return f"{cpu['repository']}:{cpu['tag'] or tag}"


def pulled() -> list[str]:
    seaweed = [c["image"] for o in yaml.safe_load_all((HERE / "seaweedfs.yaml").read_text()) if o and o["kind"] == "Deployment"
               for c in o["spec"]["template"]["spec"]["containers"]]
    return [vllm_image(), *seaweed]


def main() -> None:
    print("make kind-test will:")
    print("  build (make images DEVICE=cpu IMAGE_TAG=kind), from " + ", ".join(bases()) + ":")
    for image in built():
        print(f"    {image}")
    print("  pull (docker, then kind load; seaweedfs is pulled by the node):")
    for image in pulled():
        print(f"    {image}")
    print("  create the kind cluster lawtune-test (its kindest/node image), unless it exists")
    print(f"  take {DURATION}")


if __name__ == "__main__":
    main()
