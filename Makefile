# cxr-retrieval: `make help` lists the targets. Two commands set everything up on a fresh machine:
#   make paper   (or `make demo` offline)   and   make test
.DELETE_ON_ERROR:
.SUFFIXES:
SHELL := /bin/bash
.DEFAULT_GOAL := help

# ---- environment -------------------------------------------------------------------------------
PYTHON_BOOT ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
KERNEL := cxr-retrieval
ifdef CONDA_PREFIX
  ENV_DIR := $(CONDA_PREFIX)
  PY := $(CONDA_PREFIX)/bin/python
else
  ENV_DIR := .venv
  PY := $(CURDIR)/.venv/bin/python
endif
ENV_STAMP := $(ENV_DIR)/.cxr-env-stamp

.PHONY: env
env: $(ENV_STAMP) ## Create the environment (.venv unless a conda env is active), install cxrlib, register the kernel

$(ENV_STAMP): pyproject.toml
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "error: $(PYTHON_BOOT) not found: install Python 3.10-3.13 (or set PYTHON_BOOT=...)"; exit 1; }
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(0 if (3,10) <= sys.version_info[:2] <= (3,13) else 1)' || { echo "error: cxr-retrieval needs Python 3.10-3.13; $(PYTHON_BOOT) is $$($(PYTHON_BOOT) -V 2>&1): install a supported Python or set PYTHON_BOOT"; exit 1; }
	@if [ -z "$(CONDA_PREFIX)" ] && [ ! -x .venv/bin/python ]; then echo "creating .venv"; $(PYTHON_BOOT) -m venv .venv || { echo "error: python venv module missing: apt-get install python3-venv"; exit 1; }; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cxr-retrieval)" >/dev/null
	@touch $@

# ---- tests and lint ----------------------------------------------------------------------------
PYTEST_ARGS ?=
.PHONY: test test-fast lint
test: $(ENV_STAMP) ## Run the whole test suite (unit + notebook smoke runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(ENV_STAMP) ## Unit tests only (skips tests marked slow)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(ENV_STAMP) ## ruff over code and notebooks; fails on notebooks committed with outputs
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests/test_repo_hygiene.py

.PHONY: strip
strip: $(ENV_STAMP) ## Strip outputs from every notebook (nbstripout)
	$(PY) -m nbstripout notebooks/*.ipynb

# ---- housekeeping ------------------------------------------------------------------------------
.PHONY: clean help
clean: ## Remove generated outputs (data/processed, embeddings, build/, results/, figures/); keeps downloads
	rm -rf build data/processed data/embeddings data/models
	find results figures -mindepth 1 ! -name .gitignore ! -name README.md -exec rm -rf {} +

help: ## List targets and variables
	@echo "cxr-retrieval — targets:"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/\1|\2/' | awk -F'|' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "variables (make VAR=value target):"
	@grep -hE '^## VAR ' $(MAKEFILE_LIST) | sed -E 's/^## VAR ([A-Z_]+) (.*)/\1|\2/' | awk -F'|' '{printf "  %-12s %s\n", $$1, $$2}'
