"""The losses of an epoch's steps: kept on the device, read at the logging cadence, and checked
there for non-finite values by every process together."""

import math
import time

import torch
from tqdm.auto import tqdm

from captioning import distributed

FORECAST_STEPS = 20  # steps timed before a first epoch's length is forecast


def duration_text(seconds):
    """Seconds in words: '45 s', '12 min', '3.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class LossLog:
    """Collects step losses (device tensors) and reads them every `every` steps and at `close`.

    Reading makes the host wait for the device, so it happens only at that cadence. Every
    process reads at the same steps (the loaders give each the same number of batches), and a
    non-finite loss on any of them stops all of them with the same message.
    """

    def __init__(self, every, bar, desc, advice, show_perplexity=True, forecast=None):
        """`forecast`: the epoch's number of steps, to print (rank 0) at the first read after
        FORECAST_STEPS steps how long the epoch will take, from the time they took."""
        self.every, self.bar, self.desc, self.advice = every, bar, desc, advice
        self.show_perplexity = show_perplexity
        self.values, self.pending = [], []
        self.forecast, self.started = forecast, time.perf_counter()

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
        if self.forecast and len(self.values) >= FORECAST_STEPS:
            self.announce(len(self.values), time.perf_counter() - self.started)

    def announce(self, steps, seconds):
        """Print (rank 0) how long the epoch takes at the speed of its first `steps`, once; read
        after the device caught up, the time is the device's too."""
        if self.forecast and distributed.rank() == 0 and steps < self.forecast:
            whole = seconds / steps * self.forecast
            tqdm.write(
                f"{self.desc}: {steps} of {self.forecast} steps in {seconds:.1f} s; "
                f"the epoch takes about {duration_text(whole)} on this machine"
            )
        self.forecast = None

    def close(self):
        """Read what is left; returns every step's loss as Python floats."""
        self.read()
        return self.values
