"""A POSIX folder as checkpoint storage: temp name, fsync, rename, fsync the folder."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import IO, Callable, Optional

from harness.checkpoint import checksum
from harness.checkpoint.storage.directio import BufferRing, DirectWriter, open_direct


class HashingWriter:
    """A write-only file object that counts and hashes what passes through it."""

    def __init__(self, raw: IO[bytes], algorithm: str = checksum.DEFAULT):
        self._raw = raw
        self.algorithm = algorithm
        self.hasher = checksum.new(algorithm)
        self.size = 0

    @property
    def checksum(self) -> str:
        return checksum.named(self.algorithm, self.hasher)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        checksum.update(self.hasher, view)
        self.size += view.nbytes
        return self._raw.write(view)

    def flush(self) -> None:
        self._raw.flush()


class LocalStorage:
    """A POSIX folder: temp name, fsync, rename, fsync the folder.

    Payloads go through O_DIRECT (harness.checkpoint.storage.directio) where the filesystem supports it: near the disk's
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

    # Reads open the named file itself: a checkpoint file that is a symbolic link (pointing out of
    # the folder, anywhere) is refused, not followed, and a FIFO or device is refused without
    # waiting on it. The folders on the way are followed: a run folder may live behind a link.
    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as handle:
            return handle.read()

    def open_read(self, rel: str) -> IO[bytes]:
        return os.fdopen(self._open_regular(rel), "rb")

    def size(self, rel: str) -> int:
        path = self._path(rel)
        info = os.lstat(path)
        _refuse_unless_regular(info.st_mode, path)
        return info.st_size

    def _open_regular(self, rel: str) -> int:
        path = self._path(rel)
        try:
            return checksum.open_regular(path)
        except OSError as error:
            if error.errno == errno.ELOOP:  # O_NOFOLLOW met a link: say so in words
                _refuse_unless_regular(os.lstat(path).st_mode, path)
            raise

    def local_path(self, rel: str) -> Optional[str]:
        return self._path(rel)

    def write(self, rel: str, fill: Callable[[IO[bytes]], None],
              algorithm: str = checksum.DEFAULT) -> tuple[int, str]:
        """Write ``rel`` atomically; returns (bytes, named checksum). Leaves nothing behind on failure."""
        final = self._path(rel)
        folder = os.path.dirname(final)
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        temp = f"{final}.tmp-{os.getpid()}"
        try:
            fd = open_direct(temp) if self.direct else None
            size, digest = self._write_buffered(temp, fill, algorithm) if fd is None else \
                self._write_direct(fd, fill, algorithm)
            os.replace(temp, final)
        except BaseException:
            _remove_quietly(temp)
            raise
        fsync_dir(folder)
        if created:  # the new folder's own entry must be durable too, or the checkpoint can vanish
            fsync_dir(os.path.dirname(folder))
        return size, digest

    @staticmethod
    def _write_buffered(path: str, fill: Callable[[IO[bytes]], None], algorithm: str) -> tuple[int, str]:
        with open(path, "wb") as raw:
            writer = HashingWriter(raw, algorithm)
            fill(writer)
            raw.flush()
            os.fsync(raw.fileno())
        return writer.size, writer.checksum

    def _write_direct(self, fd: int, fill: Callable[[IO[bytes]], None], algorithm: str) -> tuple[int, str]:
        if self._ring is None:
            self._ring = BufferRing()
        try:
            with self._ring.lock:
                writer = DirectWriter(fd, self._ring, algorithm)
                try:
                    fill(writer)
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
        finally:
            os.close(fd)
        return writer.size, writer.checksum

    def remove_dir(self, rel: str) -> None:
        shutil.rmtree(self._path(rel), ignore_errors=False)

    def flush(self) -> None:
        """Nothing is in flight: every write is durable when it returns."""


def _refuse_unless_regular(mode: int, path: str) -> None:
    """OSError (not FileNotFoundError: the file exists) unless ``mode`` is a regular file's."""
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "is a symbolic link; checkpoint files are never followed", path)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", path)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
