"""The errors every checkpoint room raises; each message names the file and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files disagree with its manifest (truncated, altered, missing)."""
