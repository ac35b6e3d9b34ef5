# cxr-retrieval: `make help` lists the targets. Two commands set everything up on a fresh machine:
#   make paper   (or `make demo` offline)   and   make test
.DELETE_ON_ERROR:
.SUFFIXES:
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Python's bytecode cache stays on for everything make runs: a build or make test starts hundreds of short
# Python processes, and with PYTHONDONTWRITEBYTECODE set (as some sandboxes do) each one compiled cxrlib anew
unexport PYTHONDONTWRITEBYTECODE

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
	$(PY) -m pip install -q -e '.[dev,offline]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cxr-retrieval)" >/dev/null
	@# the map libraries' numba functions compiled once, into numba's cache (else the first maps compile them)
	$(PY) -m cxrlib.embedding_viz warm-jit
	@# notebooks stay clean: JupyterLab saves them stripped; git sees them through nbstripout (cxrlib.nbclean)
	$(PY) -m cxrlib.nbclean install-jupyter --config-dir $(ENV_DIR)/etc/jupyter >/dev/null
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(PY) -m cxrlib.nbclean install-git; fi
	@touch $@

# ---- tests and lint ----------------------------------------------------------------------------
PYTEST_ARGS ?=
# pytest-xdist workers for make test, one test file at a time each (module fixtures once; the workers share
# one smoke DAG build, tests/conftest.py smoke_dag); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
TEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# torch / OpenMP threads for each worker and the processes it starts: the usable cores (nproc, not
# swayed by an OMP_NUM_THREADS already set) shared out among the workers (2 workers x 2 threads on 2 cores
# oversubscribe them); TEST_WORKERS=0 leaves the environment alone
TEST_THREADS ?= $(shell n=$$(( $$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / $(TEST_WORKERS) )); echo $$(( n > 0 ? n : 1 )))
TEST_THREAD_ENV = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=$(TEST_THREADS))
.PHONY: test test-fast lint
test: $(ENV_STAMP) ## Run the whole test suite (unit + notebook smoke runs; TEST_WORKERS=2 xdist workers, 0: one process)
	HF_HUB_OFFLINE=1 $(TEST_THREAD_ENV) $(PY) -m pytest $(TEST_XDIST) $(PYTEST_ARGS)

test-fast: $(ENV_STAMP) ## Unit tests only (skips tests marked slow)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(ENV_STAMP) ## ruff over code and notebooks; fails on notebooks committed with outputs
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests/test_repo_hygiene.py

