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

# ---- the paper DAG -----------------------------------------------------------------------------
## VAR PROFILE paper (default) | offline (= make demo) | smoke; settings in configs/<profile>.yaml
PROFILE ?= paper
## VAR DATASET openi | mimic | openi_synth | synthetic (default: the profile's)
## VAR OPENI_ROOT local Open-I copy (NLM NLMCXR_png + ecgen-radiology, or the Kaggle layout)
## VAR MIMIC_ROOT local MIMIC-CXR-JPG 2.x folder (credentialed; needed for DATASET=mimic)
## VAR BACKBONE biomedclip | clip | offline | tiny | open_clip:<model>:<tag> | local-dir:<folder>
## VAR W_BCE weight of the normal/abnormal BCE term (>= 0)
## VAR W_SUPCON weight of the supervised contrastive term (>= 0)
## VAR W_CLIP weight of the CLIP term (>= 0)
## VAR SEED seed of every random step
## VAR EPOCHS projector training epochs
## VAR LR projector learning rate
## VAR BATCH_SIZE projector batch size
## VAR DEVICE auto | cpu | cuda
## VAR N_BOOT bootstrap resamples for confidence intervals
## VAR CXR_WORKDIR put data/ build/ results/ figures/ under another folder
export OPENI_ROOT MIMIC_ROOT CXR_WORKDIR
OVERRIDES = w_bce=$(W_BCE) w_supcon=$(W_SUPCON) w_clip=$(W_CLIP) seed=$(SEED) epochs=$(EPOCHS) lr=$(LR) \
  batch_size=$(BATCH_SIZE) device=$(DEVICE) n_boot=$(N_BOOT) openi_root=$(OPENI_ROOT) mimic_root=$(MIMIC_ROOT)

.PHONY: paper demo smoke dag
paper: $(ENV_STAMP) ## Rebuild every figure and table of PROFILE (default paper: Open-I, BiomedCLIP, CLIP; needs network or local copies)
	@$(PY) -m cxrlib.preflight --profile $(PROFILE) --dataset "$(DATASET)" --backbones "$(BACKBONE)"
	@+$(MAKE) --no-print-directory dag PROFILE=$(PROFILE)

demo: ## The offline profile: real Open-I reports + synthetic radiographs, no network (= make paper PROFILE=offline)
	@+$(MAKE) --no-print-directory paper PROFILE=offline

smoke: ## The whole DAG on the smoke profile in about a minute (tiny synthetic data, random tiny backbone)
	@+$(MAKE) --no-print-directory paper PROFILE=smoke

ifneq ($(filter dag,$(MAKECMDGOALS)),)
$(shell mkdir -p $(or $(CXR_WORKDIR),.)/build/$(PROFILE))
VARS_MK := $(or $(CXR_WORKDIR),.)/build/$(PROFILE)/vars.mk
$(shell $(PY) -m cxrlib.dag makevars --profile $(PROFILE) --dataset "$(DATASET)" --backbone "$(BACKBONE)" > $(VARS_MK))
include $(VARS_MK)

CORE := cxrlib/paths.py cxrlib/io.py cxrlib/config.py cxrlib/embstore.py cxrlib/pairs.py
NB = notebooks/$(1).ipynb $(B)/params/$(1).yaml $(CORE)
NB_OVERRIDES := dataset=$(DS) backbone=$(TRAIN_KEY)
# every node's parameters, written at parse time (so `make -n` sees them) and only when they change:
# make then reruns exactly the nodes whose parameters changed (W_SUPCON reruns 02-05, not 01 or embed)
PARAMS_ERR := $(shell $(PY) -m cxrlib.config params-all --profile $(PROFILE) --out-dir $(B)/params \
  $(NB_OVERRIDES) $(OVERRIDES) 00_adapt_backbone:backbone=$(BK) 2>&1 >/dev/null)
ifneq ($(PARAMS_ERR),)
$(error $(PARAMS_ERR))
endif
EMB_DONE := $(foreach k,$(EMBED_KEYS),$(EMB_ROOT)/$(k)/done.json)
TRAIN_EMB := $(EMB_ROOT)/$(TRAIN_KEY)/done.json
STAMPS := $(B)/01_data_prep.ipynb $(B)/02_train.ipynb $(B)/03_retrieval_eval.ipynb \
          $(B)/04_embedding_viz.ipynb $(B)/05_loss_ablation.ipynb $(if $(ADAPT),$(B)/00_adapt_backbone.ipynb)

