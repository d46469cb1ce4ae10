"""Build local equivalents of the images' upstream bases from Debian packages, for a machine that
reaches no image registry (`make base-images`; `make images BASES=local` uses them).

    python3 images/local_bases.py [--engine docker] [--mirror http://deb.debian.org/debian] [--force]

Each base is a Debian bookworm root filesystem made by mmdebstrap (minbase, no recommends, no docs)
and turned into an image with `docker import`. An image whose recipe is unchanged is kept (its
`io.lawtune.recipe` label holds the recipe's digest), so a second run costs a second or two.
Debian versions follow bookworm's point releases and security updates, as the upstream
`*-bookworm` images do: the image records the exact package list in /usr/share/lawtune/dpkg.txt.

| local image                          | stands in for                  | packages                          |
| ------------------------------------ | ------------------------------ | --------------------------------- |
| localhost/lawtune/python:3.11-bookworm | python:3.11.14-slim-bookworm (stage images, vLLM-CPU) | python3 (3.11), venv, CA certificates, passwd, libnuma1 |
| localhost/lawtune/nginx:1.22-bookworm  | nginx:1.28.0 (the serving chart's gateway) | nginx-light (1.22), njs (the canary) |
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

SUITE = "bookworm"


@dataclass(frozen=True)
class Base:
    image: str
    stands_for: str
    packages: tuple[str, ...]
    changes: tuple[str, ...] = ()

    def recipe(self, mirror: str) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "suite": SUITE, "mirror": mirror}, sort_keys=True).encode()).hexdigest()


BASES = {
    "python": Base(
        image="localhost/lawtune/python:3.11-bookworm",
        stands_for="python:3.11.14-slim-bookworm",
        # passwd: groupadd/useradd in the stage images; libnuma1: vLLM's CPU kernels.
        packages=("python3", "python3-venv", "ca-certificates", "passwd", "libnuma1"),
        changes=("ENV LANG=C.UTF-8", 'CMD ["python3"]'),
    ),
    "nginx": Base(
        image="localhost/lawtune/nginx:1.22-bookworm",
        stands_for="nginx:1.28.0",
        # njs as in the official image (/usr/lib/nginx/modules/ngx_http_js_module.so): the canary runs in it.
        packages=("nginx-light", "libnginx-mod-http-js"),
        changes=("ENV LANG=C.UTF-8", 'CMD ["nginx", "-g", "daemon off;"]'),
    ),
}


def engine_label(engine: str, image: str) -> str | None:
    proc = subprocess.run([engine, "image", "inspect", "--format", '{{ index .Config.Labels "io.lawtune.recipe" }}', image],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def build(name: str, base: Base, engine: str, mirror: str, force: bool) -> None:
    recipe = base.recipe(mirror)
    if not force and engine_label(engine, base.image) == recipe:
        print(f"local_bases: {base.image} is up to date (recipe {recipe[:12]})")
        return
    if not shutil.which("mmdebstrap"):
        sys.exit("local_bases: mmdebstrap is missing (apt-get install mmdebstrap; `make container-engine` installs it)")
    security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"lawtune-base-{name}-") as tmp:
        rootfs = os.path.join(tmp, "rootfs.tar")
        subprocess.run([
            "mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(base.packages)}",
            "--aptopt=APT::Install-Recommends \"false\"",
            # What an image never needs; the upstream slim images leave these out too.
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--customize-hook=mkdir -p \"$1/usr/share/lawtune\" && chroot \"$1\" dpkg-query -W > \"$1/usr/share/lawtune/dpkg.txt\"",
            "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
            SUITE, rootfs,
            f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main", f"deb {security} {SUITE}-security main",
        ], check=True)
        changes = [*base.changes, f"LABEL io.lawtune.recipe={recipe}", f"LABEL io.lawtune.stands-for={base.stands_for}"]
        subprocess.run([engine, "import", *[a for c in changes for a in ("--change", c)], rootfs, base.image],
                       check=True, stdout=subprocess.DEVNULL)
    print(f"local_bases: built {base.image} (for {base.stands_for}) in {time.monotonic() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", help="container engine CLI (default: DOCKER, else the one images/build.py picks)")
    parser.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian"),
                        help="Debian mirror (DEBIAN_MIRROR)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the recipe is unchanged")
    parser.add_argument("names", nargs="*", help=f"which bases: {', '.join(BASES)} (default: all)")
    args = parser.parse_args()
    if not args.engine:
        from build import buildkit_cli  # images/build.py, beside this file

        args.engine = buildkit_cli()[0]
    for name in args.names or BASES:
        if name not in BASES:
            parser.error(f"no base {name!r} (choose from {', '.join(BASES)})")
        build(name, BASES[name], args.engine, args.mirror, args.force)


if __name__ == "__main__":
    main()
