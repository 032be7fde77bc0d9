"""Rank 0's checkpoint writer: synchronous, or snapshot-then-write in a background thread.

Asynchronous mode blocks the loop only while tensors are copied into host buffers that are reused
across saves (pinned on GPU machines), then serializes and commits them in a thread with the same
atomic protocol. At most one save is in flight: the next snapshot waits for the previous write. A
failed background write is raised by the next ``submit()``/``flush()``, never lost.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import torch

from harness.checkpoint.format import write_payload
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import CheckpointRef
from harness.checkpoint.store import CheckpointStore, Retention


class HostSnapshot:
    """Copies a nested payload's tensors into host buffers kept between saves (no fresh allocations,
    which are slow on VMs that return freed memory to the host)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, obj: Any, path: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, path)
        if isinstance(obj, dict):
            return {key: self.copy(value, f"{path}/{key}") for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            copied = [self.copy(value, f"{path}/{index}") for index, value in enumerate(obj)]
            return copied if isinstance(obj, list) else tuple(copied)
        return obj

    def _copy_tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
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
        self._snapshot = HostSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, step: int, payload: dict, info: dict) -> None:
        started = time.perf_counter()
        self.flush()  # at most one save in flight; surfaces a previous failure
        if not self.asynchronous:
            self._commit(step, payload, info, started)
            return
        snapshot = self._snapshot.copy(payload)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # non_blocking copies must land before the thread reads them
        self._thread = threading.Thread(target=self._background, args=(step, snapshot, info, started),
                                        name=f"harness-save-{step}", daemon=False)
        self._thread.start()

    def _commit(self, step: int, payload: dict, info: dict, started: float) -> None:
        self.last_ref = self.store.commit(step, lambda handle: write_payload(payload, handle), info)
        self.last_save_s = time.perf_counter() - started
        self.store.prune(self.retention, current=step)

    def _background(self, step: int, payload: dict, info: dict, started: float) -> None:
        _lower_thread_priority()
        try:
            self._commit(step, payload, info, started)
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
