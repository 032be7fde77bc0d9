"""Read the checkpoint a restart will resume into the page cache while the script starts up.

A relaunched script spends its first seconds on imports, the model's initialisation and the
optimizer's set-up (torch's optimizers import torch._dynamo: 1.5 s on the machines we measured)
before it asks for its first batch, where the resume verifies and loads the checkpoint. Those
seconds leave the disk idle. A background thread reads the newest checkpoint's files meanwhile, so
the verify and the load find them in memory (1.2 GB: a cold verify 0.47-1.17 s, after this 0.16-0.20 s).

It is a hint and nothing depends on it: the resume lists, verifies and chooses exactly as without
it, and any error here is only logged. ``read()`` releases the GIL while the disk works, so the
script's own start-up barely slows (85% of its Python throughput kept while reading, measured);
``mmap.madvise`` would hold the GIL for each chunk instead.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Iterable, Optional

from harness.checkpoint.checksum import READ_CHUNK, open_regular

log = logging.getLogger("harness")

# Only files that fit in this share of the memory the kernel reports available are read ahead: a
# checkpoint larger than memory would evict itself (and the script's own pages) before it is used.
MEMORY_SHARE = 0.5


class ReadAhead:
    """The read-ahead thread, and the way to end it: ``stop()`` when the resume itself starts reading
    (it reads what is left anyway), so the thread is gone before DataLoader forks its workers (a
    child forked while another thread runs inherits that thread's locks, held forever)."""

    def __init__(self, files: Callable[[], Iterable[str]]):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=_read_quietly, args=(files, self.stopped), name="harness-prefetch",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the read within one chunk, and wait for the thread."""
        self.stopped.set()
        self.thread.join()


def start(files: Callable[[], Iterable[str]]) -> ReadAhead:
    """Read the local files that ``files()`` names (called in the thread: listing a run folder is
    part of the work hidden) into the page cache, in a daemon thread, until stopped."""
    return ReadAhead(files)


def _read_quietly(files: Callable[[], Iterable[str]], stopped: threading.Event) -> None:
    try:
        paths = list(files())
        total = sum(os.path.getsize(path) for path in paths)
        if total > MEMORY_SHARE * available_memory():
            log.debug("not reading ahead %d bytes of checkpoint: more than %.0f%% of available memory",
                      total, 100 * MEMORY_SHARE)
            return
        buffer = bytearray(READ_CHUNK)
        for path in paths:
            read_file(path, buffer, stopped)
    except Exception as error:  # a hint only: the resume itself reports what is wrong
        log.debug("reading the checkpoint ahead failed: %s: %s", type(error).__name__, error)


def read_file(path: str, buffer: bytearray, stopped: Optional[threading.Event] = None) -> None:
    """Read a regular file through the page cache, in big requests (the kernel reads ahead of them),
    until its end or ``stopped``."""
    fd = open_regular(path)
    with open(fd, "rb", buffering=0, closefd=True) as handle:
        while handle.readinto(buffer) and not (stopped is not None and stopped.is_set()):
            pass


def available_memory() -> int:
    """Bytes the kernel reports available (MemAvailable); 0 where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
