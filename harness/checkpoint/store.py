"""Commit, find, verify and prune checkpoints: the manifest-last protocol over a Storage.

A checkpoint without a valid manifest does not exist: a crash at any instant leaves either the old
set of checkpoints or the old set plus one complete new one. "Latest" is found by scanning for
manifests; nothing else (no pointer file) is trusted. Retention is computed from what is on disk,
so it survives restarts, and runs only after a new checkpoint is committed. A folder counts as a
crashed partial save only when its manifest is provably absent; an unreadable manifest (I/O error,
throttling, a newer format) keeps the folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Optional

from harness.checkpoint import checksum
from harness.checkpoint.layout import PAYLOAD_NAME, CheckpointRef, manifest_path, step_dir_name, step_of
from harness.checkpoint.errors import CheckpointError, write_hint
from harness.checkpoint.storage import Storage

log = logging.getLogger("harness")

MANIFEST_FORMAT = "harness.manifest"
MANIFEST_VERSION = 1


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


def _root_os_error(error: BaseException) -> BaseException:
    """The OSError (ENOSPC, EROFS, ...) behind an error, if there is one."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return error


class CheckpointStore:
    """Commit, find, verify and prune the checkpoints of one run folder."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @property
    def root(self) -> str:
        return self.storage.root

    def commit(self, step: int, fill: Callable[[IO[bytes]], None], info: dict,
               payload_name: str = PAYLOAD_NAME) -> CheckpointRef:
        """Write the payload file ``payload_name``, then the manifest that makes it exist. ``info``
        goes into the manifest.

        On failure (full disk, read-only folder, ...) raises CheckpointError naming the folder; no
        existing checkpoint is touched, and the partial one has no manifest so it does not exist.
        """
        name = step_dir_name(step)
        started = time.perf_counter()
        try:
            size, digest = self.storage.write(f"{name}/{payload_name}", fill)
            manifest = {
                "format": MANIFEST_FORMAT,
                "format_version": MANIFEST_VERSION,
                "step": step,
                "files": {payload_name: checksum.file_entry(size, digest)},
                "created_unix": time.time(),
                "write_s": round(time.perf_counter() - started, 4),
                **info,
            }
            encoded = json.dumps(manifest, indent=1, sort_keys=True).encode()
            self.storage.write(manifest_path(name), lambda handle: handle.write(encoded))
        except (OSError, RuntimeError) as error:  # torch.save turns a failed write into RuntimeError
            error = _root_os_error(error)
            previous = self.latest_listed()
            kept = f"the previous checkpoint (step {previous.step}) is intact" if previous else \
                "no earlier checkpoint exists"
            raise CheckpointError(
                f"could not write checkpoint step {step} to {self.root}/{name}: {error}; {kept}. "
                f"{write_hint(error)}") from error
        return CheckpointRef(step=step, name=name, manifest=manifest)

    def _read_manifest(self, name: str) -> tuple[Optional[dict], bool]:
        """(manifest, absent): the parsed manifest, or None with ``absent`` True only when the file
        provably does not exist. Any other failure (I/O error, throttling, bad JSON, another format
        version) is warned about and is NOT absence: such a folder is neither loaded nor deleted."""
        try:
            manifest = json.loads(self.storage.read_bytes(manifest_path(name)))
        except FileNotFoundError:
            return None, True
        except (OSError, ValueError) as error:
            log.warning("ignoring checkpoint %s/%s for now: unreadable manifest (%s)", self.root, name, error)
            return None, False
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
                or manifest.get("format_version") != MANIFEST_VERSION:
            found = manifest if not isinstance(manifest, dict) else \
                f"{manifest.get('format')!r} v{manifest.get('format_version')!r}"
            log.warning("ignoring checkpoint %s/%s: manifest format %s is not %s v%s (kept on disk)",
                        self.root, name, found, MANIFEST_FORMAT, MANIFEST_VERSION)
            return None, False
        return manifest, False

    def scan(self) -> tuple[list[CheckpointRef], list[str]]:
        """(complete checkpoints oldest first, folders whose manifest is provably absent)."""
        refs, partial = [], []
        for name in self.storage.list_names():
            step = step_of(name)
            if step is None:
                continue
            manifest, absent = self._read_manifest(name)
            if manifest is not None:
                refs.append(CheckpointRef(step=step, name=name, manifest=manifest))
            elif absent:
                partial.append(name)
        return sorted(refs, key=lambda ref: ref.step), partial

    def list_complete(self) -> list[CheckpointRef]:
        """Every checkpoint whose manifest exists and parses, oldest first (no checksum work)."""
        return self.scan()[0]

    def latest_listed(self) -> Optional[CheckpointRef]:
        refs = self.list_complete()
        return refs[-1] if refs else None

    def problems(self, ref: CheckpointRef, verify: bool = True) -> list[str]:
        """What is wrong with a checkpoint's files compared to its manifest (empty: it is valid)."""
        found = []
        for rel, entry in ref.manifest.get("files", {}).items():
            path = f"{ref.name}/{rel}"
            recorded = checksum.expected(entry)
            try:
                size = self.storage.size(path)
            except FileNotFoundError:
                found.append(f"{path}: missing")
                continue
            if size != entry["bytes"]:
                found.append(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated?)")
            elif verify and self.checksum(path, recorded) != recorded:
                found.append(f"{path}: {checksum.algorithm_of(recorded)} differs from the manifest (corrupted)")
        return found

    def checksum(self, rel: str, like: str = checksum.DEFAULT) -> str:
        """The named checksum of a file, with the algorithm of ``like`` (a named checksum or an
        algorithm's name)."""
        path = self.storage.local_path(rel)
        if path is not None:
            return checksum.of_file(path, checksum.algorithm_of(like))
        with self.storage.open_read(rel) as handle:
            return checksum.of_stream(handle, checksum.algorithm_of(like))

    def latest_valid(self, verify: bool = True) -> Optional[CheckpointRef]:
        """The newest checkpoint that passes verification; corrupt newer ones are skipped with a warning."""
        for ref in reversed(self.list_complete()):
            found = self.problems(ref, verify=verify)
            if not found:
                return ref
            log.warning("skipping corrupt checkpoint %s/%s: %s", self.root, ref.name, "; ".join(found))
        return None

    def prune(self, retention: Retention, current: Optional[int] = None) -> list[CheckpointRef]:
        """Delete what the retention policy drops (see Retention.to_delete for ``current``), and
        partial folders (manifest provably absent) older than the newest complete one.

        Pruning never fails a run: a folder that cannot be deleted now (NFS silly-renamed files of a
        memory-mapped payload, a transient error) is warned about and retried at the next prune.
        Returns the checkpoints actually deleted.
        """
        refs, partial = self.scan()
        doomed = retention.to_delete(refs, current)
        deleted = [ref for ref in doomed if self._remove(ref.name)]
        if refs:
            for name in partial:
                if step_of(name) < refs[-1].step:
                    self._remove(name)  # a save that crashed before its manifest
        return deleted

    def _remove(self, name: str) -> bool:
        try:
            self.storage.remove_dir(name)
        except OSError as error:
            log.warning("could not delete old checkpoint %s/%s now (%s); will retry at the next save",
                        self.root, name, error)
            return False
        return True
