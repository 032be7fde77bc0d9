"""harness: make PyTorch DDP training survive interruption."""

__version__ = "0.1.0"