dag: $(RESULTS)/run_manifest.json
	@echo "done: $(PROFILE) -> $(RESULTS) and $(FIGURES)"

# papermill runs into <node>.run.ipynb; only a complete run is renamed to the stamp <node>.ipynb
define papermill
	@echo ">> $(PROFILE): $(1)"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node $(1) -- \
	  $(PY) -m papermill -k $(KERNEL) --no-progress-bar --cwd notebooks -f $(B)/params/$(1).yaml \
	  notebooks/$(1).ipynb $(B)/$(1).run.ipynb
	@mkdir -p $(B)/params/built && cp -p $(B)/params/$(1).yaml $(B)/params/built/
	@mv $(B)/$(1).run.ipynb $@
endef

$(B)/01_data_prep.ipynb: $(call NB,01_data_prep) $(wildcard cxrlib/datasets/*.py) cxrlib/images.py cxrlib/plots.py
	$(call papermill,01_data_prep)

MODEL_CFGS := $(wildcard configs/models/*/*)
$(B)/00_adapt_backbone.ipynb: $(call NB,00_adapt_backbone) $(B)/01_data_prep.ipynb cxrlib/adapt.py \
    cxrlib/backbones.py cxrlib/losses.py cxrlib/images.py cxrlib/plots.py $(MODEL_CFGS)
	$(call papermill,00_adapt_backbone)

# embedding sets: frozen backbones by name; <BK>-adapted from notebook 00's checkpoint
$(EMB_ROOT)/%/done.json: $(B)/01_data_prep.ipynb $(B)/params/embed.yaml cxrlib/embed.py cxrlib/backbones.py \
    cxrlib/images.py $(MODEL_CFGS) $(CORE)
	@echo ">> $(PROFILE): embed $*"
	@$(PY) -m cxrlib.manifest timed --log $(B)/timings.jsonl --node embed-$* -- \
	  $(PY) -m cxrlib.embed --table $(TABLE) --out-dir $(@D) \
	  $(if $(filter $(TRAIN_KEY),$*),$(if $(ADAPT),--backbone $(BK) --checkpoint $(ADAPTED_CKPT) --name $*,--backbone $*),--backbone $*) \
	  $$($(PY) -m cxrlib.config flags $(B)/params/embed.yaml)
	@mkdir -p $(B)/params/built && cp -p $(B)/params/embed.yaml $(B)/params/built/
ifneq ($(ADAPT),)
$(TRAIN_EMB): $(B)/00_adapt_backbone.ipynb
endif

$(B)/02_train.ipynb: $(call NB,02_train) $(TRAIN_EMB) cxrlib/projector.py cxrlib/losses.py cxrlib/train.py \
    cxrlib/pairs.py cxrlib/retrieval.py cxrlib/plots.py
	$(call papermill,02_train)

$(B)/03_retrieval_eval.ipynb: $(call NB,03_retrieval_eval) $(B)/02_train.ipynb $(EMB_DONE) cxrlib/retrieval.py \
    cxrlib/stats.py cxrlib/report.py cxrlib/projector.py cxrlib/pairs.py cxrlib/plots.py
	$(call papermill,03_retrieval_eval)

$(B)/04_embedding_viz.ipynb: $(call NB,04_embedding_viz) $(B)/02_train.ipynb $(TRAIN_EMB) cxrlib/embedding_viz.py \
    cxrlib/projector.py cxrlib/train.py cxrlib/pairs.py cxrlib/embstore.py cxrlib/plots.py
	$(call papermill,04_embedding_viz)

$(B)/05_loss_ablation.ipynb: $(call NB,05_loss_ablation) $(TRAIN_EMB) cxrlib/train.py cxrlib/losses.py \
    cxrlib/projector.py cxrlib/retrieval.py cxrlib/stats.py cxrlib/report.py cxrlib/pairs.py cxrlib/plots.py
	$(call papermill,05_loss_ablation)

$(RESULTS)/run_manifest.json: $(STAMPS) $(EMB_DONE) cxrlib/manifest.py
	@$(PY) -m cxrlib.manifest write --profile $(PROFILE) --inputs $(TABLE) $(EMB_DONE) \
	  --outputs $(RESULTS) $(FIGURES)
endif

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
