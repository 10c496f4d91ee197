# One command each: `make pretrain` (set up + train on the built-in corpus), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup pretrain test clean

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

clean:
	rm -rf $(VENV) .gptflow