.PHONY: strip
strip: $(ENV_STAMP) ## Strip outputs from every notebook (nbstripout)
	$(PY) -m nbstripout notebooks/*.ipynb

# ---- the paper DAG -----------------------------------------------------------------------------
# Settings variables (DATASET, BACKBONE, W_<TERM> per loss term, SEED, EPOCHS, LR, BATCH_SIZE, DEVICE,
# N_BOOT, OPENI_ROOT, MIMIC_ROOT) are defined once, in cxrlib/settings.py: `make help` lists them from there,
# and cxrlib.dag validates each one given on the command line before anything runs (an unknown one is an error).
## VAR PROFILE paper (default) | offline (= make demo) | smoke; settings in configs/<profile>.yaml
## VAR CXR_WORKDIR put data/ build/ results/ figures/ under another folder
## VAR JOBS DAG nodes run at once (default 2; 1: one after another); a -jN given to make wins
PROFILE ?= paper
JOBS ?= 2
# the DAG's make runs JOBS nodes at once (each its own process, threads pinned by cxrlib.determinism, so
# results do not depend on the schedule), unless make already has a -j of its own (then its jobserver
# serves the inner make; another -j there would reset it); `make -n` lists the same nodes either way
DAG_JOBS = $(if $(filter -j%,$(MAKEFLAGS)),,-j$(JOBS))
ifneq ($(origin JOBS),file)
ifeq ($(shell [[ '$(JOBS)' =~ ^[1-9][0-9]*$$ ]] && echo ok),)
$(error JOBS=$(JOBS): the number of DAG nodes run at once must be a whole number >= 1)
endif
endif
export OPENI_ROOT MIMIC_ROOT CXR_WORKDIR
# every variable set on the command line, passed to cxrlib.dag for validation
CLI_VARS = $(foreach v,$(sort $(.VARIABLES)),$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))'))
DAG_CHECK = $(PY) -m cxrlib.dag check --profile $(PROFILE) $(CLI_VARS)
PREFLIGHT = $(PY) -m cxrlib.preflight --profile $(PROFILE) --dataset "$(DATASET)" --backbones "$(BACKBONE)" \
  --eval-set "$(EVAL_SET)"
# one build of a profile at a time (cxrlib.lock): held for the whole build; a second one waits, `make -n` says so
LOCKED = $(PY) -m cxrlib.lock run --profile $(PROFILE) --

# `make demo` and `make smoke` name their profile: another PROFILE is an error, not silently ignored
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(origin PROFILE),command line)
ifneq ($(PROFILE),offline)
$(error make demo runs PROFILE=offline; for PROFILE=$(PROFILE) run make paper PROFILE=$(PROFILE))
endif
endif
endif
ifneq ($(filter smoke,$(MAKECMDGOALS)),)
ifeq ($(origin PROFILE),command line)
ifneq ($(PROFILE),smoke)
$(error make smoke runs PROFILE=smoke; for PROFILE=$(PROFILE) run make paper PROFILE=$(PROFILE))
endif
endif
endif

.PHONY: paper demo smoke embed dag dag-embed
paper: $(ENV_STAMP) ## Rebuild every figure and table of PROFILE (default paper: Open-I, BiomedCLIP, CLIP; needs network or local copies)
	@$(DAG_CHECK)
	@$(PREFLIGHT)
	@+$(LOCKED) $(MAKE) --no-print-directory $(DAG_JOBS) dag PROFILE=$(PROFILE)

embed: $(ENV_STAMP) ## Build PROFILE's embedding sets only (data prep, adaptation where the profile adapts, extraction)
	@$(DAG_CHECK)
	@$(PREFLIGHT)
	@+$(LOCKED) $(MAKE) --no-print-directory $(DAG_JOBS) dag-embed PROFILE=$(PROFILE)

demo: ## The offline profile: real Open-I reports + synthetic radiographs, no network (= make paper PROFILE=offline)
	@+$(MAKE) --no-print-directory paper PROFILE=offline

smoke: ## The whole DAG on the smoke profile in about a minute (tiny synthetic data, random tiny backbone)
	@+$(MAKE) --no-print-directory paper PROFILE=smoke

ifneq ($(filter dag dag-embed,$(MAKECMDGOALS)),)
# cxrlib.dag validates the variables, writes every node's params file (only when it changes: make then
# reruns exactly the nodes whose parameters changed) and writes the DAG's make text: paths, embedding sets,
# and each node's prerequisites (upstream stamps + its notebook's cxrlib import closure); it prints that
# file's name (on an error, a file holding the one-line $(error)).
# Under cxrlib.lock: while another build of the profile runs, nothing is rewritten and make stops with a message.
# A profile with `deterministic: true` (the offline demo) pins threads, CPU kernels and MKL for every node: the
# make text exports them (cxrlib.determinism; they must be set before torch starts, so they travel as
# environment variables)
include $(shell $(PY) -m cxrlib.dag makevars --locked --profile $(PROFILE) $(CLI_VARS))

dag: $(RESULTS)/run_manifest.json
	@echo "done: $(PROFILE) -> $(RESULTS) and $(FIGURES)"
	@$(PY) -m cxrlib.progress summary --log $(B)/timings.jsonl --since $(DAG_START) --results $(RESULTS) \
	  --figures $(FIGURES) --title "make $(PROFILE)"

dag-embed: $(EMB_DONE) $(EVAL_EMB_DONE)
	@echo "embeddings of $(PROFILE): $(EMB_DONE)"

DAG_START := $(shell date -u +%Y-%m-%dT%H:%M:%S+00:00)

# papermill runs into <node>.run.ipynb; only a complete run is renamed to the stamp <node>.ipynb
# (through cxrlib.progress: the running cell and progress bar, and each node's wall time, on the terminal)
define papermill
	@echo ">> $(PROFILE): $(1)"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node $(1) -- \
	  env CXR_MAKE_NODE=$(1) CXR_PLAIN_PROGRESS=1 \
	  $(PY) -m cxrlib.progress run --node $(1) -- -k $(KERNEL) --no-progress-bar --cwd notebooks -f $(B)/params/$(1).yaml \
	  notebooks/$(1).ipynb $(B)/$(1).run.ipynb
	@mkdir -p $(B)/params/built && cp -p $(B)/params/$(1).yaml $(B)/params/built/
	@mv $(B)/$(1).run.ipynb $@
endef

# every notebook node (cxrlib.dag.NODES); its other prerequisites are in the included make text. The notebook
# itself counts by its code and parameters ($(B)/src/<node>.src, cxrlib.nbclean.source_key), not its mtime:
# opening, running or saving it in JupyterLab reruns nothing
$(B)/%.ipynb: $(B)/src/%.src $(B)/params/%.yaml
	$(call papermill,$*)

# every embedding set; EMBED_ARGS_<key> (backbone, adapted checkpoint) and prerequisites from cxrlib.dag
$(EMB_ROOT)/%/done.json:
	@echo ">> $(PROFILE): embed $*"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node embed-$* -- \
	  $(PY) -m cxrlib.embed --table $(TABLE) --out-dir $(@D) $(EMBED_ARGS_$*) \
	  $$($(PY) -m cxrlib.config flags $(B)/params/embed.yaml)
	@mkdir -p $(B)/params/built && cp -p $(B)/params/embed.yaml $(B)/params/built/

# a peer's evaluation set (EVAL_SET; cxrlib.dag node `evalset`, before notebook 03): its study table from
# notebook 01's data parameters, then one embedding set per backbone key as above; params in $(EVAL_PARAMS)
ifneq ($(EVAL_DS),)
$(EVAL_TABLE):
	@echo ">> $(PROFILE): evalset $(EVAL_DS)"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node evalset-$(EVAL_DS) -- \
	  $(PY) -m cxrlib.evalsets $(EVAL_DS) --params $(EVAL_PARAMS)/table.yaml
	@mkdir -p $(EVAL_PARAMS)/built && cp -p $(EVAL_PARAMS)/table.yaml $(EVAL_PARAMS)/built/

$(EVAL_EMB_ROOT)/%/done.json:
	@echo ">> $(PROFILE): embed $(EVAL_DS) $*"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node embed-$(EVAL_DS)-$* -- \
	  $(PY) -m cxrlib.embed --table $(EVAL_TABLE) --out-dir $(@D) $$($(PY) -m cxrlib.config flags $(EVAL_PARAMS)/$*.yaml)
	@mkdir -p $(EVAL_PARAMS)/built && cp -p $(EVAL_PARAMS)/$*.yaml $(EVAL_PARAMS)/built/
endif

$(RESULTS)/run_manifest.json: $(STAMPS) $(EMB_DONE) $(MANIFEST_SRC)
	@$(PY) -m cxrlib.manifest write --profile $(PROFILE) --out $(OUT) --inputs $(TABLE) $(EMB_DONE) \
	  $(EVAL_TABLE) $(EVAL_EMB_DONE) --outputs $(RESULTS) $(FIGURES) $(EVAL_RESULTS) $(EVAL_FIGURES)
endif

.PHONY: check-demo
check-demo: $(ENV_STAMP) ## Check a finished make demo against the README's reference values (each inside its 95% CI?)
	@$(PY) -m cxrlib.check_demo --profile offline

.PHONY: readme
readme: $(ENV_STAMP) ## Refresh README's generated blocks (make help; the offline demo's tables and figures, after make demo)
	$(PY) -m cxrlib.readme --profile offline

# ---- housekeeping ------------------------------------------------------------------------------
.PHONY: clean help
clean: ## Remove generated outputs (data/processed, embeddings, build/, results/, figures/); keeps downloads
	rm -rf build data/processed data/embeddings data/models
	find results figures -mindepth 1 ! -name .gitignore ! -name README.md -exec rm -rf {} +

help: ## List targets and variables
	@echo "cxr-retrieval — targets:"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/\1\t\2/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "variables (make VAR=value target):"
	@grep -hE '^## VAR ' $(MAKEFILE_LIST) | sed -E 's/^## VAR ([A-Z_]+) (.*)/\1\t\2/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@$(PYTHON_BOOT) -m cxrlib.settings make-help || echo "  (settings variables: python -m cxrlib.settings make-help)"
