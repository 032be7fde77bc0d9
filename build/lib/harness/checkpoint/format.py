"""The serialization of a checkpoint payload: the only place that calls torch.save / torch.load.

A payload is plain data (dicts, lists, tuples, numbers, strings, tensors), written with
``torch.save`` as one file per checkpoint and read with ``weights_only=True`` unless the user opted
out (``checkpoint.unsafe_load=true`` / ``--unsafe``): a file that needs arbitrary unpickling is
refused and its code never runs.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch

UNSAFE_HINT = (
    "HINT: the file needs full unpickling, which can run arbitrary code from the file. Load it only "
    "if you trust its origin, with checkpoint.unsafe_load=true (or --unsafe for harness.ckpt).")


def write_payload(payload: dict, handle: IO[bytes]) -> None:
    """Serialize ``payload`` into an open binary file object (the storage makes it durable)."""
    torch.save(payload, handle)


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
