"""The built-in training loop for tasks described in config (Hydra ``_target_`` instantiation).

One optimizer step: ``trainer.accumulate`` micro-batches (gradients are reduced on the last only),
autocast in ``trainer.precision`` (fp16 with a saved GradScaler; with ``trainer.strategy=fsdp``,
bf16 and fp16 are FSDP2's MixedPrecisionPolicy instead of autocast, fp16 still with the GradScaler),
optional gradient clipping, the optimizer and scheduler steps, the EMA update (under fsdp each rank
averages its own shards); every ``trainer.eval_every`` steps an evaluation on ``task.eval_data``
logged as ``val_loss`` of that step, and with ``trainer.eval_ema`` one of the EMA's weights logged as
``val_loss_ema``. Everything stateful is registered, so a
resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import get_method, instantiate
from torch.utils.data import DataLoader, Dataset, Subset

from harness.checkpoint.keys import unwrap_model
from harness.config import TaskConfig, TrainerConfig
from harness.session import Session

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


class Precision:
    """Autocast and, for fp16, the GradScaler (a Stateful: its scale is saved and restored).

    ``autocast=False``: the strategy casts the parameters itself (FSDP2's MixedPrecisionPolicy), so
    only the loss scaling is left to do here. torch's plain GradScaler serves sharded gradients too:
    on DTensor gradients its inf/nan check is reduced over every rank's shards, so every rank skips
    the same steps and keeps the same scale."""

    def __init__(self, name: str, device: torch.device, autocast: bool = True):
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES.get(name) if autocast else None
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: list, clip: Optional[float]) -> None:
        """Clip (after unscaling) and step; under fp16 a step with inf/nan gradients is skipped."""
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()


class ModelEma:
    """An exponential moving average of a model's parameters and buffers (a Stateful).

    Under FSDP2 the model's state dict holds DTensors, so the shadow is sharded like the model: each
    rank averages its own shards, and the fsdp strategy saves it in the checkpoint's shards
    (resharded on another world size, full tensors for ddp)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {key: value.detach().clone() for key, value in unwrap_model(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in unwrap_model(model).state_dict().items():
            average = self.shadow[key]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - self.decay)
            else:  # integer buffers (e.g. BatchNorm's counter) are copied
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: keys {sorted(missing)[:8]} differ")
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
        self.decay = float(state["decay"])

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the EMA's weights inside the block (to evaluate them) and exactly its own
        again after it. Each rank swaps only what it holds (its shards under FSDP2)."""
        live = unwrap_model(model).state_dict()
        saved = {key: value.detach().clone() for key, value in live.items()}
        _drop_gathered_parameters(model)
        try:
            with torch.no_grad():
                for key, value in live.items():
                    value.copy_(self.shadow[key])
            yield
        finally:
            with torch.no_grad():
                for key, value in live.items():
                    value.copy_(saved[key])
            _drop_gathered_parameters(model)


def _drop_gathered_parameters(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's all-gathered parameters after a forward (it would need them again for
    the backward): after the sharded parameters are overwritten in place, the next forward must
    gather them again instead of computing with the stale copy."""
    if "torch.distributed.fsdp" not in sys.modules:  # no FSDP2 model can exist (ddp: nothing gathered)
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class Evaluator:
    """Mean loss over a map-style dataset, sharded over ranks and averaged across them.

    Each rank takes an equal share (the remainder of ``len % world`` is left out), so every rank
    runs the same number of batches and of stop agreements. Evaluation draws from its own RNG
    (forked and restored), so training's RNG stream is untouched.
    """

    def __init__(self, session: Session, dataset: Dataset, loss_fn: Callable, batch_size: int):
        world, rank = session.env.world_size, session.env.rank
        per_rank = len(dataset) // world
        if per_rank == 0:
            raise ValueError(f"task.eval_data has {len(dataset)} samples, fewer than the {world} ranks")
        self.session = session
        self.loss_fn = loss_fn
        self.loader = DataLoader(Subset(dataset, range(rank * per_rank, (rank + 1) * per_rank)),
                                 batch_size=batch_size, shuffle=False)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, precision: Precision) -> Optional[float]:
        """The mean loss, or None when a stop was agreed during it (the step ends, saves, stops)."""
        device = self.session.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, samples
        python_state, numpy_state = random.getstate(), np.random.get_state()
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for batch in self.loader:
                    if self.session.check_stop():
                        return None
                    batch = move_to(batch, device)
                    with precision.autocast():
                        loss = self.loss_fn(model, batch)
                    count = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
                    totals += torch.stack([loss.double() * count, torch.tensor(float(count), device=device,
                                                                                dtype=torch.float64)])
        finally:
            model.train(was_training)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        if dist.is_initialized():
            dist.all_reduce(totals)
        return float(totals[0] / totals[1])


def run_task(session: Session, task: TaskConfig, trainer: TrainerConfig) -> None:
    """Build model, optimizer, scheduler and data from ``task``, then train until done or stopped."""
    model = session.prepare(build_model(session, task))
    optimizer = instantiate(task.optimizer)(model.parameters())
    scheduler = instantiate(task.scheduler)(optimizer) if task.scheduler else None
    # FSDP2 casts parameters itself (MixedPrecisionPolicy): autocast on top would cast twice.
    precision = Precision(trainer.precision, session.device, autocast=not session.strategy.mixed_precision)
    ema = ModelEma(model, trainer.ema_decay) if trainer.ema_decay else None
    session.register(optimizer=optimizer, scheduler=scheduler, scaler=precision.scaler, ema=ema)
    loss_fn = get_method(task.loss)
    loader = session.loader(instantiate(task.data), batch_size=task.batch_size, shuffle=task.shuffle,
                            num_workers=task.num_workers)
    evaluator = Evaluator(session, instantiate(task.eval_data), loss_fn,
                          task.eval_batch_size or task.batch_size) if trainer.eval_every else None
    parameters = list(model.parameters())
    model.train()
    for micro in session.batches(loader, accumulate=trainer.accumulate):
        micro = micro if trainer.accumulate > 1 else [micro]
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=session.device)
        for batch in session.micro_batches(model, micro):
            with precision.autocast():
                loss = loss_fn(model, move_to(batch, session.device)) / len(micro)
            precision.backward(loss)
            total += loss.detach().float()
        precision.step(optimizer, parameters, trainer.clip_grad_norm)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        session.log(loss=total, lr=optimizer.param_groups[0]["lr"])
        if evaluator is not None and (session.step + 1) % trainer.eval_every == 0:
            val_loss = evaluator.run(model, precision)
            if val_loss is not None:
                session.log(val_loss=val_loss)
            if val_loss is not None and ema is not None and trainer.eval_ema:
                with ema.applied(model):
                    ema_loss = evaluator.run(model, precision)
                if ema_loss is not None:
                    session.log(val_loss_ema=ema_loss)
