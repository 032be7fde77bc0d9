"""DistributedDataParallel: every rank holds the whole model and optimizer; rank 0's payload holds
all of it, so this strategy writes no files of its own."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from harness.env import DistEnv


class DDPStrategy:
    """Replicated training (see harness.strategy for the contract)."""

    name = "ddp"
    sharded = False
    mixed_precision = False

    def __init__(self, env: DistEnv):
        self.env = env

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP when there are several ranks; the model as it is on one."""
        if self.env.world_size == 1:
            return model
        device_ids = [self.env.device.index] if self.env.uses_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def gradient_sync(self, model: torch.nn.Module, enabled: bool) -> ContextManager:
        if enabled or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def takes(self, obj: Any) -> bool:
        return False  # everything goes into rank 0's payload

    def adopt(self, name: str, obj: Any) -> None:
        raise TypeError("the ddp strategy keeps no state of its own")

    def save(self, folder: str) -> list[str]:
        raise TypeError("the ddp strategy writes no files of its own")

    def load(self, folder: str) -> None:
        raise TypeError("the ddp strategy reads no files of its own")
