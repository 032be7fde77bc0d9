"""The errors every checkpoint room raises; each message names the file and what to do."""

from __future__ import annotations

import errno


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files disagree with its manifest (truncated, altered, missing)."""


# What to do about a failed write, by errno: a full disk and a permission problem have different fixes.
_WRITE_HINTS = {
    errno.EACCES: "this user may not write there: fix the folder's permissions or owner, or point "
                  "checkpoint.dir at a writable folder",
    errno.EPERM: "the folder refuses writes (its permissions, or an immutable flag: lsattr -d / "
                 "chattr -i): fix that, or point checkpoint.dir at a writable folder",
    errno.EROFS: "the filesystem is mounted read-only: point checkpoint.dir at a writable filesystem",
    errno.ENOSPC: "the disk is full: free space (or lower checkpoint.keep_last), or point checkpoint.dir "
                  "at a disk with room",
    errno.EDQUOT: "your disk quota is used up: free space in it, or point checkpoint.dir elsewhere",
    errno.EEXIST: "a file is in the way of the folder: move it, or point checkpoint.dir elsewhere",
    errno.ENOTDIR: "a file is in the way of the folder: move it, or point checkpoint.dir elsewhere",
}
_DEFAULT_WRITE_HINT = "point checkpoint.dir at a writable folder"


def write_hint(error: BaseException) -> str:
    """``HINT: ...`` for a failed write, chosen by the errno of the OSError (a non-OSError gets
    the general advice)."""
    code = error.errno if isinstance(error, OSError) else None
    return "HINT: " + _WRITE_HINTS.get(code, _DEFAULT_WRITE_HINT)
