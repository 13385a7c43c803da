# loraplex — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every package pinned with hashes (locks/update.py); CPU torch. On a GPU machine: make install LOCK=locks/dev-cuda.txt
LOCK ?= locks/dev.txt
PYTEST_ARGS ?=

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
		/^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
		/^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The lock holds every dependency and the build backend: nothing unpinned is fetched.
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(LOCK)
	@echo "==> Installing the locked Python packages into $(VENV) ($(LOCK); a minute or two the first time)"
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install loraplex and its test tools from the lock (LOCK=locks/dev.txt)

.PHONY: lock
lock: install ## Re-resolve locks/*.txt from pyproject.toml with uv (needs PyPI), after editing dependencies
	$(BIN)/python locks/update.py

.PHONY: test
test: install cluster-provision ## Run the test suite (CPU; GPU-marked tests are deselected)
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

.PHONY: lint
lint: install ## ruff check + format check + CRDs up to date
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m loraplex.operator.crdgen --check
	$(BIN)/python manifests/generate.py --check

.PHONY: crds
crds: install ## Regenerate crds/ from the pydantic models, then the chart's copy and manifests/
	$(BIN)/python -m loraplex.operator.crdgen
	$(BIN)/python manifests/generate.py

.PHONY: manifests
manifests: install ## Copy crds/ into the chart; render manifests/install.yaml and manifests/rbac/ from it
	$(BIN)/python manifests/generate.py

.PHONY: format
format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

##@ Local cluster

.PHONY: cluster-provision cluster-up cluster-down
cluster-provision: ## Build or find etcd, kube-apiserver, kube-controller-manager, kubectl, helm (cached)
	bash e2e/cluster/provision.sh

cluster-up: install cluster-provision ## Start a local control plane in the background (prints KUBECONFIG)
	$(BIN)/python -m loraplex.localcluster up

cluster-down: install ## Stop the local control plane
	$(BIN)/python -m loraplex.localcluster down

##@ Build

REGISTRY ?= loraplex
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

.PHONY: images
images: ## Build the server, server-cpu and operator images with docker, podman or buildah (PUSH=1 pushes to REGISTRY)
	REGISTRY=$(REGISTRY) TAG=$(TAG) PUSH=$(PUSH) bash images/build.sh

##@ Deployment

HELM ?= $${LORAPLEX_CACHE:-$$HOME/.cache/loraplex}/k8s/bin/helm

.PHONY: helm-lint
helm-lint: cluster-provision ## helm lint the chart (cluster scope; namespace scope with samples)
	$(HELM) lint --strict helm/loraplex
	$(HELM) lint --strict helm/loraplex --set scope=namespace --set samples.enabled=true

##@ Benchmarks (GPU)

.PHONY: bench-kernels bench-engine bench-serve bench-smoke
bench-kernels: install ## Batched-LoRA kernel benchmark; needs CUDA (docs/benchmarks/kernels.md)
	$(BIN)/python bench/kernels.py

bench-engine: install ## Decode-step benchmark vs transformers/PEFT at Gemma-2-2B shapes; needs CUDA
	$(BIN)/python bench/engine.py

bench-serve: install ## HTTP serving scenarios (adapters, rates, hot-load) then plots; needs CUDA
	$(BIN)/python bench/run_suite.py --gpu
	$(BIN)/python bench/plots.py

bench-smoke: install ## The serving benchmark harness on CPU against `loraplex serve --demo` (seconds)
	$(BIN)/python bench/run_suite.py --smoke

##@ Demo and end to end

.PHONY: demo demo-down e2e e2e-kind
# The control-plane build starts first and runs beside `make install` and the training
# (e2e/cluster/provisioning.py relays its log), so a cold run costs about the build, not the sum.
# The build is the longest part, so the rest runs at a lower priority (nice 10) and fills its gaps.
demo: ## The whole loop locally: cluster, chart, operator, 2 pods, 3 adapters, live hot-load
	@log="$$(mktemp -t loraplex-provision.XXXXXX.log)"; \
	bash e2e/cluster/provision.sh >"$$log" 2>&1 & \
	nice -n 10 $(MAKE) --no-print-directory install && \
	LORAPLEX_PROVISION_LOG="$$log" nice -n 10 $(BIN)/python e2e/demo.py up

demo-down: install ## Stop everything `make demo` started
	$(BIN)/python e2e/demo.py down

e2e: install ## The e2e suite against the cluster in KUBECONFIG (settings: e2e/conftest.py)
	$(BIN)/pytest e2e $(PYTEST_ARGS)

e2e-kind: install ## The e2e suite on kind (needs docker, kind, helm; LORAPLEX_E2E_MANIFESTS=hub-backed manifests)
	PYTHON=$(BIN)/python bash e2e/kind.sh $(PYTEST_ARGS)
