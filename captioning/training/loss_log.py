"""The losses of an epoch's steps: kept on the device, read at the logging cadence, and checked
there for non-finite values by every process together."""

import math

import torch

from captioning import distributed


class LossLog:
    """Collects step losses (device tensors) and reads them every `every` steps and at `close`.

    Reading makes the host wait for the device, so it happens only at that cadence. Every
    process reads at the same steps (the loaders give each the same number of batches), and a
    non-finite loss on any of them stops all of them with the same message.
    """

    def __init__(self, every, bar, desc, advice, show_perplexity=True):
        self.every, self.bar, self.desc, self.advice = every, bar, desc, advice
        self.show_perplexity = show_perplexity
        self.values, self.pending = [], []

    def add(self, loss):
        """Keep one step's loss (a 0-d tensor); read them all when the cadence comes round."""
        self.pending.append(loss.detach())
        if len(self.pending) == self.every:
            self.read()

    def read(self):
        """Move the pending losses to `values` (one wait for the device); raise on every process
        if any process's were not finite."""
        error = None
        if self.pending:
            values = torch.stack(self.pending).float().tolist()
            first = len(self.values)
            self.values.extend(values)
            self.pending.clear()
            bad = [first + k for k, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                error = FloatingPointError(
                    f"{self.desc}: loss became {self.values[bad[0]]} at step {bad[0]} of this "
                    f"epoch (non-finite at steps {bad[:10]}); {self.advice}. The last "
                    "checkpoint is intact."
                )
            elif self.show_perplexity:
                last = values[-1]
                self.bar.set_postfix(loss=f"{last:.3f}", ppl=f"{math.exp(min(last, 50)):.1f}")
        distributed.raise_together(error)

    def close(self):
        """Read what is left; returns every step's loss as Python floats."""
        self.read()
        return self.values
