# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both depend on `make venv`, which creates .venv and installs requirements.txt once (the project
# editable with its extras; again only when requirements.txt or pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo demo-attention demo-scst demo-attention-scst demo-transformer demo-transformer-scst test bench lint gpu-check notebooks docs
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

# The transformer decoder (captioning/transformer.py); its presets: docs/demo.md.
demo-transformer: venv
	$(PY) demo.py --decoder transformer

demo-transformer-scst: venv
	$(PY) demo.py --decoder transformer --scst

test: venv
	$(PY) -m pytest

# Re-run the four notebooks in place on the demo, in order (3_Inference reads the checkpoint
# 2_Training writes), so that the committed notebooks show a run's outputs; no progress bars.
NOTEBOOKS := 0_Dataset.ipynb 1_Preliminaries.ipynb 2_Training.ipynb 3_Inference.ipynb
notebooks: venv
	for notebook in $(NOTEBOOKS); do \
		CAPTIONING_PROGRESS=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.record_timing=False \
			$$notebook || exit 1; \
	done

bench: venv
	$(PY) -m bench

# On a machine with CUDA: the documented train.py, evaluate.py, caption.py and (with 2+ GPUs)
# torchrun commands shrunk to the COCO sample of $CAPTIONING_TEST_DATA (else the demo data), then the
# GPU benchmark and tests/test_cuda.py; one table, also in outputs/gpu-check/summary.md.
gpu-check: venv
	$(PY) -m captioning.gpu_check

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The TrainConfig field table in docs/training.md, written from captioning/config.py.
docs: venv
	$(PY) -c "from captioning.config import write_fields_doc; write_fields_doc('docs/training.md')"
