# confeti_jax: two commands a user needs. `make demo` trains and evaluates CONFETI's whole
# pipeline and a source-only baseline on the embedded toy benchmark (`make demo-quick`:
# source-only alone, a few minutes); `make test` lints and runs the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/toy_demo
CONFETI_WORKDIR ?= workdirs/toy_demo_confeti
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time (module fixtures stay in one process):
# the suite is mostly single-threaded XLA compilation, so this fills CI's 2 cores.
PYTEST_WORKERS ?= 2

PAPER_ROWS_ROOT ?= workdirs/paper_rows_tiny

.PHONY: demo demo-quick test lint venv clean paper-rows

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --method=confeti --workdir=$(CONFETI_WORKDIR)

demo-quick: $(VENV)/.installed
	$(PY) scripts/demo.py --workdir=$(WORKDIR)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check confeti_jax configs scripts tests

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Every paper row (configs/paper_rows.py) trained 3 steps per stage on the tiny toy: a
# check that each command runs, about half an hour on a 2-core CPU; not part of `test`.
paper-rows: $(VENV)/.installed
	$(PY) scripts/paper_tables.py --setting=toy --tiny --rows='*' --seeds=0 \
	    --root=$(PAPER_ROWS_ROOT) --skip_rows_needing_inputs

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache
