"""``python -m harness.ckpt``: look inside, verify, compare and export checkpoints.

    python -m harness.ckpt inspect PATH [--json] [--unsafe]
    python -m harness.ckpt verify PATH
    python -m harness.ckpt diff A B [--json]
    python -m harness.ckpt export PATH OUT [--dtype bf16|fp16|fp32] [--format safetensors|torch] [--state ema]

PATH is a checkpoint folder (``step_*``), a run's checkpoint folder (its newest complete checkpoint
whose files are whole is used; newer damaged ones are named on stderr), or a single file: a harness
``state.pt``, a plain state_dict, a detectron2/Lightning-style dict, or (with ``--unsafe`` only) a
pickled full model. A folder may be a URL (``s3://bucket/run``, any fsspec URL, as in
``checkpoint.dir``): ``verify`` reads the objects where they are; the other commands copy the one
checkpoint they use into a temporary folder (under ``TMPDIR``) first, and remove it when they end.

This module stays long (~670 lines) on purpose: it is the whole CLI, and its four subcommands share
one way to locate, load and flatten checkpoints; split, each piece would re-import the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from harness.checkpoint.keys import strip_wrapper_prefixes
from harness.checkpoint.payload import KEY_PER_RANK, MODEL, PAYLOAD_FORMAT, digest, extract_model_state, iter_leaves
from harness.checkpoint.format import UnsafeCheckpoint, read_payload
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import (INFO_SHARDED, MANIFEST_NAME, SHARDS_DIR, STEP_DIR, CheckpointRef,
                                     is_checkpoint_folder)
from harness.checkpoint.manifest import entries as manifest_entries
from harness.checkpoint.store import OK, CheckpointStore, local_checkpoint, newest_whole
from harness.checkpoint.storage import open_storage
from harness.checkpoint.storage.local import LocalStorage

EXIT_OK = 0
EXIT_PROBLEM = 1  # a problem found (corrupt, different) or a one-line error (missing, unreadable)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for `cat`, `grep`... whose reader went away

SHA256_SUFFIX = ".sha256"  # OUT.sha256 holds "<hex>  <name>", the format `sha256sum -c` reads
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_FORMATS = ("torch", "safetensors")
SAFETENSORS_HINT = "HINT: pip install safetensors (or use --format torch)"


class ToolError(Exception):
    """A problem to report to the user in one line (missing file, not a checkpoint, ...)."""


@dataclass
class Located:
    """What PATH resolved to: the payload file, and the checkpoint it belongs to if any. For a URL
    these are a local copy's; ``shown`` names the payload where it really is."""

    file: str
    store: Optional[CheckpointStore] = None
    ref: Optional[CheckpointRef] = None
    shown: str = ""

    def __post_init__(self) -> None:
        self.shown = self.shown or self.file


def is_url(path: str) -> bool:
    """A remote location (``s3://``, ``gs://``...); ``file://`` and plain paths are local."""
    return "://" in path and not path.startswith("file://")


def open_remote(url: str) -> tuple[CheckpointStore, Optional[str]]:
    """The run folder's store at ``url``, and the checkpoint's name when ``url`` names one
    (``.../step_000000100``) rather than a run folder."""
    url = url.rstrip("/")
    parent, _, base = url.rpartition("/")
    root, name = (parent, base) if STEP_DIR.match(base) else (url, None)
    try:
        return CheckpointStore(open_storage(root)), name
    except ImportError as error:  # fsspec names the package its protocol needs (s3fs, gcsfs, ...)
        raise ToolError(f"{url}: {error}") from None


def remote_refs(store: CheckpointStore, what: Callable[[], Any]) -> Any:
    """``what()`` (a listing or a manifest read of ``store``), its errors in one line."""
    try:
        return what()
    except ToolError:
        raise
    except Exception as error:  # the object store's client raises its own types (botocore's, ...)
        raise ToolError(f"{store.root}: cannot be read ({type(error).__name__}: {error}). HINT: check "
                        "the credentials and endpoint, as for the training job (S3: the AWS_* variables)") from None


# Local copies of remote checkpoints made by this process; main() removes them when it ends.
LOCAL_COPIES: list[str] = []


