"""A Storage that injects one planned fault into the calls the checkpoint store makes.

It wraps a real Storage and passes every call through, except at the ``nth`` call of ``op``, where it
SIGKILLs its own process (before the call, in the middle of a file's bytes, or after the call
returned) or raises an OSError (once, like a throttled request, or from then on, like a failed disk).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Callable

KILLS = ("kill_before", "kill_mid", "kill_after")
ERRORS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "eagain": errno.EAGAIN}


@dataclass(frozen=True)
class FaultPlan:
    op: str  # write_payload | write_manifest | remove_dir | list_names | read_bytes
    nth: int  # 1-based call of ``op`` that faults
    action: str  # one of KILLS, or an ERRORS key
    once: bool = True  # errors: only the nth call fails (else every call from the nth on)
    after_bytes: int = 0  # kill_mid: bytes of the file written before the kill


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingHandle:
    """A file handle that SIGKILLs the process once more than ``limit`` bytes went through it."""

    def __init__(self, inner: IO[bytes], limit: int):
        self._inner = inner
        self._left = limit

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._left:
            if self._left:
                self._inner.write(memoryview(data).cast("B")[:self._left])
            die()
        self._left -= size
        return self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyStorage:
    """See the module docstring; every attribute not faulted is the inner storage's."""

    def __init__(self, inner: Any, plan: FaultPlan):
        self._inner = inner
        self.plan = plan
        self.calls: Counter = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _faulting(self, op: str) -> bool:
        self.calls[op] += 1
        count = self.calls[op]
        if op != self.plan.op:
            return False
        return count == self.plan.nth or (count > self.plan.nth and not self.plan.once
                                          and self.plan.action in ERRORS)

    def _run(self, op: str, call: Callable[[], Any], fill_wrapper: Callable[[], Any] | None = None) -> Any:
        if not self._faulting(op):
            return call()
        action = self.plan.action
        if action in ERRORS:
            code = ERRORS[action]
            raise OSError(code, f"injected {os.strerror(code)} ({op} call {self.calls[op]})")
        if action == "kill_before":
            die()
        if action == "kill_mid" and fill_wrapper is not None:
            return fill_wrapper()
        result = call()
        die()  # kill_after (and kill_mid of a call without bytes)
        return result

    def write(self, rel: str, fill: Callable[[IO[bytes]], None], algorithm: str = "xxh3_128"):
        op = "write_manifest" if rel.endswith("manifest.json") else "write_payload"

        def killing_fill():
            return self._inner.write(rel, lambda handle: fill(KillingHandle(handle, self.plan.after_bytes)),
                                     algorithm)
        return self._run(op, lambda: self._inner.write(rel, fill, algorithm), killing_fill)

    def remove_dir(self, rel: str) -> None:
        return self._run("remove_dir", lambda: self._inner.remove_dir(rel))

    def list_names(self) -> list[str]:
        return self._run("list_names", self._inner.list_names)

    def read_bytes(self, rel: str) -> bytes:
        return self._run("read_bytes", lambda: self._inner.read_bytes(rel))
