"""Is the run's checkpoint folder usable? Checked once at start, before the first step.

Without it a folder that cannot be written is found out at the first save, after
``checkpoint.every_steps`` steps of training; and a regular file where the folder should be fails
wherever something first creates a file in it. The launcher checks local folders before it starts a
rank; rank 0 checks again when a session starts (scripts run without the launcher), and every rank
learns the outcome (``Session.start``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from harness.checkpoint.errors import CheckpointError, write_hint

PROBE_PREFIX = ".harness-probe-"  # a one-byte file written and removed to prove the folder takes writes
FILE_SCHEME = "file://"


def local_folder(url: str) -> Optional[str]:
    """The local path of a checkpoint folder (a path or a file:// URL); None for remote URLs, which
    have no folder to check before their first write."""
    if url.startswith(FILE_SCHEME):
        return url[len(FILE_SCHEME):]
    return None if "://" in url else url


def check_folder(path: str, key: str = "checkpoint.dir") -> None:
    """Create ``path`` if needed and prove that a file can be written in it.

    Raises CheckpointError naming ``key`` and the folder, with a hint chosen by the errno: a regular
    file in the way (EEXIST/ENOTDIR), no permission or an immutable folder (EACCES/EPERM), a
    read-only filesystem (EROFS), a full disk or quota (ENOSPC/EDQUOT).
    """
    folder = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{key}={path} is a file, not a folder: HINT: move the file, or point "
                              f"{key} at a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        try:
            os.write(fd, b"\0")  # a full disk often still creates an empty file
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"{key}={path} cannot be written ({error.strerror or error}): "
                              f"{write_hint(error)}") from None


def check_run_folders(checkpoint_dir: str, staging_dir: Optional[str] = None) -> None:
    """``check_folder`` for checkpoint.dir when it is local, and for checkpoint.staging_dir."""
    local = local_folder(checkpoint_dir)
    if local is not None:
        check_folder(local, "checkpoint.dir")
    if staging_dir:
        check_folder(staging_dir, "checkpoint.staging_dir")
