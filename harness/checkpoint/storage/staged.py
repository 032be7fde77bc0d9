"""Stage checkpoints on a fast local folder, upload them to the real destination behind the loop.

``checkpoint.staging_dir`` puts a :class:`StagedStorage` under the :class:`harness.checkpoint.store.CheckpointStore`:
a commit returns once its files are durable in the staging folder (fast: what matters inside a
preemption's grace window), and one background thread uploads them, in the order they were written,
to ``checkpoint.dir`` (usually ``s3://...``). ``flush()`` waits for the uploads and raises the first
failure; the session calls it before it exits (preemption, end of training, close).

Why the remote stays crash-consistent:

- One uploader, first in first out: a checkpoint's payload is published before its manifest, so the
  manifest-last protocol of :mod:`harness.checkpoint.store` holds on the remote as it does locally.
- If an upload fails, nothing after it in the queue runs, and nothing new is queued until the error
  has been raised by the next ``flush()`` or ``write()`` (no manifest over a missing payload, no
  deletion of an older checkpoint that the failed one was to replace); what was not uploaded stays
  in the staging folder. Independently of timing, a manifest is uploaded only after every file it
  lists has been uploaded, with the checksum it lists: by this uploader, or by the ranks of a
  sharded strategy, each uploading its own shards before rank 0 records them (``published_elsewhere``).
- Retention's deletions are queued behind the uploads, and a checkpoint leaves the remote (and the
  staging folder) only once a newer one is complete on the remote: the remote never loses its
  newest checkpoint to a prune. A pruned checkpoint whose upload has not started is not uploaded at
  all; one whose upload has started is finished first (cancelling it could leave the remote with
  nothing new for as long as uploads lag behind saves), then deleted.
- The staging folder keeps what is not yet uploaded plus the newest uploaded checkpoint (for a fast
  local resume when the machine survives); older uploaded copies are deleted as soon as a newer
  checkpoint is fully uploaded.
- On construction, checkpoints complete in the staging folder but missing or different on the remote
  (a crash between the local commit and the end of its upload) are queued for upload again, payload
  first, manifest last.

The uploader thread starts at the first ``write()``, ``remove_dir()`` or ``flush()`` and ends
whenever the queue is empty, so a process that only reads (a tool, a rank other than 0 handed a
StagedStorage) never uploads or deletes, and never races the writer over the same staging folder.

Uploads are not retried here: the remote's client already retries transient errors (botocore, s3fs).
"""

from __future__ import annotations

import os
import threading
import traceback
import logging
from collections import deque
from dataclasses import dataclass
from typing import IO, Callable, Optional, TypeVar

from harness.checkpoint import checksum
from harness.checkpoint import manifest as manifests
from harness.checkpoint.layout import HASH_CHUNK, MANIFEST_NAME, STEP_DIR
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.storage import Storage

UPLOAD = "upload"  # one file we wrote: copy it to the remote
RECOVER = "recover"  # a checkpoint found complete in the staging folder at start: upload what is missing
REMOVE = "remove"  # retention dropped a checkpoint: delete it remotely, then locally

T = TypeVar("T")

log = logging.getLogger("harness")


@dataclass(frozen=True)
class _Task:
    kind: str
    rel: str  # a file for UPLOAD, a checkpoint folder for RECOVER and REMOVE
    checksum: Optional[str] = None  # UPLOAD: what the local write produced, checked against the upload

    @property
    def folder(self) -> str:
        return _folder(self.rel)


