"""How the model is spread over the ranks: the strategy seam (``trainer.strategy: ddp | fsdp``).

A strategy is the one place that knows how parameters live on the ranks; the rest of the harness
(session, checkpoint manager, store) stays strategy-blind and calls only this contract:

- ``wrap(model) -> model``: the model, already on the rank's device, made ready for training on
  every rank (DDP: wrapped in DistributedDataParallel when there are several ranks; FSDP2:
  ``fully_shard`` per block, then the root, on a 1-D device mesh over all ranks). Called once, on
  every rank, in the same order, after the process group exists.
- ``gradient_sync(model, enabled)``: a context manager around one micro-batch's backward;
  ``enabled=False`` skips the gradient reduction (DDP ``no_sync``, FSDP2
  ``set_requires_gradient_sync(False)``) on all micro-batches but a step's last.
- ``mixed_precision``: True when the strategy casts parameters itself (FSDP2's
  MixedPrecisionPolicy for ``trainer.precision=bf16``), so the loop must not autocast on top.
- ``takes(obj)`` / ``adopt(name, obj)``: whether the strategy keeps the state of a registered object
  (the model, its optimizers) in files of its own instead of rank 0's payload, and taking it.
  ``adopted_names`` / ``adopted(name)``: what it took (empty / None for ddp).
- ``sharded``: True when the strategy writes such files. Then, for a checkpoint folder ``F``:
  ``save(F)`` is a collective on every rank that writes this rank's share of the state under ``F``
  and returns the paths (relative to ``F``) of the files THIS rank must hash, each file claimed by
  exactly one rank; the files are complete and fsynced when it returns on any rank. The manager
  then lists every file with its size and checksum in the manifest, which rank 0 writes last
  (harness.checkpoint.store).
- Restoring, whichever strategy wrote the checkpoint (the conversions ddp <-> fsdp are exact copies):
  ``load(F, registered)`` is a collective that reads the sharded files in ``F``, resharded to this
  world size, into the adopted objects and into ``registered`` (registered objects whose state the
  checkpoint keeps in ``F``: a ddp run's model and optimizers, filled with full tensors); failures
  raise on every rank (DCP gathers them). ``load_full(states)`` restores the adopted objects from a
  ddp payload's full state dicts (by registered name; every rank keeps its slice).
  ``load_weights(model, weights)`` loads ``checkpoint.init_from``'s full tensors for some keys.

File layout of a checkpoint folder by strategy:

- ddp: ``state.safetensors`` (everything, written by rank 0) and ``manifest.json``.
- fsdp: ``shards/`` (torch.distributed.checkpoint: ``__<rank>_<n>.distcp`` per rank and
  ``.metadata``; model and optimizer), ``state.safetensors`` (everything else: progress, every
  rank's RNG, scheduler, other registered objects) and ``manifest.json`` listing all of them.

A third strategy (tensor parallel, HSDP on a 2-D mesh) is a module here with these members and a
line in ``make_strategy``.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol, Sequence

import torch

from harness.config import TrainerConfig
from harness.env import DistEnv


class Strategy(Protocol):
    """See the module docstring for the contract."""

    name: str
    sharded: bool
    mixed_precision: bool

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def gradient_sync(self, model: torch.nn.Module, enabled: bool) -> ContextManager: ...
    adopted_names: Sequence[str]

    def takes(self, obj: Any) -> bool: ...
    def adopt(self, name: str, obj: Any) -> None: ...
    def adopted(self, name: str) -> Any: ...
    def save(self, folder: str) -> list[str]: ...
    def load(self, folder: str, registered: dict[str, Any]) -> None: ...
    def load_full(self, states: dict[str, dict]) -> None: ...
    def load_weights(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None: ...


def make_strategy(trainer: TrainerConfig, env: DistEnv) -> Strategy:
    """The strategy ``trainer.strategy`` names (validated by the config)."""
    if trainer.strategy == "fsdp":
        from harness.strategy.fsdp import FSDPStrategy  # imports torch.distributed.fsdp: only when used

        return FSDPStrategy(env, shard_classes=list(trainer.fsdp_shard), precision=trainer.precision)
    from harness.strategy.ddp import DDPStrategy

    return DDPStrategy(env)
