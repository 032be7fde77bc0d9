"""The flat checkpoint file: every tensor's bytes back to back, the rest of the payload as JSON.

The file is a valid safetensors file (https://github.com/huggingface/safetensors), so any
safetensors tool reads the tensors (named by their place in the payload, e.g.
``state/model/fc.weight``)::

    8 bytes  little-endian u64 N, the length of the header
    N bytes  JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
             padded with spaces so that the data starts at a multiple of 4096
    data     the tensors' bytes, back to back, larger elements first (each tensor aligned to its
             element size, so it is viewed in place on load)

``__metadata__`` holds ``format`` / ``format_version`` and ``skeleton``: the payload with each tensor
replaced by ``{"@t": name}``, as tagged JSON (tuples, dicts with any plain keys, OrderedDict and its
``_metadata`` survive). Only plain data is accepted (``NotFlat`` otherwise): nothing in the file is
ever executed on load, unlike a pickle.

Why not torch.save: its pickler copies every tensor again on the way to the file and the checksum
pass reads it once more; here the tensor bytes go from the snapshot buffer to the disk in place
(the data section is page-aligned for O_DIRECT), and loading maps the data section without a copy.
"""

from __future__ import annotations

import base64
import collections
import json
import math
import mmap
from dataclasses import dataclass
from typing import IO, Any, Optional

import torch

FORMAT = "harness.flat"
VERSION = "1"
ALIGN = 4096  # the data section starts at a multiple of this (O_DIRECT writes it from its buffer)
MAGIC_OFFSET = 8  # a safetensors header's JSON starts after its 8-byte length

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class NotFlat(TypeError):
    """The payload holds something the flat format does not store (the caller uses torch.save)."""


def is_dtensor(tensor: object) -> bool:
    """A DTensor (torch.distributed.tensor): each rank holds only its shard. Duck-typed, so the
    check does not import torch.distributed."""
    return hasattr(tensor, "placements")


class ShardedTensor(NotFlat):
    """The payload holds a DTensor: each rank has only its shard, so no one file of rank 0 stores it."""


@dataclass
class FlatPlan:
    """Where each tensor of one payload goes in the file. ``sources[i]`` fills ``spans[i]``."""

    header: bytes  # the 8-byte length and the padded JSON: exactly the bytes before the data
    sources: list[torch.Tensor]  # in file order
    spans: list[tuple[int, int]]  # [begin, end) of each source inside the data section
    data_nbytes: int

    def write_to(self, handle: IO[bytes]) -> None:
        """Write the file from the source tensors themselves (synchronous saves)."""
        handle.write(self.header)
        for tensor in self.sources:
            handle.write(tensor_bytes(tensor))


