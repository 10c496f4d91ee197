# One command each: `make pretrain` (set up + train on the built-in corpus), `make test` (every test, as CI
# runs them); `make test-fast` is the edit loop: the end-to-end tests (marked slow) left out.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup pretrain test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

pretrain: setup
	$(BIN)/gptflow pretrain

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .gptflow
