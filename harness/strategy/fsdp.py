"""FSDP2: parameters, gradients and optimizer state sharded over every rank; checkpoints through
torch.distributed.checkpoint (DCP), each rank writing only its own shards.

The model is sharded with ``fully_shard`` per block (the classes named in ``trainer.fsdp_shard``,
else each element of the model's ``nn.ModuleList``s), then the root, on a 1-D device mesh over all
ranks. ``trainer.precision=bf16`` (or fp16) becomes ``MixedPrecisionPolicy(param_dtype=bf16 (fp16),
reduce_dtype=fp32)``; fp16's loss scaling is torch's plain ``GradScaler``: DTensor gradients make its
inf/nan check a max over every rank's shards (DTensor's ``found_inf_reduce_handler``), so all ranks
skip a step together. The state is taken and restored with ``get_state_dict``/``set_state_dict``
(full parameter names, no wrapper prefixes), so a checkpoint written by N ranks loads on M: DCP
reshards at load time. Any other registered object whose ``state_dict()`` holds DTensors (an EMA of
the sharded parameters: each rank averages its own shards) is saved in the shards too, under its
registered name, and resharded the same way.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from harness.checkpoint.layout import checking_rank
from harness.checkpoint.payload import duplicate_name
from harness.config import ConfigError
from harness.env import DistEnv
from harness.strategy import dcp_state
from harness.strategy.dcp_state import OPTIMIZER_KEY  # noqa: F401 (tools and tests read it here)
PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision -> FSDP2 param_dtype


class FSDPStrategy:
    """Sharded training (see harness.strategy for the contract)."""

    name = "fsdp"
    sharded = True

    def __init__(self, env: DistEnv, shard_classes: list[str], precision: str):
        self.env = env
        self.shard_classes = shard_classes
        self.param_dtype = PARAM_DTYPES.get(precision)
        self.mixed_precision = self.param_dtype is not None
        self.model: Optional[nn.Module] = None
        self.model_name: Optional[str] = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.others: dict[str, Any] = {}  # other statefuls with sharded state (an EMA's shadow)

    # ----- training -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` each block (innermost first), then the root; returns the same module,
        now an FSDPModule. A model already sharded by its script (an FSDPModule: ``fully_shard`` with
        its own mesh, resharding or offload options) is returned as it is. Raises ConfigError when
        ``trainer.fsdp_shard`` names no class of the model."""
        if isinstance(model, FSDPModule):
            return model
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32) \
            if self.mixed_precision else MixedPrecisionPolicy()
        for block in shard_units(model, self.shard_classes):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        if enabled or not isinstance(model, FSDPModule):
            return contextlib.nullcontext()
        return _no_reduce_scatter(model)

    # ----- state ----------------------------------------------------------------------------------
    def takes(self, obj: Any) -> bool:
        """The sharded model, every optimizer, and any object whose ``state_dict()`` holds DTensors
        (taken when registered: an EMA built from the sharded model): their state is sharded, so it
        goes to DCP."""
        if isinstance(obj, (FSDPModule, torch.optim.Optimizer)):
            return True
        return callable(getattr(obj, "state_dict", None)) and dcp_state.holds_dtensor(obj.state_dict())

    def adopt(self, name: str, obj: Any) -> None:
        if name in self.optimizers or name in self.others or name == self.model_name:
            raise duplicate_name(name)
        if isinstance(obj, torch.optim.Optimizer):
            self.optimizers[name] = obj
        elif not isinstance(obj, FSDPModule):
            self.others[name] = obj
        elif self.model is not None:
            raise ValueError(f"trainer.strategy=fsdp takes one model per session; {self.model_name!r} is "
                             f"prepared already, so {name!r} cannot be")
        else:
            self.model, self.model_name = obj, name

    @property
    def adopted_names(self) -> list[str]:
        return ([self.model_name] if self.model is not None else []) + list(self.optimizers) + list(self.others)

    def adopted(self, name: str) -> Any:
        return self.model if name == self.model_name else self.optimizers.get(name, self.others.get(name))

    def _prepared_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("trainer.strategy=fsdp saves the prepared model: call session.prepare(model) first")
        return self.model

    def save(self, folder: str) -> list[str]:
        """Every rank writes its shards to ``folder`` (a collective; DCP fsyncs each file and writes
        its metadata last through a temporary name); returns the files this rank hashes."""
        state = dcp_state.template(self._prepared_model(), self.model_name, list(self.optimizers.values()),
                                   self.others)
        files = dcp_state.save(state, folder)
        # DCP names each rank's data files "__<rank>_<n>.distcp": the rank that wrote a file hashes it
        # (its pages are still cached there), and verifies it at resume; rank 0 takes the rest.
        return sorted(name for name in files if checking_rank(name, self.env.world_size) == self.env.rank)

    def load(self, folder: str, registered: dict[str, Any]) -> None:
        """Restore the model, optimizers and other sharded state from ``folder`` (a collective; any
        world size). Every other registered object is in the payload, so ``registered`` must be empty."""
        if registered:
            raise ValueError(f"trainer.strategy=fsdp keeps only the state it adopted in shards, not {sorted(registered)}")
        dcp_state.load(folder, self._prepared_model(), self.model_name, list(self.optimizers.values()), self.others)

    def load_full(self, states: dict[str, dict]) -> None:
        """Restore the model, optimizers and other sharded state from a ddp payload's full state dicts, keyed by
        registered name; each rank keeps its slice. Raises KeyError naming what the payload lacks."""
        missing = [name for name in self.adopted_names if name not in states]
        if missing:
            raise KeyError(f"checkpoint has no state for {missing}; it holds {sorted(states)}")
        dcp_state.load_full(self._prepared_model(), states[self.model_name],
                            {optimizer: states[name] for name, optimizer in self.optimizers.items()})
        for name, obj in self.others.items():  # e.g. an EMA: each rank keeps its shards of the full shadow
            obj.load_state_dict(dcp_state.localize(states[name], obj.state_dict()))

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """init_from: full tensors for some of the model's keys; each rank keeps its slice."""
        set_model_state_dict(model, weights, options=dcp_state.FULL_PARTIAL)


