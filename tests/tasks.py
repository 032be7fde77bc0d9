"""Task pieces used by end-to-end tests (imported by worker processes as tests.tasks)."""

import os
import random

import numpy as np

import torch
from torch import nn

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


class BlockMLP(nn.Module):
    """The example's classifier built from residual blocks in an nn.ModuleList (the layout FSDP2
    shards block by block), with dropout, so exact resume needs every rank's RNG."""

    def __init__(self, in_features: int = 32, hidden: int = 128, num_classes: int = 8, dropout: float = 0.1,
                 depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)
