"""The stop flag that signal handlers set. Imports no torch, so a worker installs it first thing.

Handlers never do I/O or collectives: they record the request, and the training loop acts on it at
the next step boundary (harness.stop.agreement).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("harness")

REASON_NONE = 0
REASON_REQUEST = 1  # request_stop() from code
REASON_SPOT = 2  # cloud termination notice
# Signals are recorded as 100 + signal number so the agreed reason says which one arrived.
REASON_SIGNAL_BASE = 100
# Signals the local launcher catches (and blocks while it spawns ranks, a mask the ranks inherit):
# the stop signals, plus SIGHUP, which it passes on as SIGTERM.
LAUNCHER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# A SIGINT this soon after the previous one is the same Ctrl-C delivered twice (to the terminal's
# process group and again by a wrapper that forwards it: `timeout`, torchrun, a shell script), not
# a second press: a person pressing twice on purpose is slower, and may press a third time.
SAME_PRESS_S = 0.5
# Signals that DataLoader workers ignore so that they outlive the main process's save.
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def describe_reason(code: int) -> str:
    if code >= REASON_SIGNAL_BASE:
        return signal.Signals(code - REASON_SIGNAL_BASE).name
    return {REASON_REQUEST: "request_stop()", REASON_SPOT: "spot termination notice"}.get(code, "none")


def is_new_press(last_interrupt: Optional[float]) -> bool:
    """Whether a SIGINT now is a new Ctrl-C, given when the previous one arrived (None: none yet)."""
    return last_interrupt is None or time.monotonic() - last_interrupt >= SAME_PRESS_S


class StopFlag:
    """A process-local stop request, set from signal handlers, pollers or code."""

    def __init__(self) -> None:
        self.reason = REASON_NONE
        self.interrupts = 0  # Ctrl-C presses seen
        self._last_interrupt: Optional[float] = None  # time.monotonic() of the last one
        self.requested_at: Optional[float] = None  # time.monotonic() of the first request
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason != REASON_NONE

    def request(self, reason: int = REASON_REQUEST) -> None:
        if self.reason == REASON_NONE:
            self.reason = reason
            self.requested_at = time.monotonic()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if not is_new_press(self._last_interrupt):
                return  # the same Ctrl-C, delivered twice
            self._last_interrupt = time.monotonic()
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # second Ctrl-C: stop at once, no save
        self.request(REASON_SIGNAL_BASE + signum)
        previous = self._previous.get(signum)
        # Chain a previous Python handler (e.g. a user's), but not the defaults that would exit.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def install(self, names: list[str]) -> None:
        """Install handlers (main thread only). Earlier handlers are kept and restored by uninstall()."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: signal handlers not installed; use request_stop()")
            return
        installed = []
        for name in names:
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._handle)
            installed.append(signum)
        # The local launcher starts ranks with these signals blocked (inherited across exec), so one
        # sent before this point waits, pending, instead of killing a half-started rank: deliver it
        # now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, installed)

    @staticmethod
    def installed(names: list[str]) -> Optional["StopFlag"]:
        """The StopFlag whose handler is installed for one of ``names`` (e.g. by the launcher's worker
        or ``harness.install_stop_handlers()`` before torch was imported), or None."""
        for name in names:
            owner = getattr(signal.getsignal(signal.Signals[name]), "__self__", None)
            if isinstance(owner, StopFlag):
                return owner
        return None

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a group-wide SIGTERM must not kill workers before the save."""
    for signum in WORKER_IGNORED:
        signal.signal(signum, signal.SIG_IGN)


class ChainedWorkerInit:
    """Ignore stop signals, then run the user's own worker_init_fn (picklable for spawn)."""

    def __init__(self, user_init: Optional[Callable[[int], None]]):
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals_in_worker(worker_id)
        if self.user_init is not None:
            self.user_init(worker_id)
