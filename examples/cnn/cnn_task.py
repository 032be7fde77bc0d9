"""Pieces of the ``cnn_aug`` task: a small CNN with BatchNorm, and synthetic images augmented at
random inside ``__getitem__`` with all three of torch, Python's ``random`` and numpy.

Nothing here is seeded by hand: the harness seeds the three global generators per sample from
(trainer.seed, epoch, position) around each ``dataset[i]``, in the main process or in any
DataLoader worker. A sample's augmentation is therefore the same after a resume, whatever
``task.num_workers`` is, so an interrupted run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


class AugmentedShapes(Dataset):
    """Images of ``num_classes`` class-specific patterns (fixed by ``seed``), augmented per access.

    Augmentation: a random crop out of a padded image (torch), a horizontal flip (``random``) and
    Gaussian pixel noise (numpy). Items are ``(image [C, H, W] float32, label)``.
    """

    def __init__(self, num_samples: int = 1024, num_classes: int = 4, size: int = 16, channels: int = 3,
                 pad: int = 2, noise: float = 1.0, augment: bool = True, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, channels, size, size, generator=generator)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        self.size, self.pad, self.noise, self.augment = size, pad, noise, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = self.labels[index]
        image = self.patterns[label]
        if not self.augment:
            return image.clone(), label
        padded = F.pad(image, (self.pad,) * 4, mode="reflect")
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        image = padded[:, top: top + self.size, left: left + self.size]
        if random.random() < 0.5:
            image = image.flip(-1)
        noise = np.random.normal(0.0, self.noise, size=tuple(image.shape)).astype(np.float32)
        return image + torch.from_numpy(noise), label


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU blocks, global pooling and a linear classifier."""

    def __init__(self, channels: int = 3, width: int = 16, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """loss_fn(model, batch): cross-entropy of the logits."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)
