# fetch-model: the serving chart's init container; downloads a published model and verifies it. A slim Python base.
#
#   make image-fetch-model              # = docker build -f images/fetch-model.Dockerfile ... (tag $(IMAGE_TAG))
#   make image-fetch-model DEVICE=cpu   # the same image, tagged $(IMAGE_TAG)-cpu for the serving chart's `vllm.device: cpu`
#
# Base: a slim Python for both DEVICEs (this stage needs no torch). Without a registry, `make
# base-images` builds a Debian bookworm equivalent (BASES=local). Pin it by digest:
#   DOCKER_BUILD_ARGS='--build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>'
# The dependency layer comes first and is the same text in preprocess and fetch-model, so the two
# images share it; a code change rebuilds only the code layers.
# Measured (make bench-images; docs/benchmarks.md): see the `measured:` lines.
#   measured: cpu 0.24 GB, cold build 1 s, rebuild after a one-line code change 1 s (2026-12-07, make bench-images on 2 cores)
# Runs as uid 10001 with a read-only root filesystem: HOME, TMPDIR and the caches point at paths the
# pipeline chart mounts as emptyDirs; nothing else is written.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# ---- shared by preprocess and fetch-model: keep this block identical in the two files ----
# The requirement list, computed from pyproject.toml in a stage of its own: the install layer copies
# only the list, so a pyproject.toml change that alters no requirement rebuilds nothing.
# constraints.txt pins the dev environment; its torch (a CPU build) and triton are not installed here.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml constraints.txt images/requirements.py /src/
RUN cd /src && mkdir /out \
 && grep -v -E "^(torch|triton)==" constraints.txt > /out/constraints.txt \
 && python3 requirements.py pyproject.toml data > /out/data.txt

FROM ${PYTHON_IMAGE}
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
# A virtual environment: Debian's Python refuses system-wide pip installs (PEP 668).
RUN groupadd --gid 10001 lawtune \
 && useradd --uid 10001 --gid 10001 --home-dir /home/lawtune --no-create-home --shell /usr/sbin/nologin lawtune \
 && mkdir -p /home/lawtune /var/cache/lawtune \
 && chown 10001:10001 /home/lawtune /var/cache/lawtune \
 && python3 -m venv /opt/lawtune/venv
COPY --from=requirements /out/data.txt /out/constraints.txt /opt/lawtune/requirements/
# The build's own pip settings (a private index, a proxy's CA) arrive as BuildKit secrets, never in a layer:
#   --secret id=pip.conf,src=<pip.conf>  --secret id=ca,src=<CA bundle the pip.conf names as /run/secrets/ca>
RUN --mount=type=cache,id=lawtune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=images/wheels,target=/opt/lawtune/wheels \
    cd /opt/lawtune/requirements \
 && export PIP_CONFIG_FILE=/run/secrets/pip.conf \
 && pip install --find-links /opt/lawtune/wheels -c constraints.txt -r data.txt
# ---- end of the shared block ----

ARG DEVICE=cpu
ARG IMAGE_TAG=dev
LABEL org.opencontainers.image.title="lawtune-fetch-model" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      org.opencontainers.image.version="${IMAGE_TAG}" \
      io.lawtune.stage="fetch-model" \
      io.lawtune.dependency-group="data" \
      io.lawtune.device="${DEVICE}"
ENV LAWTUNE_CODE_VERSION=${IMAGE_TAG} \
    PYTHONPATH=/opt/lawtune/app
# The code, last: only this stage's entrypoint (jobs never import each other).
COPY shared/ /opt/lawtune/app/shared/
COPY jobs/__init__.py jobs/fetch_model.py /opt/lawtune/app/jobs/
# Not HOME: the chart mounts an emptyDir there, which would hide anything the image put in it.
WORKDIR /opt/lawtune
USER 10001:10001
ENTRYPOINT ["python", "-m", "jobs.fetch_model"]
