"""Everything behind the notebooks, `model.py` and the commands: data, decoding, training,
evaluation, the demo. `model.py` (the models) stays at the top level for researchers to copy."""
