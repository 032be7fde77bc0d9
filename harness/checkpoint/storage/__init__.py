"""Where checkpoint files live. The Storage contract, and ``open_storage`` to pick one.

Implementations: ``local`` (a POSIX folder; O_DIRECT payloads via ``directio``), ``fsspec`` (any
fsspec URL: s3://, gs://, ...), ``staged`` (commit to a local folder, upload behind the loop).
"""

from __future__ import annotations

import hashlib
import os
from typing import IO, Callable, Optional, Protocol

from harness.checkpoint.storage.local import LocalStorage


class Storage(Protocol):
    """Where checkpoint files live: a local folder, an fsspec URL, or a staged pair of both.

    Call order for one checkpoint, all made by rank 0's CheckpointStore.commit (others only read):

    1. ``write(f"{step_dir}/state.pt", fill)``: ``fill(handle)`` streams the payload into ``handle``;
       the file becomes visible under its final name only once complete and durable (local: temp
       name, fsync, rename, fsync folder; object stores: the upload's completion). Returns
       (bytes written, their checksum named by its algorithm, ``harness.checkpoint.checksum``). On failure nothing is visible and it raises.
    2. ``write(f"{step_dir}/manifest.json", fill)``, same contract: the commit point.
    3. ``remove_dir(name)`` for what retention drops, only after 2 succeeded.
    4. ``flush()`` before the process exits: waits for anything still in flight (staged uploads)
       and raises its failure; a no-op where writes are durable when they return.

    Readers call ``list_names`` (folder names at the root; a missing root is empty), then
    ``read_bytes``/``open_read``/``size``/``local_path`` on files of a listed checkpoint.
    ``read_bytes``/``size``/``open_read`` raise FileNotFoundError when a file is provably absent and
    another OSError for anything else (permissions, I/O errors, throttling): callers tell them
    apart, because only an absent manifest marks a partial save.
    """

    root: str

    def list_names(self) -> list[str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def open_read(self, rel: str) -> IO[bytes]: ...
    def size(self, rel: str) -> int: ...
    def local_path(self, rel: str) -> Optional[str]: ...
    def write(self, rel: str, fill: Callable[[IO[bytes]], None],
              algorithm: str = "xxh3_128") -> tuple[int, str]: ...
    def remove_dir(self, rel: str) -> None: ...
    def flush(self) -> None: ...  # wait for background uploads (staging); raise their failure


def open_storage(root: str, staging_dir: Optional[str] = None) -> Storage:
    """LocalStorage for paths and file:// URLs, FsspecStorage for other URLs (s3://, gs://, ...);
    with ``staging_dir``, a StagedStorage that writes there first and uploads to ``root`` behind."""
    if staging_dir:
        from harness.checkpoint.storage.staged import StagedStorage

        destination = open_storage(root)
        return StagedStorage(LocalStorage(os.path.join(staging_dir, staging_key(destination.root))),
                             destination)
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" in root:
        from harness.checkpoint.storage.fsspec import FsspecStorage

        return FsspecStorage(root)
    return LocalStorage(root)


def staging_key(destination: str) -> str:
    """A staging subfolder name unique to one absolute destination (path or URL).

    Runs that share a staging disk never see each other's files: the key is a hash of the full,
    absolute destination (a readable tail helps a person looking at the disk).
    """
    digest = hashlib.sha256(destination.encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in destination.rstrip("/").split("/")[-1])
    return f"{tail[:40]}-{digest}"
