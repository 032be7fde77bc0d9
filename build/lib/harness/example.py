"""The built-in example task: a small MLP classifier on synthetic data generated from a seed.

Dropout, shuffling and several epochs make exact resume a real test; no downloads are needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class SyntheticClassification(Dataset):
    """Gaussian inputs labelled by a fixed random linear teacher (learnable, deterministic)."""

    def __init__(self, num_samples: int = 2048, in_features: int = 32, num_classes: int = 8, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(num_samples, in_features, generator=generator)
        teacher = torch.randn(in_features, num_classes, generator=generator)
        self.labels = (self.inputs @ teacher).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index]


class MLP(nn.Module):
    def __init__(self, in_features: int = 32, hidden: int = 128, num_classes: int = 8, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """loss_fn(model, batch) for the example: cross-entropy of the logits."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)
