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

.PHONY: install lint test demo bench mutate clean

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

# Mutation testing with mutmut (config: [tool.mutmut] in pyproject.toml), not part of `make test`: mutate the
# patch codec, the changed-test (diff/changed.py and the counting of diff/stats.py), overlap and the masked
# optimizers, one module at a time, each mutant against the fast test files that reach it; then print the kill
# rate per module and the survivors (docs/development.md, "Testing"). Hours on 2 cores; `make mutate
# MUTATE=codec` runs one module. Results stay in mutants/; a run re-tests every mutant its patterns match.
MUTATE_codec    := "rlsubnet.patch.codec.*"
MUTATE_changed  := "rlsubnet.diff.changed.*" "rlsubnet.diff.stats.xǁDeltaAccumulatorǁ*"
MUTATE_overlap  := "rlsubnet.masks.overlap.*"
MUTATE_masking  := "rlsubnet.train.masking.*" "rlsubnet.train.sparse_rules.*"
MUTATE          ?= codec changed overlap masking
mutate: install
	$(foreach m,$(MUTATE),OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HYPOTHESIS_PROFILE=mutation \
	  nice -n 10 $(BIN)/mutmut run --max-children 1 $(MUTATE_$(m)) &&) true
	$(BIN)/python tools/mutation_summary.py $(foreach m,$(MUTATE),$(MUTATE_$(m)))

bench: install
	$(BIN)/python benchmarks/compare_bench.py
	$(BIN)/python benchmarks/patch_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis mutants
