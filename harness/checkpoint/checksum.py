"""Checksums of checkpoint files, named by their algorithm: ``"xxh3_128:<hex>"``.

Why xxHash3: a checkpoint is hashed as it is written and again before it is loaded, on the CPU the
training loop needs. sha256 costs ~0.6 s per GB on one core of the machines we measured; XXH3-128
~0.07 s/GB. It detects corruption (torn writes, bit rot, truncation); it is not a defence against a
forger, which sha256 would not be either without a signature. Manifests name the algorithm, so
checkpoints written before the switch (``"sha256": <hex>``) still verify.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Callable, Optional

import xxhash

from harness.checkpoint.layout import HASH_CHUNK

DEFAULT = "xxh3_128"
_FACTORIES: dict[str, Callable[[], "Hasher"]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
READ_CHUNK = HASH_CHUNK  # bytes read at a time when hashing a file
READS_IN_FLIGHT = 4  # a disk (NVMe, cloud volumes) reaches its bandwidth only with several reads queued
# madvise(MADV_POPULATE_READ), Linux 5.14+: map a range's pages in (reading them from the disk), and
# report a read error as an error instead of the SIGBUS a plain access to the page would raise.
POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class Hasher:
    """What hashlib and xxhash objects both provide."""

    def update(self, data) -> None: ...
    def hexdigest(self) -> str: ...


class UnknownChecksum(ValueError):
    """A manifest records a checksum this harness cannot compute or parse (another algorithm, a
    missing or malformed entry): the file cannot be verified, so its checkpoint is not usable."""


def new(algorithm: str = DEFAULT) -> Hasher:
    try:
        return _FACTORIES[algorithm]()
    except KeyError:
        raise UnknownChecksum(f"unknown checksum algorithm {algorithm!r}; known: {sorted(_FACTORIES)}") from None


def update(hasher: Hasher, data) -> None:
    """Hash ``data`` in one call. xxhash releases the GIL for the whole call (hashlib for inputs of 2 KiB
    and more): measured, the main thread ran Python throughout a 1 GB update, so slices would only
    make the hashing thread take the GIL back more often. (A Python-bound loop kept 95% of its speed
    while the writer hashed and wrote 1.2 GB, with 1 MiB slices or without: 2-core VM.)"""
    hasher.update(memoryview(data).cast("B"))


def algorithm_of(checksum: str) -> str:
    """``"xxh3_128"`` of ``"xxh3_128:<hex>"`` (or of ``"xxh3_128"`` itself). Raises UnknownChecksum for
    an algorithm this harness does not know, or for something that is not a string."""
    if not isinstance(checksum, str):
        raise UnknownChecksum(f"a checksum must be a string like 'xxh3_128:<hex>', not {checksum!r}")
    algorithm = checksum.split(":", 1)[0]
    if algorithm not in _FACTORIES:
        raise UnknownChecksum(f"unknown checksum algorithm {algorithm!r}; known: {sorted(_FACTORIES)}")
    return algorithm


def named(algorithm: str, hasher: Hasher) -> str:
    return f"{algorithm}:{hasher.hexdigest()}"


def of_stream(handle: IO[bytes], algorithm: str = DEFAULT) -> str:
    hasher = new(algorithm)
    while chunk := handle.read(READ_CHUNK):
        hasher.update(chunk)
    return named(algorithm, hasher)


def of_file(path: str, algorithm: str = DEFAULT) -> str:
    """The checksum of a local file, read with several requests in flight and hashed in order.

    Through the page cache on purpose: verifying before a resume warms it, so the ranks of the node
    then map the payload from memory instead of reading the disk again.
    """
    hasher = new(algorithm)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        buffers = [memoryview(bytearray(READ_CHUNK)) for _ in range(READS_IN_FLIGHT)]  # reused: fresh
        # memory is slow on VMs; buffer i is hashed before the read that reuses it is queued

        def read(index: int, offset: int) -> memoryview:
            buffer = buffers[index % READS_IN_FLIGHT]
            return buffer[:os.preadv(fd, [buffer], offset)]

        with ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="harness-verify") as pool:
            pending: deque = deque()
            for index, offset in enumerate(range(0, size, READ_CHUNK)):
                if len(pending) == READS_IN_FLIGHT:
                    hasher.update(pending.popleft().result())
                pending.append(pool.submit(read, index, offset))
            while pending:
                hasher.update(pending.popleft().result())
    finally:
        os.close(fd)
    return named(algorithm, hasher)


def of_mapped_file(path: str, algorithm: str = DEFAULT) -> tuple[str, Optional[mmap.mmap]]:
    """(the checksum of a local file, a private memory map of it with every page already mapped in).

    For a file that is verified and then loaded: the load views the same map, so the file is read
    once. Verifying with ``of_file`` and then mapping the file again costs a second pass of page
    faults over the whole file, measured at about as much as the cold read itself (1.2 GB: 0.56 s
    against 0.85 s, a cold read 0.47 s). The map is private (copy-on-write), like ``flat.read``'s:
    writing to what was loaded never changes the file.

    Pages are mapped in ``READ_CHUNK`` at a time with ``MADV_POPULATE_READ`` and hashed once in place,
    so a read error is an OSError (EFAULT or EIO), as from ``of_file``, never a SIGBUS. On a kernel
    without it (before 5.14) this falls back to ``of_file`` and returns no map. An empty file has
    no map either.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return named(algorithm, new(algorithm)), None
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    try:
        return of_mapping(mapped, size, algorithm), mapped
    except PopulateUnsupported:
        mapped.close()
        return of_file(path, algorithm), None
    except BaseException:
        mapped.close()
        raise