class StagedStorage:
    """The :class:`harness.checkpoint.storage.Storage` protocol: write to ``local``, upload to ``remote`` behind.

    ``root`` is the remote's (messages and resume name where checkpoints end up). Reads see both
    sides: ``list_names()`` is their union, and a file is read from the staging folder when its
    checkpoint is complete there (manifest present), else from the remote.

    Failure modes: ``write()`` raises the local write's error as LocalStorage does, and first raises
    (as CheckpointError) an upload failure not yet reported; ``flush()`` raises that failure once.
    Removals are queued, so ``remove_dir()`` of a missing folder is not an error.
    """

    def __init__(self, local: LocalStorage, remote: Storage):
        self.local = local
        self.remote = remote
        self.root = remote.root
        self._lock = threading.Condition()  # guards every attribute below; the uploader waits on it
        self._queue: deque[_Task] = deque()
        self._active: Optional[_Task] = None
        self._error: Optional[CheckpointError] = None
        self._removing: set[str] = set()  # folders with a queued or running REMOVE
        self._uploaded: set[str] = set()  # folders fully on the remote whose local copy is still here
        self._published: dict[str, str] = {}  # file -> named checksum of what this process uploaded
        self._newest_uploaded = -1  # step of the newest checkpoint this process saw complete remotely
        self._thread: Optional[threading.Thread] = None
        self._queue.extend(_Task(RECOVER, name) for name in self._complete_locally())

    # ----- writing --------------------------------------------------------------------------------
    def write(self, rel: str, fill: Callable[[IO[bytes]], None],
              algorithm: str = checksum.DEFAULT) -> tuple[int, str]:
        """Write ``rel`` to the staging folder (atomic, durable) and queue its upload."""
        self._claim(_folder(rel), rel)
        size, digest = self.local.write(rel, fill, algorithm)
        with self._lock:
            self._enqueue(_Task(UPLOAD, rel, digest))
        return size, digest

    def claim(self, folder: str) -> None:
        """Make checkpoint folder ``folder`` ready for files written beside this object (a sharded
        strategy's ranks write into ``local`` themselves): a queued removal of it finishes first,
        its queued uploads are dropped (the files change), and it no longer counts as uploaded.
        Raises, as ``write()`` does, an upload failure not yet reported."""
        self._claim(folder, None)

    def _claim(self, folder: str, rel: Optional[str]) -> None:
        with self._lock:
            self._raise_failure()
            if folder in self._removing:  # rewriting a pruned step: let its removal finish first
                self._start()
                self._lock.wait_for(lambda: folder not in self._removing)
            self._uploaded.discard(folder)  # the local copy changes: no longer redundant
            if rel is None or any(task.rel == rel or (task.kind == RECOVER and task.folder == folder)
                                  for task in self._queue):  # rewriting a queued checkpoint: its new
                self._drop(lambda task: task.folder == folder)  # files are queued again, in order
            if rel is None:  # a claimed folder's files are all new: each must be published again
                for done in [done for done in self._published if _folder(done) == folder]:
                    del self._published[done]

    def published_elsewhere(self, uploaded: dict[str, str]) -> None:
        """Record files that other writers (every rank of a sharded strategy, each uploading its
        own shards) put on the remote themselves, ``{rel: named checksum}``, after ``claim()`` of
        their folder: a manifest listing them may then be uploaded (manifest last, see
        ``_check_files_published``). The caller vouches that each upload completed with that checksum."""
        with self._lock:
            self._published.update(uploaded)

    def remove_dir(self, rel: str) -> None:
        """Queue the deletion of a checkpoint folder, remotely then locally, behind the uploads
        already queued. If its upload has not started, it is cancelled; a started one finishes."""
        with self._lock:
            if rel in self._removing or self._error is not None:
                return  # queued already, or refused after a failure (pruned again later)
            started = any(_folder(done) == rel for done in self._published) or (
                self._active is not None and self._active.kind != REMOVE and self._active.folder == rel)
            if not started:  # once started, an upload is finished: cancelling it could starve the
                self._drop(lambda task: task.folder == rel)  # remote when uploads lag behind saves
            self._removing.add(rel)
            self._enqueue(_Task(REMOVE, rel))

    def flush(self) -> None:
        """Wait until every queued upload and removal is done; raise the first failure (once)."""
        with self._lock:
            if self._queue:
                self._start()
            self._lock.wait_for(lambda: not self._queue and self._active is None)
            self._raise_failure()

    @property
    def pending(self) -> int:
        """Uploads and removals queued or running (never blocks on them)."""
        with self._lock:
            return len(self._queue) + (self._active is not None)

    # ----- reading: the union of both sides -------------------------------------------------------
    def list_names(self) -> list[str]:
        """Names on either side, minus folders whose removal is queued (they are deleted already,
        as far as the caller is concerned)."""
        names = set(self.local.list_names()) | set(self.remote.list_names())
        with self._lock:
            names -= self._removing
        return sorted(names)

    def read_bytes(self, rel: str) -> bytes:
        return self._read(rel, self.local.read_bytes, self.remote.read_bytes)

    def open_read(self, rel: str) -> IO[bytes]:
        return self._read(rel, self.local.open_read, self.remote.open_read)

    def size(self, rel: str) -> int:
        return self._read(rel, self.local.size, self.remote.size)

    def local_path(self, rel: str) -> Optional[str]:
        """The staged file when its checkpoint is complete in the staging folder, else the remote's
        answer (None for object stores)."""
        path = self.local.local_path(rel)
        if self._complete_here(rel) and path is not None and os.path.exists(path):
            return path
        return self.remote.local_path(rel)

    def _read(self, rel: str, local: Callable[[str], T], remote: Callable[[str], T]) -> T:
        """Staged copy first when its checkpoint is complete there; else the remote, then whatever
        the staging folder has (a partial not uploaded yet). FileNotFoundError when neither has it."""
        if self._complete_here(rel):
            try:
                return local(rel)
            except FileNotFoundError:  # deleted meanwhile by the uploader: it is on the remote
                pass
        try:
            return remote(rel)
        except FileNotFoundError:
            return local(rel)

    def _complete_here(self, rel: str) -> bool:
        return os.path.exists(os.path.join(self.local.root, _folder(rel), MANIFEST_NAME))

    def _complete_locally(self) -> list[str]:
        """Checkpoint folders with a manifest in the staging folder, oldest first."""
        found = [name for name in self.local.list_names() if STEP_DIR.match(name)]
        return sorted((name for name in found if self._complete_here(name)), key=_step)

    # ----- the queue (caller side) ----------------------------------------------------------------
    def _enqueue(self, task: _Task) -> None:
        """Queue a task, unless a failure is waiting to be reported: then nothing new is uploaded
        (in particular no manifest whose payload just failed); it stays staged. Caller holds the lock."""
        if self._error is not None:
            return
        self._queue.append(task)
        self._start()

    def _drop(self, doomed: Callable[[_Task], bool]) -> None:
        """Remove queued (not running) tasks; caller holds the lock."""
        kept = [task for task in self._queue if not doomed(task)]
        self._queue = deque(kept)

    def _start(self) -> None:
        """Start the uploader unless it is running; caller holds the lock."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"harness-upload:{self.root}",
                                            daemon=True)  # flush() is what waits for it
            self._thread.start()

    def _raise_failure(self) -> None:
        """Raise, once, the upload failure not yet reported; caller holds the lock."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ----- the uploader thread --------------------------------------------------------------------
    def _run(self) -> None:
        """Work through the queue, then end (the next submission starts a new thread), so no idle
        thread outlives the work or keeps this object alive."""
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._thread = None  # under the lock: a write() now starts a new thread
                        return
                    task = self._active = self._queue.popleft()
                try:
                    self._perform(task)
                except BaseException as error:  # even SystemExit in this thread: flush() must learn it
                    self._fail(task, error)
                finally:
                    with self._lock:
                        self._active = None
                        self._lock.notify_all()
        finally:  # however the thread ends, a later write() or flush() must not wait for it
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                self._lock.notify_all()

    def _perform(self, task: _Task) -> None:
        if task.kind == UPLOAD:
            self._upload(task.rel, task.checksum)
            if os.path.basename(task.rel) == MANIFEST_NAME:
                self._uploaded_checkpoint(task.folder)
        elif task.kind == RECOVER:
            self._recover(task.rel)
        else:
            self._remove(task.rel)

    def _fail(self, task: _Task, error: BaseException) -> None:
        """Record the first failure and cancel everything queued behind it (see the module doc)."""
        where = f"{self.root}/{task.rel}"
        action = "delete" if task.kind == REMOVE else "upload"
        failure = CheckpointError(
            f"could not {action} {where} (staged in {self.local.root}/{task.rel}): "
            f"{type(error).__name__}: {error}; the staged checkpoints are kept and uploaded again "
            "when the run restarts. HINT: check that checkpoint.dir is writable (credentials, "
            "permissions, space) and reachable")
        # Not chained with `from`: CheckpointStore.commit reports the innermost OSError of a chain,
        # which would hide this message (which file, which remote). The traceback rides as a note.
        failure.add_note("the upload's error:\n" + "".join(traceback.format_exception(error)).rstrip())
        with self._lock:
            if self._error is None:
                self._error = failure
            self._queue.clear()
            self._removing.clear()  # the cancelled removals: listed again, pruned again later

    def _upload(self, rel: str, expected: Optional[str]) -> None:
        """Stream the staged file to the remote in chunks; check it was read as it was written
        (``expected``: its named checksum, whose algorithm the upload hashes with)."""
        if os.path.basename(rel) == MANIFEST_NAME:
            self._check_files_published(rel)
        digest = publish(self.local, self.remote, rel, expected)
        with self._lock:
            self._published[rel] = digest

    def _check_files_published(self, manifest_rel: str) -> None:
        """Manifest last: refuse to publish a manifest before every file it lists is on the remote."""
        folder = _folder(manifest_rel)
        files = manifests.entries(manifests.parse(self.local.read_bytes(manifest_rel)))
        with self._lock:
            missing = [name for name, (_, expected) in sorted(files.items())
                       if self._published.get(f"{folder}/{name}") != expected]
        if missing:
            raise CheckpointError(f"not uploading {self.local.root}/{manifest_rel}: its "
                                  f"{', '.join(missing)} did not reach {self.root}/{folder}")

    def _recover(self, folder: str) -> None:
        """Upload a checkpoint found complete in the staging folder unless the remote has it already:
        its payload files (checked against the manifest), then the manifest."""
        manifest_rel = f"{folder}/{MANIFEST_NAME}"
        try:
            encoded = self.local.read_bytes(manifest_rel)
        except FileNotFoundError:
            return  # pruned before its turn came
        except OSError as error:  # e.g. a manifest that is a symbolic link: never followed
            log.warning(f"not uploading {self.local.root}/{folder}: unreadable manifest ({error})")
            return
        try:  # the same rules as a resume's (harness.checkpoint.manifest): what it would skip, we do not publish
            manifest = manifests.parse(encoded)
            files = manifests.entries(manifest)
        except manifests.UnusableManifest as error:  # a manifest naming "../x" or "/etc/x" among them
            log.warning(f"not uploading {self.local.root}/{folder}: unusable manifest ({error})")
            return
        if manifest["step"] != _step(folder):
            log.warning(f"not uploading {self.local.root}/{folder}: its manifest is of step {manifest['step']}")
            return
        if not self._on_remote(folder, encoded, files):
            for name, (_, expected) in sorted(files.items()):
                try:
                    self._upload(f"{folder}/{name}", expected)
                except CheckpointError as error:  # damaged in the staging folder: never publish it
                    log.warning(f"not uploading {self.local.root}/{folder}: {error}")
                    return
                except FileNotFoundError:  # a shard another node's rank staged: never publish without it
                    log.warning(f"not uploading {self.local.root}/{folder}: its {name} is not in this "
                                "staging folder (staged on another node?); the remote keeps its earlier checkpoints")
                    return
            self._upload(manifest_rel, checksum.of_bytes(encoded))
        self._uploaded_checkpoint(folder)

    def _on_remote(self, folder: str, manifest: bytes, files: dict[str, tuple[int, str]]) -> bool:
        """Whether the remote holds this very checkpoint: the same manifest and files of its sizes."""
        try:
            if self.remote.read_bytes(f"{folder}/{MANIFEST_NAME}") != manifest:
                return False
            return all(self.remote.size(f"{folder}/{name}") == size for name, (size, _) in files.items())
        except FileNotFoundError:
            return False

    def _uploaded_checkpoint(self, folder: str) -> None:
        """A checkpoint is complete on the remote: staged copies of older uploaded ones can go."""
        with self._lock:
            self._uploaded.add(folder)
            self._newest_uploaded = max(self._newest_uploaded, _step(folder))
            for name in sorted(self._uploaded):
                if _step(name) < self._newest_uploaded:
                    self._remove_local(name)  # under the lock: a write() to it cannot interleave

    def _remove(self, folder: str) -> None:
        """Delete a pruned checkpoint remotely, then locally, once a newer checkpoint is complete on
        the remote. Until then it may be the remote's newest: the removal waits behind a newer
        upload still queued, or, with none left (one failed), is dropped and the folder kept on both
        sides, listed again and pruned again later."""
        step = _step(folder)
        with self._lock:
            if self._newest_uploaded <= step and any(
                    task.kind != REMOVE and _step(task.folder) > step for task in self._queue):
                self._queue.append(_Task(REMOVE, folder))  # again, behind that upload
                return
        if not self._newer_on_remote(step):
            with self._lock:
                self._removing.discard(folder)
            return
        try:
            self.remote.remove_dir(folder)
        except FileNotFoundError:  # never uploaded (cancelled, or only ever staged)
            pass
        with self._lock:
            self._remove_local(folder)
            for rel in [rel for rel in self._published if _folder(rel) == folder]:
                del self._published[rel]
            self._removing.discard(folder)

    def _newer_on_remote(self, step: int) -> bool:
        """Whether a checkpoint newer than ``step`` is complete on the remote."""
        with self._lock:
            if self._newest_uploaded > step:
                return True
        for name in self.remote.list_names():  # checkpoints uploaded by an earlier process
            if _step(name) > step:
                try:
                    self.remote.size(f"{name}/{MANIFEST_NAME}")
                    return True
                except FileNotFoundError:
                    continue
        return False

    def _remove_local(self, folder: str) -> None:
        """Delete a staged folder; caller holds the lock."""
        self._uploaded.discard(folder)
        try:
            self.local.remove_dir(folder)
        except FileNotFoundError:
            pass


def publish(local: LocalStorage, remote: Storage, rel: str, expected: Optional[str]) -> str:
    """Copy the staged file ``rel`` to the remote, streamed in chunks (the object exists only once
    complete); returns its named checksum. Raises CheckpointError when the file was not read as it
    was written (``expected``: its named checksum, whose algorithm the upload hashes with), the
    local or remote storage's errors otherwise (FileNotFoundError: not staged here)."""
    algorithm = checksum.algorithm_of(expected) if expected else checksum.DEFAULT
    with local.open_read(rel) as source:
        _, digest = remote.write(rel, lambda handle: _copy(source, handle), algorithm)
    if expected is not None and digest != expected:
        raise CheckpointError(f"{local.root}/{rel} changed after it was written "
                              f"(read as {digest}, written as {expected})")
    return digest


def _folder(rel: str) -> str:
    return rel.split("/", 1)[0]


def _step(folder: str) -> int:
    match = STEP_DIR.match(folder)
    return int(match.group(1)) if match else -1


def _copy(source: IO[bytes], target: IO[bytes]) -> None:
    while chunk := source.read(HASH_CHUNK):
        target.write(chunk)
