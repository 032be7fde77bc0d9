"""Task pieces used by end-to-end tests (imported by worker processes as tests.tasks)."""

import os
import random

import numpy as np

from harness.example import classification_loss

_calls = {"n": 0}

# The example's loss times this: under fp16 the first backward overflows at GradScaler's initial
# scale (2**16), so the scale a run settles on differs from a fresh scaler's and a resume that lost
# the scaler's state skips a step that the uninterrupted run did not.
OVERFLOWING_SCALE = 64.0
DRAW_WEIGHT = 0.01  # how much each draw from Python's and numpy's RNG scales the loss


def loss_that_fails_on_rank1(model, batch):
    """Like the example's loss, but rank 1 raises on its 5th step: a worker crash."""
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        raise RuntimeError("deliberate failure in rank 1")
    return classification_loss(model, batch)


def loss_for_controls(model, batch):
    """The example's loss times OVERFLOWING_SCALE (under fp16 the GradScaler's state then matters), and
    times one draw from the main process's Python RNG and one from numpy's global RNG (the example
    draws from neither, so only this loss makes their restore visible)."""
    draws = random.random() + float(np.random.random())
    return classification_loss(model, batch) * OVERFLOWING_SCALE * (1.0 + DRAW_WEIGHT * draws)
