"""DistributedDataParallel: every rank holds the whole model and optimizer; rank 0's payload holds
all of it, so this strategy writes no files of its own. It reads a sharded checkpoint's files
(an fsdp run's ``shards/``: model, optimizers, EMA) into its full tensors, so an fsdp run can be
resumed with ddp."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from harness.checkpoint.flat import is_dtensor
from harness.env import DistEnv


class DDPStrategy:
    """Replicated training (see harness.strategy for the contract)."""

    name = "ddp"
    sharded = False
    mixed_precision = False

    def __init__(self, env: DistEnv):
        self.env = env

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP when there are several ranks; the model as it is on one. Raises ValueError for a model
        whose parameters are DTensors (sharded by ``fully_shard``): DDP would replicate its shards,
        and rank 0's checkpoint would hold its own shards only."""
        if any(is_dtensor(param) for param in model.parameters()):
            raise ValueError("the model's parameters are DTensors (sharded by fully_shard): trainer.strategy=ddp "
                             "keeps whole models, and would save rank 0's shards only. HINT: run with "
                             "trainer.strategy=fsdp")
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

    adopted_names: tuple[str, ...] = ()

    def adopted(self, name: str) -> Any:
        return None

    def save(self, folder: str) -> list[str]:
        raise TypeError("the ddp strategy writes no files of its own")

    def load(self, folder: str, registered: dict[str, Any]) -> None:
        """Fill the registered model, its optimizers and any other object whose state the sharded
        checkpoint in ``folder`` keeps (an EMA) with full tensors (a collective when a process group
        exists). Raises on every rank when the checkpoint lacks one of them."""
        models = {name: obj for name, obj in registered.items() if isinstance(obj, torch.nn.Module)}
        optimizers = [obj for obj in registered.values() if isinstance(obj, torch.optim.Optimizer)]
        others = {name: obj for name, obj in registered.items()
                  if name not in models and not isinstance(obj, torch.optim.Optimizer)}
        if len(models) != 1:
            raise ValueError(f"a sharded checkpoint keeps one model in its shards; {sorted(models) or 'none'} "
                             f"of {sorted(registered)} are models")
        from harness.strategy import dcp_state  # torch.distributed.checkpoint: only when used

        (name, model), = models.items()
        dcp_state.load(folder, model, name, optimizers, others)

    def load_full(self, states: dict[str, dict]) -> None:
        return None  # nothing adopted: the registry restores everything from the payload

    def load_weights(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(weights, strict=False)
