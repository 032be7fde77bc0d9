"""``python -m harness.ckpt``: look inside, verify, compare and export checkpoints.

    python -m harness.ckpt inspect PATH [--json] [--unsafe]
    python -m harness.ckpt verify PATH
    python -m harness.ckpt diff A B [--json]
    python -m harness.ckpt export PATH OUT [--dtype bf16|fp16|fp32] [--format safetensors|torch]

PATH is a checkpoint folder (``step_*``), a run's checkpoint folder (its newest complete checkpoint
is used), or a single file: a harness ``state.pt``, a plain state_dict, a detectron2/Lightning-style
dict, or (with ``--unsafe`` only) a pickled full model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from harness.state import PAYLOAD_FORMAT, UnsafeCheckpoint, extract_model_state, torch_load
from harness.store import MANIFEST_NAME, PAYLOAD_NAME, CheckpointRef, CheckpointStore, LocalStorage, STEP_DIR

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


class ToolError(Exception):
    """A problem to report to the user in one line (missing file, not a checkpoint, ...)."""


@dataclass
class Located:
    """What PATH resolved to: the payload file, and the checkpoint it belongs to if any."""

    file: str
    store: Optional[CheckpointStore] = None
    ref: Optional[CheckpointRef] = None


def locate(path: str) -> Located:
    path = path.rstrip("/") or path
    if not os.path.exists(path):
        raise ToolError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        return Located(file=path)
    if os.path.exists(os.path.join(path, MANIFEST_NAME)) or STEP_DIR.match(os.path.basename(path)):
        store = CheckpointStore(LocalStorage(os.path.dirname(os.path.abspath(path))))
        name = os.path.basename(os.path.abspath(path))
        ref = next((r for r in store.list_complete() if r.name == name), None)
        if ref is None:
            raise ToolError(f"{path}: no valid {MANIFEST_NAME}, so this checkpoint is incomplete")
        return Located(file=os.path.join(path, PAYLOAD_NAME), store=store, ref=ref)
    store = CheckpointStore(LocalStorage(path))
    ref = store.latest_listed()
    if ref is None:
        raise ToolError(f"{path}: no complete checkpoint (step_*/{MANIFEST_NAME}) in this folder")
    return Located(file=os.path.join(store.root, ref.name, PAYLOAD_NAME), store=store, ref=ref)


def load_any(path: str, unsafe: bool) -> Any:
    try:
        return torch_load(path, map_location="cpu", unsafe=unsafe)
    except UnsafeCheckpoint as error:
        raise ToolError(str(error)) from None
    except Exception as error:  # unpicklers raise arbitrary types on garbage; reported, not swallowed
        raise ToolError(f"{path}: not a readable torch checkpoint (truncated or another format?): "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) for every tensor in a nested structure."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in obj:
            yield from iter_tensors(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from iter_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def digest(obj: Any) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor in sorted key order."""
    hasher = hashlib.sha256()
    for key, tensor in sorted(iter_tensors(obj), key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def groups_of(obj: Any) -> dict[str, Any]:
    """The named groups of a checkpoint: harness payload sections, or a single 'model' group."""
    if isinstance(obj, dict) and obj.get("format") == PAYLOAD_FORMAT:
        return dict(obj["state"])
    return {"model": extract_model_state(obj, "file")}


def describe(path: str, unsafe: bool = False) -> dict:
    located = locate(path)
    payload = load_any(located.file, unsafe)
    groups = groups_of(payload)
    report: dict[str, Any] = {
        "path": located.file,
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
    """Problems found in one checkpoint folder or every checkpoint of a run folder."""
    if not os.path.isdir(path):
        raise ToolError(f"{path}: not a checkpoint folder")
    if os.path.exists(os.path.join(path, MANIFEST_NAME)) or STEP_DIR.match(os.path.basename(path.rstrip("/"))):
        located = locate(path)
        refs, store = [located.ref], located.store
    else:
        store = CheckpointStore(LocalStorage(path))
        refs = store.list_complete()
        if not refs:
            raise ToolError(f"{path}: no complete checkpoint (step_*/{MANIFEST_NAME}) in this folder")
    problems = []
    for ref in refs:
        found = store.problems(ref, checksum=True)
        problems += [f"{store.root}/{problem}" for problem in found]
        print(f"{ref.name}: {'OK' if not found else 'CORRUPT'}")
    return problems


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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    except ToolError as error:
        print(f"harness.ckpt: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