@contextlib.contextmanager
def _no_reduce_scatter(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shard_units(model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The blocks that get their own ``fully_shard``, innermost first (FSDP2 requires children
    before their parents): modules whose class is named in ``class_names``, else each element of
    every ``nn.ModuleList``. Raises ValueError for a class name that matches nothing."""
    modules = [module for module in model.modules() if module is not model]
    if class_names:
        units = [module for module in modules if type(module).__name__ in class_names]
        unknown = sorted(set(class_names) - {type(module).__name__ for module in units})
        if unknown:
            present = sorted({type(module).__name__ for module in modules})
            raise ConfigError(f"trainer.fsdp_shard={class_names}: the model has no module of class "
                              f"{unknown}; its classes are {present}")
    else:
        units = [child for module in modules if isinstance(module, nn.ModuleList) for child in module]
    return _innermost_first(model, units)


def _innermost_first(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    depth = {id(module): name.count(".") for name, module in model.named_modules()}
    return sorted(units, key=lambda module: -depth[id(module)])


def read_full_state(folder: str) -> dict:
    """Every entry of a DCP checkpoint folder, unsharded, read by this one process (no process
    group needed): ``{model name: {fqn: tensor}, "optimizer": {"state": ..., "param_groups": ...}}``.
    Holds the whole state in memory: for tools and tests on models that fit one host."""
    # Public DCP offers no "load everything" without a template; this is what its own
    # format_utils use (torch 2.13: torch.distributed.checkpoint.state_dict_loader).
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # one process without a process group is what we mean here
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        return _load_state_dict_from_keys(checkpoint_id=folder)
