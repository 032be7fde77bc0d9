"""The serialization of a checkpoint payload: which file format, and reading either back.

A payload is plain data (dicts, lists, tuples, numbers, strings, tensors), written as one file per
checkpoint in the flat format (:mod:`harness.checkpoint.flat`, ``state.safetensors``). A payload
holding other objects (a user's class in a state_dict) is written with ``torch.save`` instead
(``state.pt``, also the format of checkpoints before the flat one), read with ``weights_only=True``
unless the user opted out (``checkpoint.unsafe_load=true`` / ``--unsafe``): a file that needs
arbitrary unpickling is refused and its code never runs. This is the only place that calls
torch.save / torch.load.
"""

from __future__ import annotations

import io
import logging
import mmap
import pickle
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

import torch

from harness.checkpoint import flat
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import LEGACY_PAYLOAD_NAME, PAYLOAD_NAME

log = logging.getLogger("harness")

UNSAFE_HINT = (
    "HINT: the file needs full unpickling, which can run arbitrary code from the file. Load it only "
    "if you trust its origin, with checkpoint.unsafe_load=true (or --unsafe for harness.ckpt).")


def write_payload(payload: dict, handle: IO[bytes]) -> None:
    """Serialize ``payload`` with torch.save into an open binary file object."""
    torch.save(payload, handle)


@dataclass
class PayloadFile:
    """A payload ready to be written: its file name in the checkpoint folder, and how to fill it."""

    name: str
    write_to: Callable[[IO[bytes]], None]


_warned_not_flat: set[str] = set()


def encode(payload: dict) -> PayloadFile:
    """The flat file when the payload is plain data, else torch.save's (warned about once)."""
    try:
        return PayloadFile(PAYLOAD_NAME, flat.plan(payload).write_to)
    except flat.ShardedTensor as reason:  # torch.save would keep rank 0's shard: a file no resume can use
        raise CheckpointError(f"checkpoint state {reason}: a tensor sharded across ranks, of which rank 0 "
                              "holds only its own part. HINT: run with trainer.strategy=fsdp, which saves "
                              "every rank's shards") from None
    except flat.NotFlat as reason:
        return legacy(payload, reason)


def legacy(payload: dict, reason: flat.NotFlat) -> PayloadFile:
    if str(reason) not in _warned_not_flat:
        _warned_not_flat.add(str(reason))
        log.warning("checkpoint state %s, which the flat format does not store: writing %s with "
                    "torch.save instead (slower; loading it needs checkpoint.unsafe_load=true unless "
                    "torch's weights_only loader accepts it)", reason, LEGACY_PAYLOAD_NAME)
    return PayloadFile(LEGACY_PAYLOAD_NAME, lambda handle: write_payload(payload, handle))


def read_payload(path: str, unsafe: bool = False, mapped: Optional[mmap.mmap] = None) -> Any:
    """A checkpoint payload file of either format, on the CPU (flat files memory-mapped; ``mapped``:
    the map of ``path`` that verifying it left, see ``flat.read``)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if flat.is_flat(head):
        return flat.read(path, mapped)
    return torch_load(path, map_location="cpu", unsafe=unsafe, mmap=True)


def torch_load(source: str | io.BytesIO, map_location: Any = "cpu", unsafe: bool = False,
               mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller explicitly opted out.

    A file that needs arbitrary unpickling is refused with a message naming the opt-in; its code is
    never run.
    """
    name = source if isinstance(source, str) else "<buffer>"
    try:
        return torch.load(source, map_location=map_location, weights_only=not unsafe,
                          mmap=mmap and isinstance(source, str))
    except pickle.UnpicklingError as error:
        if unsafe:
            raise
        lines = [line.strip() for line in str(error).splitlines() if "Unpickler error" in line]
        detail = lines[0] if lines else type(error).__name__
        raise UnsafeCheckpoint(f"refusing to load {name} with weights_only=True ({detail})\n"
                               f"{UNSAFE_HINT}") from None


class UnsafeCheckpoint(RuntimeError):
    """The file needs arbitrary unpickling and the user did not opt in."""
