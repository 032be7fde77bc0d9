"""Names inside a run's checkpoint folder: the one place that spells them.

    <dir>/step_000000100/state.safetensors  the payload (harness.checkpoint.flat; safetensors-readable)
    <dir>/step_000000100/state.pt           the payload in torch.save's format instead (checkpoints
                                            written before the flat format, or holding objects that
                                            the flat format cannot store)
    <dir>/step_000000100/shards/            trainer.strategy=fsdp: the model and optimizer, one set of
                                            torch.distributed.checkpoint files per rank (+ .metadata)
    <dir>/step_000000100/manifest.json      written LAST; without it the checkpoint does not exist
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

MANIFEST_NAME = "manifest.json"
PAYLOAD_NAME = "state.safetensors"
LEGACY_PAYLOAD_NAME = "state.pt"
SHARDS_DIR = "shards"  # a sharded strategy's own files (harness.strategy), listed in the manifest
# Manifest keys of a sharded checkpoint: the strategy that wrote it, and the folder of its own files.
INFO_STRATEGY = "strategy"
INFO_SHARDED = "sharded"
MAX_FILE_DEPTH = 2  # a manifest's file names: "name" or "folder/name", never deeper
STEP_DIR = re.compile(r"^step_(\d+)$")
LOCK_NAME = ".harness.lock"  # rank 0 of the job writing this folder holds a flock on it
SET_ASIDE_DIR = "set_aside"  # earlier runs' files, moved here by a fresh start (checkpoint.set_aside)
HASH_CHUNK = 8 << 20  # bytes read or copied at a time
# torch.distributed.checkpoint names each rank's data files "__<rank>_<n>.distcp".
RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def is_checkpoint_folder(path: str) -> bool:
    """One checkpoint (``step_*`` or a folder with a manifest), as opposed to a run's folder."""
    path = path.rstrip("/") or path
    return os.path.exists(os.path.join(path, MANIFEST_NAME)) or bool(STEP_DIR.match(os.path.basename(path)))


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def step_of(name: str) -> Optional[int]:
    """The step of a checkpoint folder name, or None when the name is not one."""
    match = STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def is_plain_file_name(name: str) -> bool:
    """Whether a manifest's file entry is a plain name inside its checkpoint folder (no path)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def is_inside_folder(name: str) -> bool:
    """Whether a manifest's file entry names a file inside its checkpoint folder: a plain name, or
    at most ``MAX_FILE_DEPTH`` plain names joined by ``/`` (``shards/__0_0.distcp``). Absolute
    paths, ``..``, ``.``, empty parts (``a//b``, ``a/``), backslashes and NUL are refused."""
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    return len(parts) <= MAX_FILE_DEPTH and all(is_plain_file_name(part) for part in parts)


def payload_file(manifest: dict) -> str:
    """The payload file a manifest lists: the flat one, or torch.save's (older checkpoints)."""
    files = manifest.get("files", {})
    return PAYLOAD_NAME if PAYLOAD_NAME in files or LEGACY_PAYLOAD_NAME not in files else LEGACY_PAYLOAD_NAME


def checking_rank(rel: str, world_size: int) -> int:
    """The rank that hashes (at save) and verifies (at resume) the file ``rel`` of a checkpoint
    folder: a sharded strategy's data file of rank r (``shards/__<r>_<n>.distcp``) goes to rank
    ``r % world_size`` (on the same world size the rank that wrote it, whose page cache may still
    hold it; on another, spread round-robin), every other file to rank 0."""
    folder, _, name = rel.rpartition("/")
    match = RANK_FILE.match(name) if folder in ("", SHARDS_DIR) else None
    return int(match.group(1)) % world_size if match else 0


def manifest_path(name: str) -> str:
    return f"{name}/{MANIFEST_NAME}"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its step, folder name and parsed manifest."""

    step: int
    name: str
    manifest: dict

    @property
    def payload_path(self) -> str:
        """The payload's path relative to the run folder."""
        return f"{self.name}/{payload_file(self.manifest)}"

    @property
    def metric(self) -> Optional[float]:
        return self.manifest.get("metric")
