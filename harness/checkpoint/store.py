"""Commit, find, verify and prune checkpoints: the manifest-last protocol over a Storage.

A checkpoint without a valid manifest does not exist: a crash at any instant leaves either the old
set of checkpoints or the old set plus one complete new one. "Latest" is found by scanning for
manifests; nothing else (no pointer file) is trusted. Retention is computed from what is on disk,
so it survives restarts, and runs only after a new checkpoint is committed. A folder counts as a
crashed partial save only when its manifest is provably absent; an unreadable manifest (I/O error,
throttling, a newer format, a step other than its folder's name) keeps the folder and is never
loaded: the previous checkpoint is used instead.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Optional, TypeVar

from harness.checkpoint import checksum, flat
from harness.checkpoint import manifest as manifests
from harness.checkpoint.layout import (MANIFEST_NAME, PAYLOAD_NAME, CheckpointRef, is_checkpoint_folder,
                                       is_inside_folder, manifest_path, step_dir_name, step_of)
from harness.checkpoint.errors import CheckpointError, write_hint
from harness.checkpoint.manifest import UnusableManifest
from harness.checkpoint.storage import Storage
from harness.checkpoint.storage.local import LocalStorage, fsync_dir

log = logging.getLogger("harness")
T = TypeVar("T")

# A read that fails with an I/O error (a throttled or briefly unreachable store) is tried this many
# times in all, waiting RETRY_WAIT_S, then twice that, in between; only then does the error count.
# Without retries a blink while choosing the checkpoint to resume would skip the newest one.
READ_ATTEMPTS = 3
RETRY_WAIT_S = 0.5
# Errors that say the path is of the wrong kind: no retry changes them.
LASTING_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def retried(read: Callable[[], T], what: str) -> T:
    """``read()``, tried again after an OSError that may pass; FileNotFoundError (a provably absent
    file) and errors of the path's kind are raised at once, as is the last attempt's error."""
    wait = RETRY_WAIT_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except LASTING_ERRORS:
            raise
        except OSError as error:
            if attempt == READ_ATTEMPTS:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, error, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")  # the loop returns or raises

MANIFEST_FORMAT = manifests.FORMAT
MANIFEST_VERSION = manifests.VERSION

# The state of a step_* folder (python -m harness.ckpt verify prints them).
OK = "OK"  # its files match its manifest
CORRUPT = "CORRUPT"  # a file is missing, truncated, altered, unreadable or not a regular file
INCOMPLETE = "INCOMPLETE"  # no manifest: a save in progress, or one that crashed
UNUSABLE = "UNUSABLE"  # a manifest that cannot be trusted (unreadable, another version, bad entries,
# another step than the folder's name says): never loaded, counted by retention, or deleted


@dataclass(frozen=True)
class FolderReport:
    """What ``CheckpointStore.examine`` found in one folder: its state, why (each detail starts with
    the path it is about, relative to the run folder), and the checkpoint if its manifest is usable."""

    name: str
    state: str
    details: tuple[str, ...] = ()
    ref: Optional[CheckpointRef] = None


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


def _checked_extra_files(written: dict[str, dict], payload_name: str) -> dict[str, dict]:
    """A copy of ``written`` (see CheckpointStore.commit), its names checked."""
    bad = [name for name in written if not is_inside_folder(name) or name in (payload_name, MANIFEST_NAME)]
    if bad:
        raise ValueError(f"files {bad} cannot be listed in a manifest: names must be inside the "
                         f"checkpoint folder and differ from {payload_name} and {MANIFEST_NAME}")
    return dict(written)


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
               payload_name: str = PAYLOAD_NAME, written: Optional[dict[str, dict]] = None) -> CheckpointRef:
        """Write the payload file ``payload_name``, then the manifest that makes it exist. ``info``
        goes into the manifest.

        ``written``: files other ranks (or this one) already wrote into the checkpoint folder and made
        durable (a sharded strategy's ``shards/...``), ``{name inside the folder: checksum.file_entry}``;
        the manifest lists them with the payload. Raises ValueError for a name outside the folder or
        one that collides with the payload or the manifest.

        On failure (full disk, read-only folder, ...) raises CheckpointError naming the folder; no
        existing checkpoint is touched, and the partial one has no manifest so it does not exist.
        """
        name = step_dir_name(step)
        files = _checked_extra_files(written or {}, payload_name)
        started = time.perf_counter()
        try:
            size, digest = self.storage.write(f"{name}/{payload_name}", fill)
            files[payload_name] = checksum.file_entry(size, digest)
            manifest = manifests.build(step, files, time.perf_counter() - started, info)
            encoded = manifests.encode(manifest)
            self.storage.write(manifest_path(name), lambda handle: handle.write(encoded))
        except (OSError, RuntimeError) as error:  # torch.save turns a failed write into RuntimeError
            error = _root_os_error(error)
            raise CheckpointError(
                f"could not write checkpoint step {step} to {self.root}/{name}: {error}; "
                f"{self._what_is_kept()}. {write_hint(error)}") from error
        return CheckpointRef(step=step, name=name, manifest=manifest)

    def open_folder(self, step: int, subfolder: str) -> str:
        """The local path of ``<step folder>/<subfolder>``, empty and ready for other writers (a
        sharded strategy's ranks), with the step folder NOT a checkpoint while they write: a manifest
        left there (a complete or unusable checkpoint of the same step, e.g. one whose resume fell
        back to an older step) is removed first, then the subfolder. Rank 0 calls it before the
        ranks write; a crash at any instant leaves a folder without manifest, which does not exist.
        Raises CheckpointError for storage without local paths."""
        name = step_dir_name(step)
        folder = self.storage.local_path(f"{name}/{subfolder}")
        if folder is None:
            raise CheckpointError(f"{self.root} has no local path: sharded checkpoints need a local or "
                                  "shared filesystem folder")
        try:
            os.unlink(self.storage.local_path(manifest_path(name)))
            fsync_dir(os.path.dirname(folder))
            log.warning("replacing checkpoint %s/%s of the same step", self.root, name)
        except FileNotFoundError:
            pass
        if os.path.islink(folder) or os.path.isfile(folder):  # never write through a link
            os.unlink(folder)
        elif os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        return folder

    def make_durable(self, step: int, subfolder: str) -> None:
        """fsync ``<step folder>/<subfolder>``, the step folder and the run folder, so the entries
        of files other writers created there survive a power loss before the manifest names them."""
        name = step_dir_name(step)
        folder = self.storage.local_path(f"{name}/{subfolder}")
        for path in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
            fsync_dir(path)

    def _what_is_kept(self) -> str:
        """For a failed commit's message: the newest earlier checkpoint, if the folder can be listed."""
        try:
            previous = self.latest_listed()
        except OSError as error:  # the message must still report the write's own error
            return f"the earlier checkpoints are untouched (listing them failed too: {error})"
        return f"the previous checkpoint (step {previous.step}) is intact" if previous else \
            "no earlier checkpoint exists"

    def _load_manifest(self, name: str) -> tuple[Optional[dict], Optional[str]]:
        """(manifest, None) for a usable one; (None, None) when it provably does not exist (a save in
        progress or one that crashed); (None, why) when it exists but cannot be trusted: an I/O
        error or throttling, bad JSON, another format version, bad entries (see
        harness.checkpoint.manifest), or a step that is not the one the folder's name says (a copy
        or a link under another name). Such a folder is neither loaded, nor counted, nor deleted."""
        try:
            data = retried(lambda: self.storage.read_bytes(manifest_path(name)),
                           f"reading {self.root}/{manifest_path(name)}")
        except FileNotFoundError:
            return None, None
        except OSError as error:
            return None, f"unreadable manifest ({error})"
        try:
            manifest = manifests.parse(data)
        except UnusableManifest as error:
            return None, f"unusable manifest: {error}"
        named = step_of(name)
        if named is not None and manifest["step"] != named:
            return None, (f"its name says step {named} but its manifest says step {manifest['step']} "
                          "(a copy or a link under another name?)")
        return manifest, None

    def scan(self) -> tuple[list[CheckpointRef], list[str]]:
        """(complete checkpoints oldest first, folders whose manifest is provably absent). Folders
        whose manifest cannot be trusted are in neither list, with a warning. Raises OSError when
        the run folder cannot be listed."""
        refs, partial = [], []
        for name in retried(self.storage.list_names, f"listing {self.root}"):
            step = step_of(name)
            if step is None:
                continue
            manifest, unusable = self._load_manifest(name)
            if manifest is not None:
                refs.append(CheckpointRef(step=step, name=name, manifest=manifest))
            elif unusable is None:
                partial.append(name)
            else:
                log.warning("ignoring checkpoint %s/%s: %s (kept on disk)", self.root, name, unusable)
        return sorted(refs, key=lambda ref: ref.step), partial

    def list_complete(self) -> list[CheckpointRef]:
        """Every checkpoint whose manifest exists and parses, oldest first (no checksum work)."""
        return self.scan()[0]

    def latest_listed(self) -> Optional[CheckpointRef]:
        refs = self.list_complete()
        return refs[-1] if refs else None

    def newest_complete(self) -> Optional[CheckpointRef]:
        """The newest checkpoint whose manifest parses, found newest first and without logging
        (a read-ahead's guess; ``list_complete`` with its warnings is what a resume goes by)."""
        names = sorted((name for name in self.storage.list_names() if step_of(name) is not None),
                       key=step_of, reverse=True)
        for name in names:
            manifest, _ = self._load_manifest(name)
            if manifest is not None:
                return CheckpointRef(step=step_of(name), name=name, manifest=manifest)
        return None

    def examine(self, name: str, verify: bool = True) -> FolderReport:
        """The state of one checkpoint folder (see FolderReport), without logging."""
        manifest, unusable = self._load_manifest(name)
        if manifest is not None:
            ref = CheckpointRef(step=manifest["step"], name=name, manifest=manifest)
            found = self.problems(ref, verify=verify)
            return FolderReport(name, CORRUPT if found else OK, tuple(found), ref)
        if unusable is not None:
            return FolderReport(name, UNUSABLE, (f"{manifest_path(name)}: {unusable}",))
        return FolderReport(name, INCOMPLETE, (f"{name}: no {MANIFEST_NAME}: a save in progress, or one that crashed",))

    def examine_all(self, verify: bool = True) -> list[FolderReport]:
        """The state of every ``step_*`` folder, oldest step first."""
        names = sorted((name for name in self.storage.list_names() if step_of(name) is not None), key=step_of)
        return [self.examine(name, verify) for name in names]

    def problems(self, ref: CheckpointRef, verify: bool = True,
                 only: Optional[Callable[[str], bool]] = None,
                 mapped: Optional[dict[str, mmap.mmap]] = None) -> list[str]:
        """What is wrong with a checkpoint's files compared to its manifest (empty: it is valid).
        ``only``: check just the files (names relative to the checkpoint folder) it accepts, so
        several ranks can split the work; the manifest's own entries are checked by every caller.
        ``mapped``: for a resume, which loads the payload next: a local flat payload is verified
        through a memory map, left in ``mapped[<its path>]`` when it verifies, which the load then
        reuses (``checksum.of_mapped_file``: the file is read once instead of twice).

        Never raises for a damaged checkpoint: an unusable manifest entry, a missing, unreadable or
        non-regular file (a symbolic link is not followed), a size or checksum (``verify``) that
        differs, or a flat payload whose header does not describe the file (checked even without
        ``verify``: it reads only the header) are each reported as a problem.
        """
        try:
            files = manifests.entries(ref.manifest)
        except UnusableManifest as error:
            return [f"{manifest_path(ref.name)}: {error}"]
        found = []
        for rel, (recorded_size, recorded) in files.items():
            if only is not None and not only(rel):
                continue
            path = f"{ref.name}/{rel}"
            try:
                problem = retried(lambda: self._file_problem(path, recorded_size, recorded, verify, mapped),
                                  f"reading {self.root}/{path}")
            except FileNotFoundError:
                problem = f"{path}: missing"
            except OSError as error:
                problem = f"{path}: unreadable ({error})"
            if problem:
                found.append(problem)
        return found

    def _file_problem(self, path: str, recorded_size: int, recorded: str, verify: bool,
                      mapped: Optional[dict[str, mmap.mmap]] = None) -> Optional[str]:
        size = self.storage.size(path)
        if size != recorded_size:
            return f"{path}: {size} bytes, manifest says {recorded_size} (truncated?)"
        if verify and self._verified_checksum(path, recorded, mapped) != recorded:
            return f"{path}: {checksum.algorithm_of(recorded)} differs from the manifest (corrupted)"
        if path.rsplit("/", 1)[-1] == PAYLOAD_NAME:
            with self.storage.open_read(path) as handle:
                try:
                    flat.check(handle, size)
                except flat.BadHeader as error:
                    return f"{path}: bad safetensors header: {error} (corrupted)"
        return None

    def _verified_checksum(self, rel: str, recorded: str, mapped: Optional[dict[str, mmap.mmap]]) -> str:
        """``checksum(rel)``; a local flat payload with ``mapped`` given is hashed through a map of it,
        kept in ``mapped[rel]`` only when the checksum matches ``recorded``."""
        local = self.storage.local_path(rel)
        if mapped is None or local is None or rel.rsplit("/", 1)[-1] != PAYLOAD_NAME:
            return self.checksum(rel, recorded)
        found, file_map = checksum.of_mapped_file(local, checksum.algorithm_of(recorded))
        if file_map is not None:
            if found == recorded:
                mapped[rel] = file_map
            else:
                file_map.close()
        return found

    def checksum(self, rel: str, like: str = checksum.DEFAULT) -> str:
        """The named checksum of a file, with the algorithm of ``like`` (a named checksum or an
        algorithm's name)."""
        path = self.storage.local_path(rel)
        if path is not None:
            return checksum.of_file(path, checksum.algorithm_of(like))
        with self.storage.open_read(rel) as handle:
            return checksum.of_stream(handle, checksum.algorithm_of(like))

    def latest_valid(self, verify: bool = True, below: Optional[int] = None) -> Optional[CheckpointRef]:
        """The newest checkpoint (of a step below ``below``, if given) that passes verification;
        corrupt newer ones are skipped with a warning."""
        for ref in reversed(self.list_complete()):
            if below is not None and ref.step >= below:
                continue
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
        So is a listing that fails (a throttled S3 ``ls``): the save that asked for this prune is
        committed already, and the next prune tries again. Returns the checkpoints actually deleted.
        """
        try:
            refs, partial = self.scan()
        except OSError as error:
            log.warning("could not list %s to delete old checkpoints now (%s); will retry at the next save",
                        self.root, error)
            return []
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


def newest_whole(store: CheckpointStore, say: Callable[[str], None]) -> Optional[CheckpointRef]:
    """The newest checkpoint whose files are all there at their recorded sizes (as a resume would
    choose, without reading every byte for checksums); ``say`` hears each newer one passed over,
    what is wrong with it, and then which one is used."""
    skipped = False
    for ref in reversed(store.list_complete()):
        found = store.problems(ref, verify=False)
        if not found:
            if skipped:
                say(f"using {store.root}/{ref.name}")
            return ref
        say(f"skipping {store.root}/{ref.name}: {'; '.join(found)}")
        skipped = True
    return None


def local_checkpoint(path: str, say: Callable[[str], None]) -> tuple[CheckpointStore, CheckpointRef]:
    """The checkpoint a local folder names: itself (a ``step_*`` folder or one with a manifest),
    or, for a run's folder, its newest whole one (``say``: see ``newest_whole``). Raises
    CheckpointError, naming what is wrong, for an incomplete checkpoint, one whose files are missing
    or of the wrong size, or a run folder without a whole one."""
    path = path.rstrip("/") or path
    if is_checkpoint_folder(path):
        store = CheckpointStore(LocalStorage(os.path.dirname(os.path.abspath(path))))
        name = os.path.basename(os.path.abspath(path))
        ref = next((r for r in store.list_complete() if r.name == name), None)
        if ref is None:
            raise CheckpointError(f"{path}: no valid {MANIFEST_NAME}, so this checkpoint is incomplete")
        found = store.problems(ref, verify=False)
        if found:
            raise CheckpointError(f"{path}: {'; '.join(found)}. HINT: python -m harness.ckpt verify {path}")
        return store, ref
    store = CheckpointStore(LocalStorage(path))
    ref = newest_whole(store, say)
    if ref is None:
        raise CheckpointError(f"{path}: no complete checkpoint (step_*/{MANIFEST_NAME}) in this folder")
    return store, ref
