"""What a checkpoint holds: the registered Statefuls, progress, every rank's RNG, config, versions.

Everything restored follows the ``state_dict()/load_state_dict()`` protocol. The payload is plain
data (dicts, lists, tuples, numbers, strings, tensors) so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Optional, Protocol, runtime_checkable

import torch
import xxhash

from harness import __version__
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.keys import align_wrapper_prefixes, strip_wrapper_prefixes, unwrap_model

log = logging.getLogger("harness")

PAYLOAD_FORMAT = "harness.checkpoint"
PAYLOAD_VERSION = 1

# Top-level keys of a payload.
KEY_STATE = "state"  # {registered name: state_dict}
KEY_PROGRESS = "progress"
KEY_RNG = "rng"  # list indexed by rank
KEY_SAMPLERS = "samplers"  # list indexed by rank: a user's stateful sampler as its epoch began, or None
KEY_PER_RANK = "per_rank"  # list indexed by rank: {registered name: state_dict} of per-rank objects
KEY_CONFIG = "config"
KEY_META = "meta"
MODEL = "model"  # the registered name the built-in loop gives its model
STREAM = "data_stream"  # the registered name of an iterable dataset's loader (its stream position)

@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class Progress:
    """Where the run is: optimizer steps done, and the data position inside the current epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on
    world_size: int = 1  # world size that produced batch_in_epoch (to remap on a resize)
    data_unit: Optional[int] = None  # samples per batch over all ranks (None: files before it existed)
    stopped_inside: bool = False  # the stop was agreed inside this step (check_stop() said True there)
    data_size: Optional[int] = None  # samples in the dataset the epoch's order is drawn over (None: unknown)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.world_size, "data_unit": self.data_unit,
                "stopped_inside": self.stopped_inside, "data_size": self.data_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.world_size = int(state.get("world_size", self.world_size))
        unit = state.get("data_unit")
        self.data_unit = None if unit is None else int(unit)
        self.stopped_inside = bool(state.get("stopped_inside", False))
        size = state.get("data_size")
        self.data_size = None if size is None else int(size)


@dataclass(frozen=True)
class DataShape:
    """What THIS run's loader is, for a resume to compare with the checkpoint's ``Progress``:
    ``unit``, samples per loader batch over all ranks; ``size``, samples in its dataset; None where
    not known (no harness loader seen yet, an iterable dataset). ``own_sampler``: the order comes
    from the user's sampler or batch sampler, not the harness's keyed permutation."""

    unit: Optional[int] = None
    size: Optional[int] = None
    own_sampler: bool = False


ANOTHER_RUN_HINT = ("HINT: the folder holds a run of another model or script: give this run its own "
                    "name= (or checkpoint.dir), or take only the weights with init_from")


