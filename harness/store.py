"""How checkpoints are written and found: an atomic, manifest-last protocol on a folder.

Layout of a run's checkpoint folder::

    <dir>/step_000000100/state.pt        the payload (written first, fsynced, renamed into place)
    <dir>/step_000000100/manifest.json   step, files, sizes, sha256, versions (written LAST)

A checkpoint without a valid manifest does not exist: a crash at any instant leaves either the old
set of checkpoints or the old set plus one complete new one. "Latest" is found by scanning for
manifests; nothing else (no pointer file) is trusted. Retention is computed from what is on disk,
so it survives restarts, and runs only after a new checkpoint is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Optional, Protocol

from harness.directio import BufferRing, DirectWriter, open_direct

MANIFEST_NAME = "manifest.json"
PAYLOAD_NAME = "state.pt"
MANIFEST_FORMAT = "harness.manifest"
MANIFEST_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files disagree with its manifest (truncated, altered, missing)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


class HashingWriter:
    """A write-only file object that counts and sha256-hashes what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()


class Storage(Protocol):
    """Where checkpoint files live: a local folder or an fsspec URL."""

    root: str

    def list_names(self) -> list[str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def open_read(self, rel: str) -> IO[bytes]: ...
    def size(self, rel: str) -> int: ...
    def local_path(self, rel: str) -> Optional[str]: ...
    def write(self, rel: str, fill: Callable[[IO[bytes]], None]) -> tuple[int, str]: ...
    def remove_dir(self, rel: str) -> None: ...
    def flush(self) -> None: ...  # wait for background uploads (staging); raise their failure


class LocalStorage:
    """A POSIX folder: temp name, fsync, rename, fsync the folder.

    Payloads go through O_DIRECT (harness.directio) where the filesystem supports it: near the disk's
    bandwidth and without filling the page cache; elsewhere through ordinary buffered writes.
    """

    def __init__(self, root: str, direct: bool = True):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.direct = direct
        self._ring: Optional[BufferRing] = None  # staging buffers, allocated on the first direct write

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def list_names(self) -> list[str]:
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []

    def read_bytes(self, rel: str) -> bytes:
        with open(self._path(rel), "rb") as handle:
            return handle.read()

    def open_read(self, rel: str) -> IO[bytes]:
        return open(self._path(rel), "rb")

    def size(self, rel: str) -> int:
        return os.path.getsize(self._path(rel))

    def local_path(self, rel: str) -> Optional[str]:
        return self._path(rel)

    def write(self, rel: str, fill: Callable[[IO[bytes]], None]) -> tuple[int, str]:
        """Write ``rel`` atomically; returns (bytes, sha256 hex). Leaves nothing behind on failure."""
        final = self._path(rel)
        folder = os.path.dirname(final)
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        temp = f"{final}.tmp-{os.getpid()}"
        try:
            fd = open_direct(temp) if self.direct else None
            size, digest = self._write_buffered(temp, fill) if fd is None else self._write_direct(fd, fill)
            os.replace(temp, final)
        except BaseException:
            _remove_quietly(temp)
            raise
        _fsync_dir(folder)
        if created:  # the new folder's own entry must be durable too, or the checkpoint can vanish
            _fsync_dir(os.path.dirname(folder))
        return size, digest

    @staticmethod
    def _write_buffered(path: str, fill: Callable[[IO[bytes]], None]) -> tuple[int, str]:
        with open(path, "wb") as raw:
            writer = HashingWriter(raw)
            fill(writer)
            raw.flush()
            os.fsync(raw.fileno())
        return writer.size, writer.sha256.hexdigest()

    def _write_direct(self, fd: int, fill: Callable[[IO[bytes]], None]) -> tuple[int, str]:
        if self._ring is None:
            self._ring = BufferRing()
        try:
            with self._ring.lock:
                writer = DirectWriter(fd, self._ring)
                try:
                    fill(writer)
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
        finally:
            os.close(fd)
        return writer.size, writer.sha256.hexdigest()

    def remove_dir(self, rel: str) -> None:
        shutil.rmtree(self._path(rel), ignore_errors=False)

    def flush(self) -> None:
        """Nothing is in flight: every write is durable when it returns."""


def _root_os_error(error: BaseException) -> BaseException:
    """The OSError (ENOSPC, EROFS, ...) behind an error, if there is one."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return error


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(root: str, staging_dir: Optional[str] = None) -> Storage:
    """LocalStorage for paths and file:// URLs, FsspecStorage for other URLs (s3://, gs://, ...);
    with ``staging_dir``, a StagedStorage that writes there first and uploads to ``root`` behind."""
    if staging_dir:
        from harness.staging import StagedStorage

        # One subfolder per destination, so runs sharing a staging disk never see each other's files.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", root).strip("_")
        return StagedStorage(LocalStorage(os.path.join(staging_dir, slug)), open_storage(root))
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" in root:
        from harness.remote import FsspecStorage

        return FsspecStorage(root)
    return LocalStorage(root)


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: its step, folder name and parsed manifest."""

    step: int
    name: str
    manifest: dict

    @property
    def metric(self) -> Optional[float]:
        return self.manifest.get("metric")


@dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep. Pure: computed from the list of complete checkpoints."""

    keep_last: int = 3  # 0 keeps all
    keep_every: int = 0
    keep_best: int = 0
    best_mode: str = "min"

    def to_delete(self, refs: Iterable[CheckpointRef], current: Optional[int] = None) -> list[CheckpointRef]:
        """The checkpoints to delete. ``current`` is the step just written: it is always kept, and
        checkpoints of later steps (left by another run in the same folder, or a corrupt newest one
        that resume skipped) neither count towards keep_last nor get deleted."""
        ordered = sorted(refs, key=lambda ref: ref.step)
        if current is not None:
            ordered = [ref for ref in ordered if ref.step <= current]
        if not self.keep_last:
            return []
        keep = {ref.step for ref in ordered[-self.keep_last:]} | ({current} if current is not None else set())
        if self.keep_every:
            keep |= {ref.step for ref in ordered if ref.step % self.keep_every == 0}
        if self.keep_best:
            scored = [ref for ref in ordered if ref.metric is not None]
            scored.sort(key=lambda ref: ref.metric, reverse=self.best_mode == "max")
            keep |= {ref.step for ref in scored[:self.keep_best]}
        return [ref for ref in ordered if ref.step not in keep]


class CheckpointStore:
    """Commit, find, verify and prune the checkpoints of one run folder."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @property
    def root(self) -> str:
        return self.storage.root

    def commit(self, step: int, fill: Callable[[IO[bytes]], None], info: dict) -> CheckpointRef:
        """Write the payload, then the manifest that makes it exist. ``info`` goes into the manifest.

        On failure (full disk, read-only folder, ...) raises CheckpointError naming the folder; no
        existing checkpoint is touched, and the partial one has no manifest so it does not exist.
        """
        name = step_dir_name(step)
        started = time.perf_counter()
        try:
            size, digest = self.storage.write(f"{name}/{PAYLOAD_NAME}", fill)
            manifest = {
                "format": MANIFEST_FORMAT,
                "format_version": MANIFEST_VERSION,
                "step": step,
                "files": {PAYLOAD_NAME: {"bytes": size, "sha256": digest}},
                "created_unix": time.time(),
                "write_s": round(time.perf_counter() - started, 4),
                **info,
            }
            encoded = json.dumps(manifest, indent=1, sort_keys=True).encode()
            self.storage.write(f"{name}/{MANIFEST_NAME}", lambda handle: handle.write(encoded))
        except (OSError, RuntimeError) as error:  # torch.save turns a failed write into RuntimeError
            error = _root_os_error(error)
            previous = self.latest_listed()
            kept = f"the previous checkpoint (step {previous.step}) is intact" if previous else \
                "no earlier checkpoint exists"
            raise CheckpointError(
                f"could not write checkpoint step {step} to {self.root}/{name}: {error}; {kept}. "
                "HINT: free disk space or point checkpoint.dir at a writable folder") from error
        return CheckpointRef(step=step, name=name, manifest=manifest)

    def _read_manifest(self, name: str) -> Optional[dict]:
        try:
            manifest = json.loads(self.storage.read_bytes(f"{name}/{MANIFEST_NAME}"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            warnings.warn(f"ignoring checkpoint {self.root}/{name}: unreadable manifest ({error})", stacklevel=2)
            return None
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
            warnings.warn(f"ignoring checkpoint {self.root}/{name}: manifest format "
                          f"{manifest.get('format')!r} v{manifest.get('format_version')!r} is not "
                          f"{MANIFEST_FORMAT} v{MANIFEST_VERSION}", stacklevel=2)
            return None
        return manifest

    def list_complete(self) -> list[CheckpointRef]:
        """Every checkpoint whose manifest exists and parses, oldest first (no checksum work)."""
        refs = []
        for name in self.storage.list_names():
            match = STEP_DIR.match(name)
            if not match:
                continue
            manifest = self._read_manifest(name)
            if manifest is not None:
                refs.append(CheckpointRef(step=int(match.group(1)), name=name, manifest=manifest))
        return sorted(refs, key=lambda ref: ref.step)

    def latest_listed(self) -> Optional[CheckpointRef]:
        refs = self.list_complete()
        return refs[-1] if refs else None

    def problems(self, ref: CheckpointRef, checksum: bool = True) -> list[str]:
        """What is wrong with a checkpoint's files compared to its manifest (empty: it is valid)."""
        found = []
        for rel, expected in ref.manifest.get("files", {}).items():
            path = f"{ref.name}/{rel}"
            try:
                size = self.storage.size(path)
            except FileNotFoundError:
                found.append(f"{path}: missing")
                continue
            if size != expected["bytes"]:
                found.append(f"{path}: {size} bytes, manifest says {expected['bytes']} (truncated?)")
            elif checksum and self.sha256(path) != expected["sha256"]:
                found.append(f"{path}: sha256 differs from the manifest (corrupted)")
        return found

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.storage.open_read(rel) as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def latest_valid(self, checksum: bool = True) -> Optional[CheckpointRef]:
        """The newest checkpoint that passes verification; corrupt newer ones are skipped with a warning."""
        for ref in reversed(self.list_complete()):
            found = self.problems(ref, checksum=checksum)
            if not found:
                return ref
            warnings.warn(f"skipping corrupt checkpoint {self.root}/{ref.name}: " + "; ".join(found), stacklevel=2)
        return None

    def prune(self, retention: Retention, current: Optional[int] = None) -> list[CheckpointRef]:
        """Delete what the retention policy drops (see Retention.to_delete for ``current``), and
        partial folders older than the newest complete one."""
        refs = self.list_complete()
        doomed = retention.to_delete(refs, current)
        for ref in doomed:
            self.storage.remove_dir(ref.name)
        if refs:
            complete = {ref.name for ref in refs}
            for name in self.storage.list_names():
                match = STEP_DIR.match(name)
                if match and name not in complete and int(match.group(1)) < refs[-1].step:
                    self.storage.remove_dir(name)  # a save that crashed before its manifest
        return doomed
