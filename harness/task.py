"""The built-in training loop for tasks described in config (Hydra ``_target_`` instantiation)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_method, instantiate

from harness.config import TaskConfig
from harness.session import Session


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def run_task(session: Session, task: TaskConfig) -> None:
    """Build model, optimizer, scheduler and data from ``task``, then train until done or stopped."""
    model = session.prepare(instantiate(task.model))
    optimizer = instantiate(task.optimizer)(model.parameters())
    scheduler = instantiate(task.scheduler)(optimizer) if task.scheduler else None
    session.register(optimizer=optimizer, scheduler=scheduler)
    loss_fn = get_method(task.loss)
    loader = session.loader(instantiate(task.data), batch_size=task.batch_size, shuffle=task.shuffle,
                            num_workers=task.num_workers)
    model.train()
    for batch in session.batches(loader):
        loss = loss_fn(model, move_to(batch, session.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        session.log(loss=loss.detach(), lr=optimizer.param_groups[0]["lr"])
