# Two commands on a fresh machine: `make demo` (set up + run the default sweep) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PIP := $(VENV)/bin/pip
# CPU machines take the local CPU torch wheel; GPU machines: TORCH_SPEC= (keep your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

# editable_mode=strict links every package file into build/__editable__.*/, a folder put on
# sys.path, so the packages are regular ones there and a folder named pathpatch/ or pipeline/
# in the working directory (the clone's parent folder) cannot shadow them (the default mode's
# import hook comes after such a folder; the compat mode that did this is being removed).
# Edits show at once; a module added or removed changes its folder, which installs again.
# setuptools' box saying that build/__editable__.* must stay is silenced: this rule remakes it.
PACKAGE_DIRS := $(shell find pathpatch pipeline -type d -not -name __pycache__)
$(VENV)/.installed: pyproject.toml constraints.txt Makefile $(PACKAGE_DIRS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) install -q -c constraints.txt $(TORCH_SPEC) \
		-e '.[test]' --config-settings editable_mode=strict
	touch $@

demo: setup
	$(VENV)/bin/pathpatch demo

# every test: the slow ones too (a plain `pytest` runs the fast part only, pyproject.toml);
# -X faulthandler: a native crash, even one after pytest's summary, prints every thread's stack
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -X faulthandler -m pytest -q -m "slow or not slow" tests

lint: setup
	$(VENV)/bin/ruff check .