def plan(payload: Any) -> FlatPlan:
    """Lay out ``payload`` (raises NotFlat, naming the place, for anything but plain data)."""
    found: dict[str, torch.Tensor] = {}
    skeleton = _encode(payload, "", found)
    names = sorted(found, key=lambda name: -found[name].element_size())  # stable: keeps payload order
    entries, spans, offset = {}, [], 0
    for name in names:
        tensor = found[name]
        end = offset + tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        spans.append((offset, end))
        offset = end
    entries["__metadata__"] = {"format": FORMAT, "format_version": VERSION,
                               "skeleton": json.dumps(skeleton, separators=(",", ":"))}
    text = json.dumps(entries, separators=(",", ":")).encode()
    padded = -(-(MAGIC_OFFSET + len(text)) // ALIGN) * ALIGN - MAGIC_OFFSET
    header = padded.to_bytes(8, "little") + text + b" " * (padded - len(text))
    return FlatPlan(header=header, sources=[found[name] for name in names], spans=spans, data_nbytes=offset)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes (a view, no copy when it is contiguous and on the CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _encode(obj: Any, path: str, found: dict[str, torch.Tensor]) -> Any:
    kind = type(obj)
    if obj is None or kind in (str, int, float, bool):
        return obj
    if isinstance(obj, torch.Tensor):
        return {"@t": _add_tensor(obj, path, found)}
    if kind in (dict, collections.OrderedDict):
        items = [[_encode(key, f"{path}/{key}#key", found), _encode(value, f"{path}/{key}".lstrip("/"), found)]
                 for key, value in obj.items()]
        if kind is dict:
            return {"@d": items}
        node = {"@o": items}
        if getattr(obj, "_metadata", None) is not None:  # module versions of a state_dict
            node["@m"] = _encode(obj._metadata, f"{path}/_metadata", found)
        return node
    if kind is list:
        return [_encode(value, f"{path}/{index}".lstrip("/"), found) for index, value in enumerate(obj)]
    if kind is tuple:
        return {"@u": [_encode(value, f"{path}/{index}".lstrip("/"), found) for index, value in enumerate(obj)]}
    if kind is torch.Size:
        return {"@s": list(obj)}
    if kind is torch.dtype:
        return {"@dt": str(obj).removeprefix("torch.")}
    if kind is bytes:
        return {"@b": base64.b64encode(obj).decode()}
    raise NotFlat(f"{path or 'the payload'} is a {kind.__module__}.{kind.__qualname__}")


def _add_tensor(tensor: torch.Tensor, path: str, found: dict[str, torch.Tensor]) -> str:
    if is_dtensor(tensor):
        raise ShardedTensor(f"{path} is a DTensor ({tensor.placements}) of global shape {tuple(tensor.shape)}")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided \
            or tensor.dtype not in _DTYPES or tensor.is_quantized or tensor.device.type == "meta":
        raise NotFlat(f"{path} is a {type(tensor).__name__} ({tensor.dtype}, {tensor.layout}, {tensor.device})")
    name = path or "tensor"
    if name in found:
        name = f"{name}#{len(found)}"
    found[name] = tensor
    return name


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(value, tensors) for value in node]
    if not isinstance(node, dict):
        return node
    if "@t" in node:
        return tensors[node["@t"]]
    if "@d" in node:
        return {_decode(key, tensors): _decode(value, tensors) for key, value in node["@d"]}
    if "@o" in node:
        ordered = collections.OrderedDict((_decode(key, tensors), _decode(value, tensors)) for key, value in node["@o"])
        if "@m" in node:
            ordered._metadata = _decode(node["@m"], tensors)
        return ordered
    if "@u" in node:
        return tuple(_decode(value, tensors) for value in node["@u"])
    if "@s" in node:
        return torch.Size(node["@s"])
    if "@dt" in node:
        return getattr(torch, node["@dt"])
    if "@b" in node:
        return base64.b64decode(node["@b"])
    raise ValueError(f"unknown node {sorted(node)} in a flat checkpoint's skeleton")


def is_flat(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 9+ bytes) is a safetensors-style file."""
    return len(head) > MAGIC_OFFSET and head[MAGIC_OFFSET:MAGIC_OFFSET + 1] == b"{"


def read(path: str, mapped: Optional[mmap.mmap] = None) -> Any:
    """The payload of a flat file (of any other safetensors file: its tensors by name). Tensors are
    views of a private (copy-on-write) memory map of the file: nothing is read until it is used, and
    writing to a tensor never changes the file. ``mapped``: such a map of ``path`` made already (by
    ``checksum.of_mapped_file``, which read it in while verifying it), used instead of a new one.
    Raises ValueError for a file whose header does not describe it (see ``parse_header``)."""
    if mapped is None:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        header_len = header_length(mapped[:MAGIC_OFFSET], len(mapped))
        header, meta = parse_header(mapped[MAGIC_OFFSET:MAGIC_OFFSET + header_len],
                                    len(mapped) - MAGIC_OFFSET - header_len)
        start = MAGIC_OFFSET + header_len
        tensors = {name: _view(mapped, start, entry) for name, entry in header.items()}
        return tensors if meta is None else _decode(json.loads(meta["skeleton"]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from None


def check(handle: IO[bytes], size: int) -> None:
    """Check the header of the flat file of ``size`` bytes open in ``handle`` (at its start), reading
    the header only: raises BadHeader when it does not describe the file (see ``parse_header``).
    Verification runs this because a checksum only proves the file is what was written, not that
    it can be read: a header damaged before its checksum was taken must not reach a resume."""
    header_len = header_length(handle.read(MAGIC_OFFSET), size)
    text = handle.read(header_len)
    if len(text) != header_len:
        raise BadHeader(f"the header ends after {len(text)} of its {header_len} bytes (truncated)")
    parse_header(text, size - MAGIC_OFFSET - header_len)


class BadHeader(ValueError):
    """A safetensors header that does not describe its file."""


def header_length(head: bytes, size: int) -> int:
    """The header length recorded in the first 8 bytes of a file of ``size`` bytes, checked to lie
    inside the file (a length like 2**62 is refused before anything is read or allocated)."""
    if len(head) < MAGIC_OFFSET or size < MAGIC_OFFSET:
        raise BadHeader(f"the file has {size} bytes, fewer than the 8 of a header length")
    length = int.from_bytes(head[:MAGIC_OFFSET], "little")
    if not 2 <= length <= size - MAGIC_OFFSET:  # "{}" is the smallest header
        raise BadHeader(f"header length {length} does not fit in the file's {size} bytes")
    return length


def parse_header(text: bytes, data_nbytes: int) -> tuple[dict, Any]:
    """(tensor entries by name, the harness metadata or None for a plain safetensors file), checked:
    every entry has a known dtype, a shape of non-negative integers and ``data_offsets`` inside the
    data section (``data_nbytes``) spanning exactly shape x itemsize bytes; harness metadata has this
    format's version and a skeleton that decodes and names only listed tensors. Raises BadHeader."""
    try:
        header = json.loads(text)
    except ValueError as error:
        raise BadHeader(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise BadHeader("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        _check_entry(name, entry, data_nbytes)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:  # a plain safetensors file
        return header, None
    if meta.get("format_version") != VERSION:
        raise BadHeader(f"flat format v{meta.get('format_version')}, this harness reads v{VERSION}")
    try:
        _decode(json.loads(meta["skeleton"]), dict.fromkeys(header))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadHeader(f"the payload's skeleton does not decode ({type(error).__name__}: {error})") from None
    return header, meta


def _check_entry(name: str, entry: Any, data_nbytes: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in _BY_NAME:
        raise BadHeader(f"tensor {name!r}: unknown dtype in {entry!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise BadHeader(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(at) for at in offsets) \
            or not offsets[0] <= offsets[1] <= data_nbytes:
        raise BadHeader(f"tensor {name!r}: data_offsets {offsets!r} do not lie inside the data section "
                        f"of {data_nbytes} bytes (truncated or damaged)")
    expected = math.prod(shape) * _BY_NAME[entry["dtype"]].itemsize
    if offsets[1] - offsets[0] != expected:
        raise BadHeader(f"tensor {name!r}: shape {shape} of {entry['dtype']} needs {expected} bytes, "
                        f"data_offsets span {offsets[1] - offsets[0]}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _view(mapped: mmap.mmap, start: int, entry: dict) -> torch.Tensor:
    """One tensor of the file, in place. Each gets a storage of its own (not a slice of one shared
    storage), so a later torch.save of it writes its own bytes only, as after torch.load."""
    begin, end = entry["data_offsets"]
    dtype = _BY_NAME[entry["dtype"]]
    count = (end - begin) // dtype.itemsize
    if count == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    storage = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).untyped_storage()
    # Not ``.view(shape)``: a view keeps its 1-D base alive, so a state that later gets memory of its
    # own (payload.own_memory) would still hold the file's map through that base.
    return torch.empty(0, dtype=dtype).set_(storage, 0, entry["shape"])
