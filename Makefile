# `make demo`, `make test` and `make test-unit` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the tested release. On this project's CPU machines pip finds the CPU wheel of it on
# local disk; elsewhere, for a CPU-only build, run e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo demo-lm demo-vlm demo-rl test test-unit lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

# `make test` runs everything (as CI does); `make test-unit` leaves out the multi-process and subprocess
# runs (marked slow) for a quick check.
test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m hrm_mega.entry.demo

demo-lm: $(STAMP)
	$(PY) -m hrm_mega.entry.lm_demo

# one thread per process: on this 2-core machine, shared with other jobs, more threads only contend
demo-vlm: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hrm_mega.entry.vlm_demo

demo-rl: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hrm_mega.entry.rl_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs data .pytest_cache