class Values:
    """A training loop's plain values that a resume must bring back (``best_acc1``, a learning rate
    the loop anneals by hand, ``best_val_loss``), as attributes::

        kept = harness.Values(best_acc1=0.0, lr=args.lr)
        session.register(kept=kept)          # restored here on a resume
        kept.best_acc1 = max(kept.best_acc1, acc1)

    Plain data only (numbers, inf and nan included, strings, lists, dicts, tensors). Like every
    registered object it is saved from rank 0: keep in it what is the same on every rank. A name
    missing from an older checkpoint keeps the value given here."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Values({', '.join(f'{name}={value!r}' for name, value in self.__dict__.items())})"


def duplicate_name(name: str) -> ValueError:
    """The error for a second object registered under ``name``."""
    return ValueError(f"a stateful named {name!r} is already registered; names must be unique"
                      + (" (session.prepare registers the model it prepares as 'model'; HINT: prepare another "
                         "one with its own name, e.g. session.prepare(net_d, name='net_d'))" if name == MODEL else ""))


class StateRegistry:
    """Named objects whose state is saved and restored. Models are saved unwrapped (no prefixes)."""

    def __init__(self) -> None:
        self._objects: dict[str, Stateful] = {}

    def register(self, name: str, obj: Any) -> None:
        if name in self._objects:
            raise duplicate_name(name)
        if obj is None:
            return
        if isinstance(obj, torch.nn.Module):
            obj = unwrap_model(obj)
        if not isinstance(obj, Stateful):
            raise TypeError(f"{name!r} ({type(obj).__name__}) has no state_dict()/load_state_dict()"
                            + (f". HINT: keep plain values in harness.Values({name}=...) and register that"
                               if isinstance(obj, (int, float, str, bool, list, dict, tuple)) else ""))
        self._objects[name] = obj

    @property
    def names(self) -> list[str]:
        return list(self._objects)

    def get(self, name: str) -> Optional[Stateful]:
        return self._objects.get(name)

    def state_dict(self) -> dict:
        return {name: obj.state_dict() for name, obj in self._objects.items()}

    def load_state_dict(self, states: dict, elsewhere: Collection[str] = (), adopted: Collection[str] = ()) -> None:
        """Restore every registered object; a name missing from the file is an error naming it.

        ``elsewhere``: registered names whose state is not in ``states`` (a sharded checkpoint keeps
        them in its shards): skipped here. ``adopted``: names of objects a strategy keeps outside the
        registry, restored by it: not reported as state that nothing registered."""
        missing = [name for name in self._objects if name not in states and name not in elsewhere]
        if missing:
            raise CheckpointError(f"the checkpoint has no state for {missing}; it holds {sorted(states)}. "
                                  f"{ANOTHER_RUN_HINT}")
        for name, obj in self._objects.items():
            if name in elsewhere:
                continue
            state = states[name]
            if isinstance(obj, torch.nn.Module):
                state = align_wrapper_prefixes(state, obj.state_dict().keys())
            try:
                obj.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:  # what load_state_dict()s raise on a mismatch
                raise CheckpointError(f"the checkpoint's {name!r} does not fit this run's "
                                      f"{type(obj).__name__}: {_first_problem(error)}. {ANOTHER_RUN_HINT}") from error
        extra = sorted(set(states) - set(self._objects) - set(adopted))
        if extra:
            log.warning("checkpoint holds state for %s, which nothing registered; ignored", extra)


def _first_problem(error: BaseException) -> str:
    """A load_state_dict error in one line: torch's header ("Error(s) in loading state_dict for X:")
    says nothing by itself, so its first problem (a missing key, a shape) comes with it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1 or not lines[0].endswith(":"):
        return lines[0]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1].rstrip('.')}{more}"


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    return (value for _, value in iter_leaves(obj) if isinstance(value, torch.Tensor))


def iter_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested structure: tensors, numbers, strings, None."""
    if isinstance(obj, dict):
        for key in obj:
            yield from iter_leaves(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from iter_leaves(item, f"{prefix}.{index}" if prefix else str(index))
    else:
        yield prefix, obj


def digest(obj: Any, values: bool = False) -> str:
    """XXH3-128 over (key, dtype, shape, bytes) of every tensor in sorted key order; with ``values``
    also over the plain leaves (numbers, strings, None: their repr, exact for floats; not other
    objects, whose repr may hold a memory address)."""
    hasher = xxhash.xxh3_128()
    for key, value in sorted(iter_leaves(obj), key=lambda item: item[0]):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif values and isinstance(value, (int, float, str, bytes, type(None))):
            hasher.update(f"{key}|{value!r}|".encode())
    return hasher.hexdigest()


def on_cpu(state: Any) -> Any:
    """``state`` with its tensors on the CPU (dicts, lists and tuples rebuilt), so that another
    process can unpickle it whatever devices it sees."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if type(state) in (list, tuple):  # not a namedtuple, whose constructor takes fields one by one
        return type(state)(on_cpu(value) for value in state)
    return state


