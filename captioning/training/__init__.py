"""Training: the training step and its stages, self-critical training, the loss log."""
