# Two commands on a fresh machine: `make demo` (set up + run the default sweep) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PIP := $(VENV)/bin/pip
# CPU machines take the local CPU torch wheel; GPU machines: TORCH_SPEC= (keep your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(TORCH_SPEC) -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/pathpatch demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
