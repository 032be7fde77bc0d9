"""Rank 0's checkpoint writer: synchronous, or snapshot-then-write in a background thread.

Asynchronous mode blocks the loop only while tensors are copied into one host buffer laid out as
the flat file's data section (reused across saves, page-aligned, pinned on GPU machines; GPU
tensors are copied on a side CUDA stream), then a thread of lower priority writes that buffer in
place with the same atomic protocol. At most one save is in flight: the next snapshot waits for the
previous write. A failed background write is raised by the next ``submit()``/``flush()``, never lost.
A payload the flat format cannot store is snapshotted by HostSnapshot instead (tensors into reused
buffers, everything else deep-copied) before ``submit()`` returns. Retention runs after the commit
and never fails it (see CheckpointStore.prune).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import mmap
import os
import threading
import time
from typing import Any, Optional

import torch

from harness.checkpoint import flat
from harness.checkpoint.format import PayloadFile, encode, legacy
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import PAYLOAD_NAME, CheckpointRef
from harness.checkpoint.store import CheckpointStore, Retention


class HostSnapshot:
    """A copy of a nested payload that the training loop can no longer change, for the torch.save
    fallback of the asynchronous writer (its thread pickles the copy while the loop trains on).

    Tensors are copied into host buffers kept between saves (no fresh allocations, which are slow on
    VMs that return freed memory to the host); everything else that is not a plain dict, list or
    tuple (numpy arrays, user objects, sets, ...) is deep-copied, so the next step's in-place
    changes (``counts += 1``) cannot leak into this step's file. A buffer is found again by its
    path of (key type, key) pairs, so keys ``1`` and ``"1"`` of one dict get buffers of their own.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, obj: Any, path: tuple = ()) -> Any:
        kind = type(obj)
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, path)
        if kind in (dict, collections.OrderedDict):
            copied = kind((key, self.copy(value, (*path, (type(key), key)))) for key, value in obj.items())
            if getattr(obj, "_metadata", None) is not None:  # module versions of a state_dict
                copied._metadata = copy.deepcopy(obj._metadata)
            return copied
        if kind in (list, tuple):
            return kind(self.copy(value, (*path, (int, index))) for index, value in enumerate(obj))
        return copy.deepcopy(obj)  # immutable scalars come back as they are

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


class FlatSnapshot:
    """Copies a payload's tensors into one host buffer laid out as the flat file's data section, so
    the background write sends that buffer to the disk in place (no pickler, no second copy).

    The buffer is reused across saves and grows only when a payload needs more; it is page-aligned
    (an anonymous memory map on CPU-only hosts, touched once at allocation because fresh memory is
    slow on VMs) or pinned when the payload holds CUDA tensors. Copies from the GPU run on a side
    stream; ``wait()`` (called by the writing thread) blocks until they landed, and the training
    stream waits for them before its next kernel, so the next optimizer step cannot change a tensor
    while it is being copied.
    """

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None
        self._keepalive: Any = None  # the memory map under a CPU buffer
        self._done: Optional[Any] = None  # CUDA event recorded after the copies
        self._stream: Optional[Any] = None  # the side CUDA stream, made on the first GPU snapshot

    def take(self, payload: dict) -> PayloadFile:
        """Copy ``payload``'s tensors (raises flat.NotFlat for what the flat format cannot store)."""
        layout = flat.plan(payload)
        on_gpu = any(tensor.is_cuda for tensor in layout.sources)
        data = self._reserve(layout.data_nbytes, pinned=on_gpu)
        if on_gpu and self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream if on_gpu else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for tensor, (begin, end) in zip(layout.sources, layout.spans):
                target = data[begin:end].view(tensor.dtype).view(tensor.shape)
                target.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        if stream is not None:
            self._done = torch.cuda.Event()
            self._done.record(stream)
            torch.cuda.current_stream().wait_event(self._done)
        image = data[:layout.data_nbytes].numpy()

        def write_to(handle) -> None:
            self.wait()
            handle.write(layout.header)
            handle.write(memoryview(image))

        return PayloadFile(PAYLOAD_NAME, write_to)

    def wait(self) -> None:
        """Block until the copies of the last ``take()`` have landed in host memory."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None

    def _reserve(self, nbytes: int, pinned: bool) -> torch.Tensor:
        buffer = self._buffer
        if buffer is not None and buffer.numel() >= nbytes and buffer.is_pinned() == pinned:
            return buffer
        self._buffer = self._keepalive = None  # release the old one before allocating
        size = max(-(-nbytes // flat.ALIGN) * flat.ALIGN, flat.ALIGN)
        if pinned:
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        else:
            self._keepalive = mmap.mmap(-1, size)
            self._buffer = torch.frombuffer(self._keepalive, dtype=torch.uint8)
            self._buffer.fill_(0)  # touch every page now, not during the copy a save waits for
        return self._buffer

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()


# Niceness of the background write thread: on hosts where the loop already uses every core (2-core
# CPU training), an equal-priority writer slows the overlapping steps; a nicer one yields to them.
WRITER_NICENESS = 10


def _lower_thread_priority() -> None:
    """Make the calling thread nicer (Linux: per thread). Raising niceness never needs privileges."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, WRITER_NICENESS))
    except (AttributeError, OSError):  # not Linux, or not permitted: keep the default priority
        pass


class CheckpointWriter:
    """Commits payloads through a CheckpointStore, then applies retention."""

    def __init__(self, store: CheckpointStore, retention: Retention, asynchronous: bool = False):
        self.store = store
        self.retention = retention
        self.asynchronous = asynchronous
        self.last_save_s: Optional[float] = None  # wall time of the last full commit
        self.last_ref: Optional[CheckpointRef] = None
        self._snapshot = FlatSnapshot()
        self._fallback_snapshot = HostSnapshot()  # for payloads the flat format cannot store
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, step: int, payload: dict, info: dict, written: Optional[dict[str, dict]] = None) -> None:
        """Commit ``payload`` as step ``step``; ``written``: files already in the step folder that the
        manifest lists too (CheckpointStore.commit)."""
        started = time.perf_counter()
        self.flush()  # at most one save in flight; surfaces a previous failure
        if not self.asynchronous:
            self._commit(step, encode(payload), info, started, written)
            return
        file = self._take_snapshot(payload)
        self._thread = threading.Thread(target=self._background, args=(step, file, info, started, written),
                                        name=f"harness-save-{step}", daemon=False)
        self._thread.start()

    def _take_snapshot(self, payload: dict) -> PayloadFile:
        try:
            return self._snapshot.take(payload)
        except flat.NotFlat as reason:
            copied = self._fallback_snapshot.copy(payload)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # non_blocking copies must land before the thread reads them
            return legacy(copied, reason)

    def _commit(self, step: int, file: PayloadFile, info: dict, started: float,
                written: Optional[dict[str, dict]] = None) -> None:
        self.last_ref = self.store.commit(step, file.write_to, info, payload_name=file.name, written=written)
        self.last_save_s = time.perf_counter() - started
        self.store.prune(self.retention, current=step)

    def _background(self, step: int, file: PayloadFile, info: dict, started: float,
                    written: Optional[dict[str, dict]]) -> None:
        _lower_thread_priority()
        try:
            self._commit(step, file, info, started, written)
        except BaseException as error:  # surfaced to the loop by flush(); never swallowed
            self._error = error

    def flush(self) -> None:
        """Wait for the write in flight; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"background checkpoint write failed: {error}") from error
