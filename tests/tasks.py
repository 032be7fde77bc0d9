"""Task pieces used by end-to-end tests (imported by worker processes as tests.tasks)."""

import os

import torch
from torch import nn

from harness.example import classification_loss

_calls = {"n": 0}


def loss_that_fails_on_rank1(model, batch):
    """Like the example's loss, but rank 1 raises on its 5th step: a worker crash."""
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        raise RuntimeError("deliberate failure in rank 1")
    return classification_loss(model, batch)


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
