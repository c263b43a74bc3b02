# Two commands set everything up on a fresh machine: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# No download of weights or data at run time: tests and the demo build their own models.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint test demo bench clean

install: $(STAMP)

# Idempotent: re-runs only when the pins change. torch is installed first, pinned, so pip takes the CPU wheel
# on this machine's disk instead of resolving a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# ruff (lint and format) and mypy, configured in pyproject.toml: zero findings on src/.
lint: install
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy

# pytest exits 5 when it collects nothing: that fails the target like any other error.
test: install
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; fi; exit $$rc

# The paper's experiment on a ~1M-parameter model built offline (TRL's trainers, CPU): report in runs/demo/report.md.
# Re-running reuses finished stages; `rlsubnet demo --out runs/demo --fresh` starts over.
demo: install
	$(BIN)/rlsubnet demo --out runs/demo

bench: install
	$(BIN)/python benchmarks/compare_bench.py
	$(BIN)/python benchmarks/patch_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