class PopulateUnsupported(OSError):
    """The kernel has no MADV_POPULATE_READ (Linux before 5.14)."""


def of_mapping(mapped: mmap.mmap, size: int, algorithm: str = DEFAULT) -> str:
    """The checksum of the first ``size`` bytes of a file's memory map, mapping each chunk's pages in
    before it is hashed (see ``of_mapped_file``). Raises OSError when a page cannot be read: the file
    is unreadable or was truncated after it was mapped."""
    hasher = new(algorithm)
    with memoryview(mapped) as view:
        for start in range(0, size, READ_CHUNK):
            length = min(READ_CHUNK, size - start)
            try:
                mapped.madvise(POPULATE_READ, start, length)
            except OSError as error:
                if error.errno == errno.EINVAL and start == 0:
                    raise PopulateUnsupported(error.errno, "madvise(MADV_POPULATE_READ) is not supported") from None
                raise OSError(error.errno, f"reading bytes {start}-{start + length} of the file failed "
                                           f"({os.strerror(error.errno)})") from None
            chunk = view[start:start + length]
            update(hasher, chunk)
            chunk.release()
    return named(algorithm, hasher)


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path`` itself: a symbolic link is not followed
    (ELOOP), and a FIFO, device or folder is refused without waiting on it (O_NONBLOCK: opening a
    FIFO for reading would otherwise block until a writer comes)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def of_bytes(data: bytes, algorithm: str = DEFAULT) -> str:
    hasher = new(algorithm)
    hasher.update(data)
    return named(algorithm, hasher)


def file_entry(size: int, checksum: str) -> dict:
    """A manifest's record of one file."""
    return {"bytes": size, "checksum": checksum}


def expected(entry: dict) -> str:
    """The named checksum a manifest records for a file (manifests before xxHash: ``sha256``).

    Raises UnknownChecksum when the entry records none, or one of an algorithm this harness does
    not know (a newer harness's manifest): such a file cannot be verified.
    """
    if not isinstance(entry, dict):
        raise UnknownChecksum(f"a file entry must be an object, not {entry!r}")
    if "checksum" in entry:
        recorded = entry["checksum"]
    elif isinstance(entry.get("sha256"), str):
        recorded = f"sha256:{entry['sha256']}"
    else:
        raise UnknownChecksum(f"the file entry records no checksum (keys: {sorted(entry)})")
    algorithm_of(recorded)
    if not recorded.split(":", 1)[1:]:
        raise UnknownChecksum(f"checksum {recorded!r} has no value after the algorithm")
    return recorded
