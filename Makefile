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
system-deps: ## Install the system packages the tests use (prometheus, podman, runc, debootstrap)
	@missing=""; for c in prometheus:prometheus promtool:prometheus podman:podman runc:runc debootstrap:debootstrap; do \
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
	$(PY) -m pytest -q tests

.PHONY: lint
lint: venv ## Byte-compile everything (a cheap syntax check)
	$(PY) -m compileall -q skin jobs tests bench
