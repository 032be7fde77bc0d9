"""Checkpoint storage on an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...), same protocol.

The crash-consistency argument of :mod:`harness.checkpoint.store` carries over because object stores publish an
object only when its upload completes: the payload is uploaded, then the manifest, and a checkpoint
without its manifest does not exist. A process killed mid-upload leaves no visible object (on S3 an
*incomplete multipart upload* remains: invisible, but billed until aborted; give the bucket a lifecycle
rule ``AbortIncompleteMultipartUpload`` so such leftovers expire).

Credentials and endpoints come from each backend's usual configuration, read by fsspec and the
backend, never by the harness:

- s3fs / botocore: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
  ``AWS_DEFAULT_REGION``, and for S3-compatible servers (MinIO, Ceph, moto) ``AWS_ENDPOINT_URL_S3``
  or ``AWS_ENDPOINT_URL``;
- fsspec's own convention for any protocol: ``FSSPEC_<PROTOCOL>_<KWARG>`` (e.g.
  ``FSSPEC_S3_ENDPOINT_URL=http://minio:9000``) or ``FSSPEC_<PROTOCOL>='{json kwargs}'``, or files in
  ``~/.config/fsspec`` (see ``fsspec.config``); these are read when fsspec is imported.

Launched workers inherit the environment, so setting these once where the launcher starts is enough.
"""

from __future__ import annotations

import posixpath
import logging
from typing import IO, Any, Callable, Optional

import fsspec.core
from fsspec.spec import AbstractBufferedFile

from harness.checkpoint.layout import MANIFEST_NAME
from harness.checkpoint import checksum
from harness.checkpoint.storage.local import HashingWriter

log = logging.getLogger("harness")


class FsspecStorage:
    """The :class:`harness.checkpoint.storage.Storage` protocol on any fsspec filesystem.

    Listings and file details are fetched fresh on every call (fsspec backends such as s3fs cache
    them per process, which would hide checkpoints written by another process). Missing files raise
    FileNotFoundError, as :class:`harness.checkpoint.store.CheckpointStore` expects; backend errors (permission,
    network) propagate as the backend raises them, mostly OSError subclasses.
    """

    def __init__(self, root: str, block_size: Optional[int] = None):
        """``root`` is a URL such as ``s3://bucket/runs/exp1``; ``block_size`` is the upload part size
        (None: the backend's default, 50 MiB for s3fs; S3 needs at least 5 MiB).

        Raises ValueError (unknown protocol) or ImportError (backend not installed, e.g. ``pip install
        s3fs``) from fsspec.
        """
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.block_size = block_size

    def _path(self, rel: str) -> str:
        return posixpath.join(self._base, rel)

    def _fresh(self, rel: str) -> str:
        """The backend path of ``rel``, with any cached details of it (and its parents) dropped."""
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        return path

    def list_names(self) -> list[str]:
        """Names of the immediate children of root, sorted; empty when root does not exist."""
        self.fs.invalidate_cache(self._base)
        try:
            entries = self.fs.ls(self._base, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(entry.rstrip("/")) for entry in entries} - {""})

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._fresh(rel))

    def open_read(self, rel: str) -> IO[bytes]:
        return self.fs.open(self._fresh(rel), "rb")

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._fresh(rel)))

    def local_path(self, rel: str) -> Optional[str]:
        return None  # always read through read_bytes/open_read

    def write(self, rel: str, fill: Callable[[IO[bytes]], None],
              algorithm: str = checksum.DEFAULT) -> tuple[int, str]:
        """Stream ``fill``'s bytes to ``rel``; returns (bytes, named checksum) once the object is published.

        The file is opened with ``autocommit=False``, fsspec's contract for "visible only on
        ``commit()``": s3fs uploads a multipart upload in ``block_size`` parts as ``fill`` writes (so
        the payload is never held whole in memory) and completes it in ``commit()``. Until then no
        object exists, so a killed process publishes nothing.

        If ``fill``, the last part's upload or the commit raises, the upload is discarded (S3: the
        multipart upload is aborted) and the error re-raised; an existing object at ``rel`` is left
        as it was. Caveat: backends that ignore ``autocommit`` (``memory://``) show the partial file;
        it has no manifest, so for the checkpoint protocol it still does not exist.
        """
        path = self._path(rel)
        handle = self.fs.open(path, "wb", autocommit=False, **self._open_options())
        try:
            writer = HashingWriter(handle, algorithm)
            fill(writer)
            handle.close()  # uploads the last part; nothing is visible yet
            handle.commit()  # publishes the object
        except BaseException:
            _abandon(handle, self.root, rel)
            raise
        finally:
            self._forget(handle)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return writer.size, writer.checksum

    def _open_options(self) -> dict[str, Any]:
        return {} if self.block_size is None else {"block_size": self.block_size}

    def _forget(self, handle: IO[bytes]) -> None:
        # fsspec's open() queues every autocommit=False file on fs.transaction for a later
        # commit-all, even outside a transaction; we commit ourselves, so drop it from the queue
        # instead of keeping every save's file object alive for the life of the process.
        queued = self.fs.transaction.files
        if any(item is handle for item in queued):
            queued.remove(handle)

    def flush(self) -> None:
        """Nothing is in flight: an object is published when write() returns."""

    def remove_dir(self, rel: str) -> None:
        """Delete a checkpoint folder, its manifest first: a crash midway leaves a manifest-less
        folder (which does not exist and is pruned later), never a manifest over missing data.

        Raises FileNotFoundError when nothing is stored under ``rel``.
        """
        manifest = self._fresh(f"{rel}/{MANIFEST_NAME}")
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        self.fs.rm(self._fresh(rel), recursive=True)
        self.fs.invalidate_cache(self._base)


def _abandon(handle: IO[bytes], root: str, rel: str) -> None:
    """Throw away an unfinished upload without publishing it.

    Not ``close()`` alone: fsspec's buffered files flush and, with autocommit, publish on close,
    which is also what their ``__exit__`` does when an exception leaves a ``with`` block. A failure
    to discard (network down) is reported as a warning so the caller's original error still surfaces.
    """
    try:
        handle.discard()
    except Exception as error:  # the original error matters more; say what may be left over
        log.warning(f"could not discard the partial upload of {root}/{rel} ({error}); it is not "
                      "visible, but an incomplete multipart upload may remain: a bucket lifecycle "
                      "rule AbortIncompleteMultipartUpload removes it", stacklevel=2)
    if isinstance(handle, AbstractBufferedFile):
        handle.closed = True  # so neither close() nor __del__ flushes the discarded buffer
    else:
        handle.close()
