"""Export a sharded checkpoint's model (trainer.strategy=fsdp) to one file of full weights, streamed:
one full tensor at a time is read through DCP (from every shard that holds part of it), written into
the output and freed, so this process holds at most one full tensor (two when casting), never the
model.

- torch format: ``torch.save`` of the whole dict of tensors needs them all in memory, so the file's
  skeleton is written first with ``torch.serialization.skip_data`` (fake tensors: no data, the
  storage records left as room), then each tensor read by DCP is written into its record.
- safetensors: the header follows from DCP's metadata (keys, shapes, dtypes), then each tensor's
  bytes are appended in the header's order.

The output is written to a temporary name, fsynced and renamed (a crash leaves the previous file or
the new one). Returns the sha256 hex of the output, as ``harness.ckpt.export_weights`` does.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from harness.checkpoint import checksum
from harness.checkpoint.storage.local import fsync_dir
from harness.strategy.dcp_state import model_shapes

ZIP_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
# safetensors' names of the dtypes a model holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def model_tensors(folder: str, model_name: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{key: (full shape, dtype)} of the model ``model_name`` in a DCP folder, from its metadata."""
    return {key: (meta.shape, meta.dtype) for key, meta in model_shapes(folder, model_name).items()}


def weights_prefix(folder: str, name: str) -> Optional[str]:
    """The DCP name whose tensors are the weights of the registered object ``name`` in ``folder``:
    ``<name>.shadow`` for an EMA (its state is ``{"decay", "shadow"}``), else ``name`` itself; None
    when the shards hold nothing of that name. Raises ValueError for an object that holds more than
    tensors (an optimizer's state), which has no weights to export."""
    entries = FileSystemReader(folder).read_metadata().state_dict_metadata
    for prefix in (f"{name}.shadow", name):
        under = [entry for key, entry in entries.items() if key.startswith(prefix + ".")]
        if under and all(isinstance(entry, TensorStorageMetadata) for entry in under):
            return prefix
    if any(key.startswith(name + ".") for key in entries):
        raise ValueError(f"{name!r} in the shards is not a state dict of tensors (an optimizer's state?)")
    return None


def _read_into(folder: str, model_name: str, key: str, target: torch.Tensor) -> None:
    """Fill ``target`` (full shape, the saved dtype) with one tensor of the checkpoint."""
    with warnings.catch_warnings():  # one process without a process group is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        dcp.load({model_name: {key: target}}, storage_reader=FileSystemReader(folder), no_dist=True)


def _each_tensor(folder: str, model_name: str, tensors: dict, target: Optional[torch.dtype],
                 destination: Callable[[str], Optional[torch.Tensor]], write: Callable[[str, torch.Tensor], None]) -> None:
    """For each key: read it straight into ``destination(key)`` when one is given and the dtype stays,
    else into a temporary tensor that is cast if asked and handed to ``write``, then freed."""
    for key, (shape, dtype) in tensors.items():
        out_dtype = _exported_dtype(dtype, target)
        place = destination(key) if out_dtype == dtype else None
        if place is not None:
            _read_into(folder, model_name, key, place)
            continue
        full = torch.empty(shape, dtype=dtype)
        _read_into(folder, model_name, key, full)
        write(key, full.to(out_dtype))
        del full


def _exported_dtype(dtype: torch.dtype, target: Optional[torch.dtype]) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def write_torch(folder: str, model_name: str, path: str, target: Optional[torch.dtype]) -> None:
    """The torch-format file at ``path`` (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors = model_tensors(folder, model_name)
    with FakeTensorMode():
        skeleton = {key: torch.empty(shape, dtype=_exported_dtype(dtype, target)) for key, (shape, dtype) in tensors.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, path)
    del skeleton
    offsets = _storage_offsets(path, len(tensors))
    with open(path, "rb+") as handle:
        places = dict(zip(tensors, offsets))

        def put(key: str, tensor: torch.Tensor) -> None:
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            if os.pwrite(handle.fileno(), memoryview(data), places[key]) != data.nbytes:
                raise OSError(f"short write of {key} into {path}")

        _each_tensor(folder, model_name, tensors, target, lambda key: None, put)


def _storage_offsets(path: str, count: int) -> list[int]:
    """Where the bytes of storages ``data/0`` .. ``data/<count-1>`` start in a torch zip file. A
    dict of tensors with a storage each gets its storage keys in insertion order (torch.save numbers
    storages as it pickles them); each record is stored uncompressed after its local header."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        records = {info.filename.split("/", 1)[1]: info for info in archive.infolist() if "/" in info.filename}
        offsets = []
        for index in range(count):
            info = records[f"data/{index}"]
            raw.seek(info.header_offset)
            header = raw.read(ZIP_LOCAL_HEADER)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            offsets.append(info.header_offset + ZIP_LOCAL_HEADER + name_length + extra_length)
    return offsets


def write_safetensors(folder: str, model_name: str, path: str, target: Optional[torch.dtype]) -> None:
    """The safetensors file at ``path``: header from the metadata, then each tensor's bytes."""
    tensors = model_tensors(folder, model_name)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, dtype) in tensors.items():
        out_dtype = _exported_dtype(dtype, target)
        size = shape.numel() * out_dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)

        def append(key: str, tensor: torch.Tensor) -> None:
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")

        _each_tensor(folder, model_name, tensors, target, lambda key: None, append)


def export(folder: str, model_name: str, out: str, fmt: str, target: Optional[torch.dtype]) -> str:
    """Write the model in the DCP ``folder`` to ``out`` atomically; returns its sha256 hex."""
    temp = f"{out}.tmp-{os.getpid()}"
    try:
        (write_safetensors if fmt == "safetensors" else write_torch)(folder, model_name, temp, target)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        named = checksum.of_file(temp, "sha256")
        os.replace(temp, out)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    return named.split(":", 1)[1]
