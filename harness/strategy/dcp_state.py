"""The model's and its optimizers' state in torch.distributed.checkpoint (DCP) form, for any strategy.

A sharded checkpoint's ``shards/`` folder holds ``{model name: {fqn: tensor}, "optimizer": {"state":
{fqn: slots}, "param_groups": [...]}}`` (several optimizers merged by parameter name) and, under its
registered name, the ``state_dict()`` of every other object whose state is sharded (an EMA's shadow
of the sharded parameters: each rank holds the average of its own shards). The same
functions read it into a sharded model (FSDP2: each rank gets its shards, resharded to this world
size) or into a replicated one (ddp: each rank gets full tensors), because the template they load
into is taken from the live model with ``get_model_state_dict``/``get_optimizer_state_dict``.

``model_shapes`` and ``load_model_keys`` serve ``checkpoint.init_from`` from a sharded checkpoint: the
keys are matched on the metadata's shapes, then only the matched tensors are read, each rank its own
slices.

``load_full`` goes the other way round: the full state dicts of a ddp payload (the optimizer's
keyed by parameter position, as ``Optimizer.state_dict`` keys them) into any model, sharded or not.
Every copy is exact: converting never changes a value.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

OPTIMIZER_KEY = "optimizer"  # the DCP key of the optimizers' state (several are merged by FQN)
METADATA_FILE = ".metadata"  # DCP's metadata file, written last by its coordinator (rank 0)
FULL = StateDictOptions(full_state_dict=True)  # full tensors given to every rank, each keeps its shard
FULL_PARTIAL = StateDictOptions(full_state_dict=True, strict=False)  # init_from: some keys only


def template(model: nn.Module, model_name: str, optimizers: Sequence[torch.optim.Optimizer],
             others: Optional[Mapping[str, Any]] = None) -> dict:
    """{model name: model state, "optimizer": the optimizers' state, other name: its state_dict()},
    as this rank holds them (DTensor shards under FSDP2, full tensors otherwise). On a fresh
    optimizer torch initialises its state first (a step with zero gradients and lr 0), so the
    template is complete."""
    state = {model_name: get_model_state_dict(model)}
    if optimizers:
        state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, list(optimizers))
    return state | {name: obj.state_dict() for name, obj in (others or {}).items()}


def holds_dtensor(state: Any) -> bool:
    """Whether a state dict (nested dicts, lists) holds a DTensor: state that only DCP can save."""
    if isinstance(state, DTensor):
        return True
    if isinstance(state, Mapping):
        return any(holds_dtensor(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return any(holds_dtensor(value) for value in state)
    return False


def localize(full: Any, like: Any) -> Any:
    """``full`` (a state dict of full tensors, from a ddp payload) with each tensor that is a DTensor
    in ``like`` (the live object's state dict) cut to this rank's shard of it, locally (no
    communication: every rank holds the same full tensor). Everything else is returned as it is."""
    if isinstance(like, DTensor) and isinstance(full, torch.Tensor) and not isinstance(full, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    if isinstance(full, Mapping) and isinstance(like, Mapping):
        return {key: localize(value, like.get(key)) for key, value in full.items()}
    return full


def save(state: dict, folder: str) -> set[str]:
    """Every rank writes its part of ``state`` to ``folder`` (a collective; DCP fsyncs each file and
    writes its metadata last through a temporary name); returns the names of all files written."""
    metadata = dcp.save(state, storage_writer=FileSystemWriter(folder, sync_files=True))
    return {info.relative_path for info in metadata.storage_data.values()} | {METADATA_FILE}


def load(folder: str, model: nn.Module, model_name: str, optimizers: Sequence[torch.optim.Optimizer],
         others: Optional[Mapping[str, Any]] = None) -> None:
    """Restore ``model``, ``optimizers`` and ``others`` (by name) from the DCP checkpoint in
    ``folder``, whatever strategy and world size wrote it (a collective when a process group
    exists). Raises on every rank when the checkpoint lacks a key of one of them (DCP gathers the
    failures)."""
    state = template(model, model_name, optimizers, others)
    with warnings.catch_warnings():  # a one-rank ddp run has no process group: one process is meant
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        dcp.load(state, storage_reader=FileSystemReader(folder))
    set_model_state_dict(model, state[model_name])
    if optimizers:
        set_optimizer_state_dict(model, list(optimizers), state[OPTIMIZER_KEY])
    for name, obj in (others or {}).items():
        obj.load_state_dict(state[name])


def load_full(model: nn.Module, model_state: Mapping[str, torch.Tensor],
              optimizers: Mapping[torch.optim.Optimizer, dict]) -> None:
    """Restore ``model`` from a full state dict and each optimizer from its ``state_dict()`` as a ddp
    payload holds it (every rank passes the same full tensors; a sharded model keeps its slice).
    Raises KeyError/ValueError when the model's keys or an optimizer's parameter groups differ."""
    set_model_state_dict(model, dict(model_state), options=FULL)
    for optimizer, saved in optimizers.items():
        set_optimizer_state_dict(model, [optimizer], by_parameter_name(model, optimizer, saved), options=FULL)


def by_parameter_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``saved`` (an ``Optimizer.state_dict()``: state keyed by parameter position) keyed by
    parameter name instead, the form ``set_optimizer_state_dict`` takes. Positions are matched to
    ``optimizer``'s own parameter groups, as ``Optimizer.load_state_dict`` does, so the optimizer
    must be built over the same parameters in the same order as the one that was saved."""
    names = {id(param): name for name, param in model.named_parameters()}
    groups = optimizer.param_groups
    if len(groups) != len(saved["param_groups"]) or any(
            len(group["params"]) != len(old["params"]) for group, old in zip(groups, saved["param_groups"])):
        raise ValueError("the saved optimizer has other parameter groups than this run's (sizes "
                         f"{[len(g['params']) for g in saved['param_groups']]} vs {[len(g['params']) for g in groups]})")
    position_name: dict[Any, str] = {}
    for group, old in zip(groups, saved["param_groups"]):
        for param, position in zip(group["params"], old["params"]):
            position_name[position] = names[id(param)]
    return {"state": {position_name[position]: slots for position, slots in saved["state"].items()},
            "param_groups": [old | {"params": [position_name[p] for p in old["params"]]}
                             for old in saved["param_groups"]]}


def model_shapes(folder: str, model_name: str) -> dict[str, torch.Tensor]:
    """{key: a meta tensor of its full shape and dtype} for one model in a DCP checkpoint folder, from
    its ``.metadata`` alone (no tensor is read): what ``match_state`` needs to plan an init_from."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = model_name + "."
    metadata = FileSystemReader(folder).read_metadata()
    shapes = {key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype, device="meta")
              for key, entry in metadata.state_dict_metadata.items()
              if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    if not shapes:
        raise KeyError(f"{folder} holds no model named {model_name!r}")
    return shapes


def load_model_keys(folder: str, model_name: str, model: nn.Module, keys: Mapping[str, str]) -> None:
    """init_from a DCP checkpoint: the tensors of ``model`` that ``keys`` names ({key of the
    checkpoint's model: key of ``model``}) read in place, every rank together (a collective when a
    process group exists). A sharded model's rank reads only the stored pieces that overlap its own
    shards, so no rank ever holds the whole model; a replicated one reads full tensors."""
    state = model.state_dict()  # DTensor shards under FSDP2; tensors sharing the parameters' memory
    targets = {file_key: state[model_key] for file_key, model_key in keys.items()}
    with warnings.catch_warnings():  # a one-rank ddp run has no process group: one process is meant
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        dcp.load({model_name: targets}, storage_reader=FileSystemReader(folder))
    # What state_dict() returned may be copies (e.g. parameters offloaded): load them back.
    set_model_state_dict(model, {model_key: targets[file_key] for file_key, model_key in keys.items()},
                         options=StateDictOptions(strict=False))
