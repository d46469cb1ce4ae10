# syntax=docker/dockerfile:1
# fetch-model: the serving chart's init container; downloads the promoted model and verifies it. A slim Python base.
#
#   make image-fetch-model              # = docker build -f images/fetch-model.Dockerfile -t $(IMAGE_REGISTRY)/fetch-model:$(IMAGE_TAG) .
#   make image-fetch-model DEVICE=cpu   # tagged $(IMAGE_TAG)-cpu, for the pipeline chart's `device: cpu`
#
# Dependency group: [data] of pyproject.toml, installed from pyproject.toml + constraints.txt in a
# layer of its own before the code is copied: a code change rebuilds only the last two layers.
# Base: a slim Python for both DEVICEs (this stage needs no torch; DEVICE=cpu only changes the
# tag). Pin it by digest: DOCKER_BUILD_ARGS='--build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>'.
# Size, unpacked (estimated from the bases and the installed wheels; no Docker engine measured it):
#   size: cuda ~0.2 GB, cpu ~0.2 GB
# Runs as uid 10001 with a read-only root filesystem: HOME, TMPDIR and the caches point at paths the
# pipeline chart mounts as emptyDirs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG DEVICE=cpu
ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-fetch-model" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      io.lawtune.stage="fetch-model" \
      io.lawtune.dependency-group="data" \
      io.lawtune.device="${DEVICE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/lawtune \
    TMPDIR=/tmp \
    LAWTUNE_CACHE_DIR=/var/cache/lawtune \
    HF_HOME=/var/cache/lawtune/huggingface \
    XDG_CACHE_HOME=/var/cache/lawtune/xdg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 \
    LAWTUNE_CODE_VERSION=${IMAGE_TAG}

RUN groupadd --gid 10001 lawtune \
 && useradd --uid 10001 --gid 10001 --home-dir /home/lawtune --no-create-home --shell /usr/sbin/nologin lawtune \
 && mkdir -p /home/lawtune /var/cache/lawtune \
 && chown 10001:10001 /home/lawtune /var/cache/lawtune

WORKDIR /src
COPY pyproject.toml constraints.txt images/requirements.py ./
# constraints.txt pins the dev environment; torch (a CPU build there) and triton are not installed here.
RUN grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt \
 && python requirements.py pyproject.toml data > /tmp/requirements.txt \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY README.md ./
COPY shared/ shared/
# Only this stage's entrypoint: jobs never import each other.
COPY jobs/__init__.py jobs/fetch_model.py jobs/
RUN pip install --no-deps . \
 && rm -rf /src /tmp/constraints.txt /tmp/requirements.txt
WORKDIR /home/lawtune
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.fetch_model"]
