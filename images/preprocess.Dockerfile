# syntax=docker/dockerfile:1
# preprocess: CSV/JSONL of Q&A → train/dev/test chat JSONL. CPU only: a slim Python base.
#
#   make image-preprocess          # = docker build -f images/preprocess.Dockerfile -t $(IMAGE_REGISTRY)/preprocess:$(IMAGE_TAG) .
#
# Dependency group: [data] of pyproject.toml. Runs as uid 10001 with a read-only root filesystem:
# HOME, TMPDIR and the caches point at paths the pipeline chart mounts as emptyDirs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-preprocess" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      io.lawtune.stage="preprocess" \
      io.lawtune.dependency-group="data"

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
COPY pyproject.toml constraints.txt README.md ./
COPY shared/ shared/
# Only this stage's entrypoint: jobs never import each other.
COPY jobs/__init__.py jobs/preprocess.py jobs/
# constraints.txt pins the dev environment; torch (a CPU build there) and triton are not installed here.
RUN grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ".[data]" \
 && rm -rf /src /tmp/constraints.txt
WORKDIR /home/lawtune
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.preprocess"]
