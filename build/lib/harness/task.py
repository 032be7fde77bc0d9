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


def build_model(session: Session, task: TaskConfig) -> torch.nn.Module:
    """Instantiate the model; with ``task.meta_init`` and a checkpoint to resume from, without the
    random initialisation that the checkpoint overwrites anyway (seconds for large models).

    Non-persistent buffers are not in checkpoints: they would stay uninitialised, hence opt-in.
    """
    if task.meta_init and session.resume_point() is not None:
        with torch.device("meta"):
            model = instantiate(task.model)
        return model.to_empty(device=session.device)
    return instantiate(task.model)


def run_task(session: Session, task: TaskConfig) -> None:
    """Build model, optimizer, scheduler and data from ``task``, then train until done or stopped."""
    model = session.prepare(build_model(session, task))
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
