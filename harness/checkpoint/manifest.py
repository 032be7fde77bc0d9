"""The manifest of one checkpoint (``step_*/manifest.json``): building it, and deciding whether one
read back can be trusted at all.

A manifest is the commit marker and the list of files that make the checkpoint, each with its size
and named checksum. Version history:

- 1: ``{"bytes", "sha256": <hex>}`` entries, later ``{"bytes", "checksum": "xxh3_128:<hex>"}`` (the
  entry changed without a version bump: harness versions of that time crash on the newer entries).
- 2: ``{"bytes", "checksum": "<algorithm>:<hex>"}`` entries. A harness that reads only version 1
  skips these checkpoints with a warning instead of crashing on them.

``parse`` accepts versions 1 and 2. Everything it refuses (bad JSON, another format or version, a
step that is not a number, no files, a file entry without a size or a known checksum, a file name
that is not a plain name, or one subfolder and a plain name, inside the checkpoint folder) raises UnusableManifest: the checkpoint is
skipped with a warning, kept on disk, and the previous one is used. Parsing is pure: nothing a
manifest names is opened or even looked at while deciding.
"""

from __future__ import annotations

import json
import time
from typing import Any

from harness.checkpoint import checksum
from harness.checkpoint.layout import is_inside_folder

FORMAT = "harness.manifest"
VERSION = 2  # what this harness writes
READABLE_VERSIONS = (1, 2)


class UnusableManifest(ValueError):
    """A manifest this harness cannot trust or understand; the message says why."""


def build(step: int, files: dict[str, dict], write_s: float, info: dict) -> dict:
    """A new manifest: ``files`` maps file names inside the checkpoint folder (``layout.is_inside_folder``)
    to ``checksum.file_entry`` records."""
    return {
        "format": FORMAT,
        "format_version": VERSION,
        "step": step,
        "files": files,
        "created_unix": time.time(),
        "write_s": round(write_s, 4),
        **info,
    }


def encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def parse(data: bytes) -> dict:
    """The manifest in ``data``, validated (see the module docstring); raises UnusableManifest."""
    try:
        manifest = json.loads(data)
    except ValueError as error:  # bad JSON or bad UTF-8
        raise UnusableManifest(f"not JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise UnusableManifest(f"not a JSON object but {type(manifest).__name__}")
    found = (manifest.get("format"), manifest.get("format_version"))
    if found[0] != FORMAT or found[1] not in READABLE_VERSIONS:
        raise UnusableManifest(f"format {found[0]!r} v{found[1]!r}; this harness reads {FORMAT} "
                               f"v{' and v'.join(map(str, READABLE_VERSIONS))} (a newer harness wrote it?)")
    if not _is_count(manifest.get("step")):
        raise UnusableManifest(f"its step {manifest.get('step')!r} is not a non-negative integer")
    entries(manifest)
    return manifest


def entries(manifest: dict) -> dict[str, tuple[int, str]]:
    """{file name: (bytes, named checksum)} of a manifest; raises UnusableManifest for a missing or
    empty file list, a name that is not a file inside the folder (``../x``, ``/etc/x``, ``a/../../x``),
    or an entry without a size or without a checksum this harness can compute."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UnusableManifest(f"it lists no files ({files!r})")
    outside = [name for name in files if not is_inside_folder(name)]
    if outside:
        raise UnusableManifest(f"it names files outside the checkpoint folder: {outside}")
    found = {}
    for name, entry in files.items():
        try:
            recorded = checksum.expected(entry)
        except checksum.UnknownChecksum as error:
            raise UnusableManifest(f"{name}: {error}") from None
        if not _is_count(entry.get("bytes")):
            raise UnusableManifest(f"{name}: its size {entry.get('bytes')!r} is not a non-negative integer")
        found[name] = (entry["bytes"], recorded)
    return found


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