def locate_remote(url: str) -> Located:
    """The checkpoint at ``url`` (or a run folder's newest whole one), copied into a temporary
    folder with its manifest, so every command reads it like a local one."""
    store, name = open_remote(url)
    if name is None:
        ref = remote_refs(store, lambda: newest_whole(store, say=_say))
        if ref is None:
            raise ToolError(f"{url}: no complete checkpoint (step_*/{MANIFEST_NAME}) in this folder")
    else:
        ref = next((r for r in remote_refs(store, store.list_complete) if r.name == name), None)
        if ref is None:
            raise ToolError(f"{url}: no valid {MANIFEST_NAME}, so this checkpoint is incomplete")
    copy = tempfile.mkdtemp(prefix="harness-ckpt-")
    LOCAL_COPIES.append(copy)
    files = [MANIFEST_NAME, *manifest_entries(ref.manifest)]
    total = sum(size for size, _ in manifest_entries(ref.manifest).values())
    print(f"harness.ckpt: copying {store.root}/{ref.name} ({len(files)} files, {total / 1e6:.1f} MB) "
          f"into {copy}", file=sys.stderr)
    for rel in files:
        target = os.path.join(copy, ref.name, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with store.storage.open_read(f"{ref.name}/{rel}") as source, open(target, "wb") as handle:
                shutil.copyfileobj(source, handle, 8 << 20)
        except OSError as error:
            raise ToolError(f"cannot copy {store.root}/{ref.name}/{rel} into {copy}: {error}. HINT: "
                            "set TMPDIR to a folder with room for the checkpoint") from None
        except Exception as error:  # the object store's client's own types (botocore's, ...)
            raise ToolError(f"cannot read {store.root}/{ref.name}/{rel}: {type(error).__name__}: "
                            f"{error}") from None
    local = CheckpointStore(LocalStorage(copy))
    return Located(file=os.path.join(copy, ref.payload_path), store=local, ref=ref,
                   shown=f"{store.root}/{ref.payload_path}")


def remove_local_copies() -> None:
    while LOCAL_COPIES:
        shutil.rmtree(LOCAL_COPIES.pop(), ignore_errors=True)


def locate(path: str) -> Located:
    if is_url(path):
        return locate_remote(path)
    path = path.rstrip("/") or path
    if not os.path.exists(path):
        raise ToolError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        return Located(file=path)
    try:  # a checkpoint folder, whole (its files at their sizes), or a run folder's newest whole one
        store, ref = local_checkpoint(path, say=_say)
    except CheckpointError as error:
        raise ToolError(str(error)) from None
    return Located(file=os.path.join(store.root, ref.payload_path), store=store, ref=ref)


def _say(text: str) -> None:
    print(f"harness.ckpt: {text}", file=sys.stderr)


def load_any(path: str, unsafe: bool) -> Any:
    """The object stored in ``path``: a harness payload of either format, a torch file, or a
    safetensors file's tensor dict.

    Raises ToolError, in one line, for a file that is unreadable, truncated, not a torch file, or that
    needs full unpickling without ``unsafe``.
    """
    try:
        return read_payload(path, unsafe=unsafe)
    except UnsafeCheckpoint as error:
        raise ToolError(str(error)) from None
    except Exception as error:  # unpicklers raise arbitrary types on garbage; reported, not swallowed
        raise ToolError(f"{path}: not a readable checkpoint (truncated or another format?): "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def _import_safetensors(purpose: str) -> Any:
    try:
        import safetensors.torch as safetensors_torch
    except ImportError:
        raise ToolError(f"{purpose} needs the safetensors package, which is not installed. "
                        f"{SAFETENSORS_HINT}") from None
    return safetensors_torch


def iter_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) for every tensor in a nested structure."""
    return ((key, value) for key, value in iter_leaves(obj) if isinstance(value, torch.Tensor))


def groups_of(obj: Any, source: str = "the file") -> dict[str, Any]:
    """The named groups of a checkpoint: harness payload sections (per-rank objects as
    ``name@rankR``), or a single 'model' group."""
    if isinstance(obj, dict) and obj.get("format") == PAYLOAD_FORMAT:
        groups = dict(obj["state"])
        for rank, states in enumerate(obj.get(KEY_PER_RANK) or []):
            groups.update({f"{name}@rank{rank}": state for name, state in states.items()})
        return groups
    try:
        return {"model": extract_model_state(obj, source)}
    except ValueError as error:
        raise ToolError(str(error)) from None


def sharded_groups(located: Located) -> dict[str, Any]:
    """The groups a sharded checkpoint (trainer.strategy=fsdp) keeps in its ``shards/`` folder (model,
    optimizer), unsharded from DCP's files; {} for other checkpoints. Reads the whole state into
    this process's memory (for inspect and diff; export streams: harness.tools.sharded_export)."""
    if located.ref is None or located.ref.manifest.get(INFO_SHARDED) != SHARDS_DIR:
        return {}
    from harness.strategy.fsdp import read_full_state  # torch.distributed.checkpoint: only when needed

    folder = os.path.join(located.store.root, located.ref.name, SHARDS_DIR)
    try:
        return read_full_state(folder)
    except Exception as error:  # DCP raises its own types on damaged files; reported, not swallowed
        raise ToolError(f"{folder}: the shards cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); run verify") from None


def sharded_names(located: Located) -> set[str]:
    """The names of the groups a sharded checkpoint keeps in its ``shards/`` folder, from DCP's
    metadata (no tensor is read); empty for other checkpoints."""
    if located.ref is None or located.ref.manifest.get(INFO_SHARDED) != SHARDS_DIR:
        return set()
    from torch.distributed.checkpoint import FileSystemReader  # only when needed

    folder = os.path.join(located.store.root, located.ref.name, SHARDS_DIR)
    try:
        entries = FileSystemReader(folder).read_metadata().state_dict_metadata
    except Exception as error:  # DCP raises its own types on damaged files; reported, not swallowed
        raise ToolError(f"{folder}: the shards' metadata cannot be read ({type(error).__name__}); run verify") from None
    return {key.split(".", 1)[0] for key in entries}


def describe(path: str, unsafe: bool = False) -> dict:
    located = locate(path)
    payload = load_any(located.file, unsafe)
    groups = groups_of(payload, located.file) | sharded_groups(located)
    report: dict[str, Any] = {
        "path": located.shown,
        "kind": "harness" if isinstance(payload, dict) and payload.get("format") == PAYLOAD_FORMAT else "weights",
        "step": None, "bytes": os.path.getsize(located.file), "groups": {}, "digests": {},
    }
    if report["kind"] == "harness":
        report["step"] = int(payload["progress"]["step"])
        report["progress"] = payload["progress"]
        report["meta"] = payload.get("meta", {})
        report["world_size"] = len(payload.get("rng", []))
    for name, group in groups.items():
        tensors = [{"key": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                    "bytes": t.numel() * t.element_size()} for key, t in iter_tensors(group)]
        report["groups"][name] = {"tensors": tensors, "bytes": sum(t["bytes"] for t in tensors)}
        report["digests"][name] = digest(group)
    report["digests"].setdefault("optimizer", None)
    return report


def print_description(report: dict) -> None:
    print(f"{report['path']}  ({report['kind']}, {report['bytes'] / 1e6:.2f} MB)")
    if report["step"] is not None:
        meta = report.get("meta", {})
        print(f"step {report['step']}  epoch {report['progress']['epoch']}  "
              f"batch {report['progress']['batch_in_epoch']}  world size {report['world_size']}  "
              f"harness {meta.get('harness_version')}  torch {meta.get('torch_version')}")
    for name, group in report["groups"].items():
        print(f"\n[{name}] {len(group['tensors'])} tensors, {group['bytes'] / 1e6:.2f} MB, "
              f"digest {report['digests'][name][:16]}")
        for tensor in group["tensors"]:
            print(f"  {tensor['key']:<48} {str(tuple(tensor['shape'])):<16} {tensor['dtype']:<9} "
                  f"{tensor['bytes']}")


def verify(path: str) -> list[str]:
    """Print the state of one checkpoint folder, or of every ``step_*`` folder of a run folder, one
    ``<name>: <state>`` line each (OK, CORRUPT, INCOMPLETE, UNUSABLE: see harness.checkpoint.store).
    Returns what is wrong with those that are not OK (empty: every one is OK)."""
    if is_url(path):
        store, name = open_remote(path)
        reports = remote_refs(store, lambda: [store.examine(name)] if name else store.examine_all())
        if not reports:
            raise ToolError(f"{path}: no checkpoint (step_*/{MANIFEST_NAME}) in this folder")
        return _print_reports(store, reports)
    if not os.path.isdir(path):
        raise ToolError(f"{path}: not a checkpoint folder")
    path = path.rstrip("/") or path
    if is_checkpoint_folder(path):
        store = CheckpointStore(LocalStorage(os.path.dirname(os.path.abspath(path))))
        reports = [store.examine(os.path.basename(os.path.abspath(path)))]
    else:
        store = CheckpointStore(LocalStorage(path))
        reports = store.examine_all()
        if not reports:
            raise ToolError(f"{path}: no checkpoint (step_*/{MANIFEST_NAME}) in this folder")
    return _print_reports(store, reports)


def _print_reports(store: CheckpointStore, reports: list) -> list[str]:
    problems = []
    for report in reports:
        print(f"{report.name}: {report.state}")
        problems += [f"{store.root}/{detail}" for detail in report.details if report.state != OK]
    return problems


# ---- diff -------------------------------------------------------------------------------------------

def flatten_checkpoint(path: str, unsafe: bool = False) -> tuple[dict[str, Any], dict]:
    """Every leaf of every group, keyed ``group.key`` (``model.fc.weight``, ``optimizer.state.0.step``),
    and a short description of the file. Raises ToolError like ``describe``."""
    located = locate(path)
    payload = load_any(located.file, unsafe)
    harness = isinstance(payload, dict) and payload.get("format") == PAYLOAD_FORMAT
    leaves = {f"{name}.{key}" if key else name: value
              for name, group in (groups_of(payload, located.file) | sharded_groups(located)).items()
              for key, value in iter_leaves(group)}
    info = {"path": located.shown, "kind": "harness" if harness else "weights",
            "step": int(payload["progress"]["step"]) if harness else None}
    return leaves, info


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(number of differing elements, max |a - b| over them) for tensors of equal shape and dtype.

    Elements are compared exactly in their own dtype (no rounding of large integers); NaN equals NaN
    at the same position, and NaN against a number is a difference of inf.
    """
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype == torch.bool:
        a, b = a.to(torch.int8), b.to(torch.int8)
    differ = a != b
    if a.is_floating_point() or a.is_complex():
        differ &= ~(torch.isnan(a) & torch.isnan(b))
    count = int(differ.sum())
    if not count:
        return 0, 0.0
    wide = torch.complex128 if a.is_complex() else torch.float64
    gaps = (a[differ].to(wide) - b[differ].to(wide)).abs()
    gaps = torch.nan_to_num(gaps, nan=float("inf"), posinf=float("inf"))
    return count, float(gaps.max())


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN == NaN for our purposes
    return type(a) is type(b) and a == b


def diff_checkpoints(path_a: str, path_b: str, unsafe: bool = False) -> dict:
    """What differs between two checkpoints (harness payloads or plain weight files, any mix).

    Returns a report with ``identical`` (bool), ``only_a`` / ``only_b`` (keys in one file only),
    ``mismatched`` (same key, different shape or dtype), ``differing`` (tensors with different values:
    count of differing elements and max abs difference), ``values`` (non-tensor leaves that differ,
    such as a learning rate) and ``equal`` (how many leaves are the same). Groups are compared as the
    harness saves them (model, optimizer, scheduler, ...); a plain weight file is one ``model`` group,
    so an exported file can be compared with the checkpoint it came from.
    Raises ToolError for a file that cannot be read.
    """
    leaves_a, info_a = flatten_checkpoint(path_a, unsafe)
    leaves_b, info_b = flatten_checkpoint(path_b, unsafe)
    report: dict[str, Any] = {
        "a": info_a, "b": info_b,
        "only_a": sorted(set(leaves_a) - set(leaves_b)),
        "only_b": sorted(set(leaves_b) - set(leaves_a)),
        "mismatched": [], "differing": [], "values": [], "equal": 0,
    }
    for key in [key for key in leaves_a if key in leaves_b]:
        a, b = leaves_a[key], leaves_b[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                report["mismatched"].append({"key": key, "a": _signature(a), "b": _signature(b)})
                continue
            count, max_abs = compare_tensors(a, b)
            if count:
                report["differing"].append({"key": key, "count": count, "numel": a.numel(),
                                            "max_abs": max_abs})
            else:
                report["equal"] += 1
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or not _same_value(a, b):
            report["values"].append({"key": key, "a": _printable(a), "b": _printable(b)})
        else:
            report["equal"] += 1
    report["identical"] = not (report["only_a"] or report["only_b"] or report["mismatched"]
                               or report["differing"] or report["values"])
    return report


def _signature(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}


def _printable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def print_diff(report: dict) -> None:
    for side in ("a", "b"):
        info = report[side]
        step = f", step {info['step']}" if info["step"] is not None else ""
        print(f"{side.upper()}: {info['path']}  ({info['kind']}{step})")
    for side in ("a", "b"):
        keys = report[f"only_{side}"]
        if keys:
            print(f"\nonly in {side.upper()} ({len(keys)}):")
            for key in keys:
                print(f"  {key}")
    if report["mismatched"]:
        print(f"\nshape/dtype mismatch ({len(report['mismatched'])}):")
        for item in report["mismatched"]:
            print(f"  {item['key']:<48} A {tuple(item['a']['shape'])} {item['a']['dtype']}  "
                  f"B {tuple(item['b']['shape'])} {item['b']['dtype']}")
    if report["differing"]:
        print(f"\ntensors that differ ({len(report['differing'])}):")
        for item in report["differing"]:
            print(f"  {item['key']:<48} max |A-B| {item['max_abs']:.6g}  "
                  f"{item['count']}/{item['numel']} elements")
    if report["values"]:
        print(f"\nvalues that differ ({len(report['values'])}):")
        for item in report["values"]:
            print(f"  {item['key']:<48} A {item['a']!r}  B {item['b']!r}")
    verdict = "identical" if report["identical"] else "DIFFERENT"
    print(f"\n{verdict}: {report['equal']} entries equal")


# ---- export -----------------------------------------------------------------------------------------

def exportable_weights(located: Located, dtype: Optional[str] = None, unsafe: bool = False,
                       state: str = MODEL) -> dict[str, torch.Tensor]:
    """The model weights of any checkpoint layout (with ``state``, those of another registered
    object: see ``state_weights``), wrapper prefixes stripped, floating tensors cast to ``dtype``
    (fp32/fp16/bf16; integer and bool buffers are kept as they are)."""
    payload = load_any(located.file, unsafe)
    try:
        if state != MODEL:
            # What the shards hold is streamed by export_weights; here they only name their groups
            # for the error about a missing ``state``, from DCP's metadata (no tensor is read).
            in_shards = dict.fromkeys(sharded_names(located))
            weights = state_weights(in_shards | groups_of(payload, located.file), state)
        else:
            weights = extract_model_state(payload, located.file)
    except ValueError as error:
        raise ToolError(str(error)) from None
    if dtype is None:
        return weights
    target = EXPORT_DTYPES[dtype]
    return {key: tensor.to(target) if tensor.is_floating_point() else tensor
            for key, tensor in weights.items()}


def state_weights(groups: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The weights of the registered object ``name`` (``session.register(name=...)``): an EMA's
    shadow (``trainer.ema_decay``: ``{"decay", "shadow"}``), or any state dict of tensors (a second
    model, timm's ModelEmaV2), wrapper prefixes stripped. Raises ValueError naming what the
    checkpoint holds when ``name`` is missing or holds more than tensors (an optimizer)."""
    if name not in groups:
        raise ValueError(f"the checkpoint holds no state named {name!r}; it holds {sorted(groups)}")
    held = groups[name]
    if isinstance(held, dict) and isinstance(held.get("shadow"), dict):
        held = held["shadow"]
    if not (isinstance(held, dict) and held and all(isinstance(value, torch.Tensor) for value in held.values())):
        found = sorted(held)[:8] if isinstance(held, dict) else type(held).__name__
        raise ValueError(f"{name!r} is not a state dict of tensors (it holds {found}), so it has no weights "
                         "to export")
    return strip_wrapper_prefixes(held)


def format_for(out: str, fmt: Optional[str]) -> str:
    """``--format`` as given, else what OUT's name says: safetensors for ``*.safetensors``, torch
    for any other name (``.pt``, ``.pth``, ``.bin``)."""
    if fmt is not None:
        return fmt
    return "safetensors" if out.lower().endswith(".safetensors") else "torch"


def export_weights(path: str, out: str, dtype: Optional[str] = None, fmt: Optional[str] = None,
                   unsafe: bool = False, state: str = MODEL) -> str:
    """Write the model weights of ``path`` (or those of the registered object ``state``, e.g. the
    EMA) to ``out`` and its checksum to ``out.sha256``.

    Both files are written atomically (temp file, fsync, rename, fsync of the folder): a crash leaves
    the previous ``out`` or the new one, never a partial file. Returns the sha256 hex of ``out``.
    Raises ToolError when the input cannot be read, safetensors is missing for ``--format
    safetensors``, or ``out`` cannot be written (the message names the folder).
    """
    fmt = format_for(out, fmt)
    if fmt not in EXPORT_FORMATS:
        raise ToolError(f"--format {fmt!r} is invalid: expected one of {EXPORT_FORMATS}")
    encode = _safetensors_encoder() if fmt == "safetensors" else None
    if os.path.isdir(out):
        raise ToolError(f"{out}: is a folder; give the output file name, e.g. {out.rstrip('/')}/model.pt")
    storage = LocalStorage(os.path.dirname(os.path.abspath(out)) or ".")
    name = os.path.basename(out)
    located = locate(path)
    prefix = _sharded_prefix(located, state)
    # A name the checkpoint lacks is refused first (from the shards' metadata, or the payload).
    weights = exportable_weights(located, dtype, unsafe, state) if prefix is None else None
    _check_every_byte(located)
    if prefix is not None:
        return _export_sharded(located, prefix, out, dtype, fmt, storage)
    data = encode(weights) if encode is not None else None

    def fill(handle) -> None:
        if data is None:
            torch.save(weights, handle)
        else:
            handle.write(data)

    try:
        _, named = storage.write(name, fill, algorithm="sha256")  # what `sha256sum -c` checks
        sha256 = named.split(":", 1)[1]
        line = f"{sha256}  {name}\n".encode()
        storage.write(name + SHA256_SUFFIX, lambda handle: handle.write(line))
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        raise ToolError(f"cannot write {out}: {error}. HINT: check that {storage.root} exists, is "
                        "writable and has free space") from None
    return sha256


def _check_every_byte(located: Located) -> None:
    """What is exported gets used: a checkpoint's files are read against their checksums first (a
    flipped byte keeps the file's size); a plain weights file has none to check against."""
    if located.store is None:
        return
    damaged = located.store.problems(located.ref, verify=True)
    if damaged:
        raise ToolError(f"{located.store.root}: {'; '.join(damaged)}; nothing exported. HINT: export an "
                        "older checkpoint (its step_* folder), after python -m harness.ckpt verify")


def _sharded_prefix(located: Located, state: str) -> Optional[str]:
    """The DCP name of ``state``'s weights when ``located`` is a sharded checkpoint whose shards hold
    them (the model; an EMA of a sharded model); None to read them from the payload."""
    if located.ref is None or located.ref.manifest.get(INFO_SHARDED) != SHARDS_DIR:
        return None
    if state == MODEL:
        return MODEL
    from harness.tools.sharded_export import weights_prefix  # torch.distributed.checkpoint: only when needed

    try:
        return weights_prefix(os.path.join(located.store.root, located.ref.name, SHARDS_DIR), state)
    except ValueError as error:
        raise ToolError(str(error)) from None


def _export_sharded(located: Located, prefix: str, out: str, dtype: Optional[str], fmt: str,
                    storage: LocalStorage) -> str:
    """The weights under ``prefix`` in a sharded checkpoint, streamed tensor by tensor
    (harness.tools.sharded_export)."""
    from harness.tools.sharded_export import export  # torch.distributed.checkpoint: only when needed

    folder = os.path.join(located.store.root, located.ref.name, SHARDS_DIR)
    try:
        sha256 = export(folder, prefix, out, fmt, EXPORT_DTYPES[dtype] if dtype else None)
        line = f"{sha256}  {os.path.basename(out)}\n".encode()
        storage.write(os.path.basename(out) + SHA256_SUFFIX, lambda handle: handle.write(line))
    except OSError as error:
        raise ToolError(f"cannot write {out}: {error}. HINT: check that {storage.root} exists, is "
                        "writable and has free space") from None
    return sha256


def _safetensors_encoder():
    """A function weights -> safetensors bytes. Raises ToolError when safetensors is not installed."""
    safetensors_torch = _import_safetensors("safetensors output (--format safetensors, or OUT named *.safetensors)")

    def encode(weights: dict[str, torch.Tensor]) -> bytes:
        # safetensors refuses tensors that share storage (tied weights, views); independent
        # contiguous copies are what a loader expects anyway.
        # https://huggingface.co/docs/safetensors/torch_shared_tensors
        tensors = {key: tensor.detach().contiguous().clone() for key, tensor in weights.items()}
        return safetensors_torch.save(tensors, metadata={"format": "pt"})

    return encode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.ckpt", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="what a checkpoint holds, with content digests")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--unsafe", action="store_true",
                         help="allow full unpickling (runs code from the file; trusted files only)")
    check = commands.add_parser("verify", help="check files against their manifests")
    check.add_argument("path")
    compare = commands.add_parser("diff", help="which tensors differ between two checkpoints "
                                               "(exit 0: identical, 1: different)")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    compare.add_argument("--unsafe", action="store_true",
                         help="allow full unpickling (runs code from the files; trusted files only)")
    export = commands.add_parser("export", help="model (or --state ema) weights only, prefixes stripped, for inference "
                                                "or fine-tuning; prints the sha256 of OUT")
    export.add_argument("path")
    export.add_argument("out")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="cast floating tensors (default: keep their dtype)")
    export.add_argument("--format", choices=EXPORT_FORMATS, default=None, dest="fmt",
                        help="torch (torch.save) or safetensors (needs the safetensors package); default: "
                             "safetensors when OUT ends in .safetensors, else torch")
    export.add_argument("--state", default=MODEL, metavar="NAME",
                        help="export the weights of another registered object instead of the model: "
                             "ema (trainer.ema_decay's average), or any name given to session.register "
                             "that holds a state dict of tensors")
    export.add_argument("--unsafe", action="store_true",
                        help="allow full unpickling (runs code from the file; trusted files only)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; its exit code. A reader that went away (``... | head``) ends it quietly."""
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python's recipe (docs: signal, "Note on SIGPIPE"): point stdout at /dev/null so the flush at
        # interpreter exit cannot raise again, and exit like a tool killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (an export's OUT is left as it was)
        # An object store's request cut short leaves a coroutine that is never awaited; the warning
        # about it (when the interrupted frames go) says nothing to the person who pressed Ctrl-C.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        print("harness.ckpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        remove_local_copies()


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "inspect":
            report = describe(args.path, unsafe=args.unsafe)
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                print_description(report)
            return EXIT_OK
        if args.command == "verify":
            problems = verify(args.path)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_PROBLEM if problems else EXIT_OK
        if args.command == "diff":
            report = diff_checkpoints(args.a, args.b, unsafe=args.unsafe)
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                print_diff(report)
            return EXIT_OK if report["identical"] else EXIT_PROBLEM
        if args.command == "export":
            sha256 = export_weights(args.path, args.out, args.dtype, args.fmt, unsafe=args.unsafe,
                                    state=args.state)
            print(f"{sha256}  {args.out}")
            return EXIT_OK
    except ToolError as error:
        # One line, so the error is the last line of a log and greps well (the HINT stays in it).
        print(f"harness.ckpt: {str(error).replace(chr(10), ' ')}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
