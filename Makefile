# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both depend on `make venv`, which creates .venv and installs requirements.txt once (the project
# editable with its extras; again only when requirements.txt or pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo demo-attention demo-scst demo-attention-scst test bench lint gpu-check
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: venv
	$(PY) demo.py

# The attention decoder (Show, Attend and Tell) on the same data, with its own preset.
demo-attention: venv
	$(PY) demo.py --decoder attention

# Cross-entropy, then self-critical training (SCST, CIDEr-D reward); both checkpoints scored.
demo-scst: venv
	$(PY) demo.py --scst

demo-attention-scst: venv
	$(PY) demo.py --decoder attention --scst

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m bench

# On a machine with CUDA: the README's train.py, evaluate.py, caption.py and (with 2+ GPUs)
# torchrun commands shrunk to the COCO sample in ../shared/data (else the demo data), then the
# GPU benchmark and tests/test_cuda.py; one table, also in outputs/gpu-check/summary.md.
gpu-check: venv
	$(PY) -m captioning.gpu_check

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
