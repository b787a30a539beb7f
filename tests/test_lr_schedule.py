"""The learning rate per step (`make_scheduler`): a linear rise over warmup_steps to the configured
rate, then the cosine to 0 at the last step (or the constant rate)."""

import math

import pytest
import torch

from captioning.config import TrainConfig
from captioning.training.train import make_scheduler

LR = 1e-3


def rates(config, total_steps, steps):
    """The learning rate of each of the first `steps` steps, as training steps the schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = make_scheduler(config, optimizer, total_steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warm_up_rises_linearly_then_the_cosine_falls_to_zero():
    config = TrainConfig(lr=LR, warmup_steps=4, lr_schedule="cosine")
    seen = rates(config, total_steps=12, steps=16)
    # Warm-up: k + 1 quarters of the rate at step k, the full rate at its last step.
    assert seen[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    # The cosine over the 8 steps after it: full at its start, half midway, 0 at the end, 0 after.
    cosine = {
        4: LR,
        6: LR * (1 + math.cos(math.pi / 4)) / 2,
        8: LR / 2,
        10: LR * (1 + math.cos(3 * math.pi / 4)) / 2,
        12: 0,
    }
    assert {step: seen[step] for step in cosine} == pytest.approx(cosine, abs=1e-10)
    assert seen[13:] == pytest.approx([0.0] * 3, abs=1e-12)
    assert all(a >= b for a, b in zip(seen[4:], seen[5:]))  # never rises again


def test_constant_schedule_keeps_the_rate_after_warm_up():
    config = TrainConfig(lr=LR, warmup_steps=5, lr_schedule="constant")
    seen = rates(config, total_steps=10, steps=20)
    assert seen[:5] == pytest.approx([LR * k / 5 for k in range(1, 6)])
    assert seen[5:] == pytest.approx([LR] * 15)


def test_without_warm_up_the_cosine_starts_at_the_full_rate():
    config = TrainConfig(lr=LR, warmup_steps=0)
    seen = rates(config, total_steps=10, steps=11)
    assert seen[0] == pytest.approx(LR) and seen[5] == pytest.approx(LR / 2)
    assert seen[10] == pytest.approx(0.0, abs=1e-12)