def own_memory(registry: StateRegistry, payload: dict) -> int:
    """Give every tensor that a registered object kept from ``payload`` memory of its own; returns
    how many were copied.

    The payload's tensors view the checkpoint file's memory map, and ``load_state_dict`` may keep
    them as they are (a CPU optimizer's moments and step counters: ``Tensor.to`` of the same device
    and dtype returns the tensor itself). Such a state would keep the file mapped for the whole run,
    so deleting the checkpoint (retention) would free no disk space (and leave ``.nfs*`` files on NFS).
    Only tensors reachable through ``state_dict()`` are found: an object that keeps a loaded tensor
    it does not return there still holds the map.
    """
    mapped = {tensor.untyped_storage().data_ptr() for tensor in _tensors(payload) if tensor.device.type == "cpu"}
    mapped.discard(0)  # empty tensors own no memory
    copied = 0
    with torch.no_grad():
        for tensor in _tensors(registry.state_dict()):
            if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in mapped:
                tensor.set_(tensor.clone())
                copied += 1
    return copied


def capture_rng() -> dict:
    """This process's RNG states as plain data (numpy's as a tensor: weights_only refuses ndarrays)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": None, "cuda": None}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.cpu().numpy().astype("uint32"), pos, has_gauss, gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples; serialization may hand back lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % (2**32))


def build_payload(states: dict, progress: Progress, rng_per_rank: list, config: dict,
                  samplers_per_rank: Optional[list] = None, per_rank_states: Optional[list] = None) -> dict:
    return {
        "format": PAYLOAD_FORMAT,
        "format_version": PAYLOAD_VERSION,
        KEY_STATE: states,
        KEY_PROGRESS: progress.state_dict(),
        KEY_RNG: rng_per_rank,
        KEY_SAMPLERS: samplers_per_rank or [None] * len(rng_per_rank),
        KEY_PER_RANK: per_rank_states or [{}] * len(rng_per_rank),
        KEY_CONFIG: config,
        KEY_META: versions() | {"world_size": len(rng_per_rank)},
    }


def versions() -> dict:
    return {"harness_version": __version__, "torch_version": str(torch.__version__)}


def check_payload(payload: Any, source: str) -> dict:
    """Raise a clear error unless ``payload`` is a harness checkpoint of a version we can read."""
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"{source} is not a harness checkpoint (no format marker); "
                         "for plain weights use checkpoint.init_from")
    if payload.get("format_version") != PAYLOAD_VERSION:
        raise ValueError(f"{source} has checkpoint format v{payload.get('format_version')}, "
                         f"this harness {__version__} reads v{PAYLOAD_VERSION}")
    return payload


def extract_model_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Model weights from any common file layout, wrapper prefixes removed.

    Understands harness checkpoints, plain state_dicts, ``{"model": ...}`` (detectron2/fvcore),
    ``{"state_dict": ...}`` (Lightning), ``{"model_state_dict": ...}`` and full pickled modules.
    """
    if isinstance(obj, torch.nn.Module):
        return strip_wrapper_prefixes(unwrap_model(obj).state_dict())
    if isinstance(obj, dict) and obj.get("format") == PAYLOAD_FORMAT:
        if MODEL not in obj[KEY_STATE]:
            raise ValueError(f"{source} holds no object named {MODEL!r} (a run whose models were prepared "
                             f"under other names); it holds {sorted(obj[KEY_STATE])}. HINT: name one, e.g. "
                             f"--state {sorted(obj[KEY_STATE])[0]} for the ckpt tools")
        obj = obj[KEY_STATE][MODEL]
    elif isinstance(obj, dict) and not _is_tensor_map(obj):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module)):
                return extract_model_state(obj[key], source)
    if isinstance(obj, dict) and _is_tensor_map(obj):
        return strip_wrapper_prefixes(obj)
    raise ValueError(f"{source} holds no model weights that harness recognises (found "
                     f"{type(obj).__name__}{' with keys ' + str(sorted(obj)[:8]) if isinstance(obj, dict) else ''})")


def _is_tensor_map(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
