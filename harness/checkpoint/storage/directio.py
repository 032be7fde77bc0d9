"""Durable sequential writes that bypass the page cache (O_DIRECT), with hashing in the same pass.

Why: through the page cache, ``write`` + ``fsync`` of a large checkpoint runs at ~0.35 GB/s on the
machines we measured, while O_DIRECT with several requests in flight reaches ~1.5 GB/s, and it does
not flood the page cache (which slows the training steps that overlap an async save). Data is copied
into a ring of page-aligned buffers; each full buffer is hashed in order by one thread and written at
its offset by a small pool, so copying, hashing and disk writes overlap. The last partial buffer is
padded to the alignment and the file truncated to its true size before fsync.

Filesystems without O_DIRECT (tmpfs, some network filesystems) raise EINVAL at open: the caller
then falls back to buffered writes (``open_direct`` returns None).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from harness.checkpoint import checksum

ALIGN = 4096  # O_DIRECT needs offsets, lengths and addresses aligned to the logical block size
CHUNK = 8 << 20  # bytes per write request
IN_FLIGHT = 4  # buffers in the ring: requests the disk can have in flight


def _address(view: memoryview) -> int:
    """Where a buffer's bytes start in memory (O_DIRECT needs it aligned)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


class BufferRing:
    """Page-aligned, pre-faulted buffers reused across saves (fresh memory is slow on VMs)."""

    def __init__(self, count: int = IN_FLIGHT, size: int = CHUNK):
        self.size = size
        self.buffers = [mmap.mmap(-1, size) for _ in range(count)]
        for buffer in self.buffers:
            buffer.write(bytes(size))  # touch every page now, not during a save
            buffer.seek(0)
        self.lock = threading.Lock()  # one file at a time uses the ring


def open_direct(path: str) -> Optional[int]:
    """An O_DIRECT file descriptor for writing ``path``, or None where O_DIRECT is unsupported."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise


class DirectWriter:
    """A write-only file object over an O_DIRECT descriptor; ``finish()`` makes it durable.

    ``size`` and ``checksum`` describe what was written. The first I/O error is raised from the next
    ``write()`` or from ``finish()``.
    """

    def __init__(self, fd: int, ring: BufferRing, algorithm: str = checksum.DEFAULT):
        self.fd = fd
        self.ring = ring
        self.algorithm = algorithm
        self.hasher = checksum.new(algorithm)
        self.size = 0
        self._index = 0  # buffer being filled
        self._fill = 0  # bytes in it
        self._pending: list[Optional[Future]] = [None] * len(ring.buffers)
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-hash")
        self._io = ThreadPoolExecutor(max_workers=len(ring.buffers), thread_name_prefix="harness-io")

    @property
    def checksum(self) -> str:
        return checksum.named(self.algorithm, self.hasher)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        if self._fill % ALIGN == 0 and _address(view) % ALIGN == 0 and view.nbytes >= ALIGN:
            in_place = view.nbytes // ALIGN * ALIGN
            self._write_in_place(view[:in_place])
            view = view[in_place:]
        while view.nbytes:
            if self._fill == 0:
                self._wait_free(self._index)
            room = self.ring.size - self._fill
            take = min(room, view.nbytes)
            buffer = self.ring.buffers[self._index]
            buffer[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self.ring.size:
                self._submit(self._fill)
        return total

    def _write_in_place(self, view: memoryview) -> None:
        """Write page-aligned caller memory straight to the disk (no copy into the ring), hashing
        it in order with everything else; returns once written, so the caller may reuse it."""
        if self._fill:  # an aligned, partly filled ring buffer goes first, at its offset
            self._submit(self._fill)
        in_flight: list[Future] = []
        for start in range(0, view.nbytes, CHUNK):
            piece = view[start:start + CHUNK]
            if len(in_flight) >= len(self.ring.buffers):
                in_flight.pop(0).result()
            hashed = self._hasher.submit(checksum.update, self.hasher, piece)
            in_flight.append(self._io.submit(self._write_at, hashed, piece, self.size))
            self.size += piece.nbytes
        for future in in_flight:
            future.result()

    def flush(self) -> None:
        """Buffered data is written by finish(); flushing early would break alignment."""

    def _wait_free(self, index: int) -> None:
        future = self._pending[index]
        if future is not None:
            future.result()  # re-raises an I/O error of that request
            self._pending[index] = None

    def _submit(self, length: int) -> None:
        index, offset = self._index, self.size
        buffer = self.ring.buffers[index]
        padded = -(-length // ALIGN) * ALIGN
        if padded > length:
            buffer[length:padded] = bytes(padded - length)
        view = memoryview(buffer)
        # Hash strictly in order (one thread), then write this buffer at its offset (a pool).
        hashed = self._hasher.submit(checksum.update, self.hasher, view[:length])
        self._pending[index] = self._io.submit(self._write_at, hashed, view[:padded], offset)
        self.size += length
        self._index = (index + 1) % len(self.ring.buffers)
        self._fill = 0

    def _write_at(self, hashed: Future, view: memoryview, offset: int) -> None:
        written = 0
        while written < view.nbytes:
            written += os.pwrite(self.fd, view[written:], offset + written)
        hashed.result()  # the buffer is free only once hashed AND written

    def abort(self) -> None:
        """After a failed fill: let requests in flight end before the buffers and descriptor go away.
        Their own errors are secondary to the one already propagating, so they are not re-raised."""
        self._hasher.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def finish(self) -> None:
        """Write the rest, truncate to the real size, fsync. The descriptor stays open."""
        try:
            if self._fill:
                self._submit(self._fill)
            for index in range(len(self._pending)):
                self._wait_free(index)
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self._hasher.shutdown(wait=True)
            self._io.shutdown(wait=True)
