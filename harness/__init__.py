"""harness: make PyTorch DDP training survive interruption.

The public API, imported lazily so that ``import harness`` stays light (a rank installs its stop
handlers before anything imports torch)::

    from harness import Session, Preempted, CheckpointError, Values, validate, load_config, entrypoint
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Session": "harness.session",
    "Preempted": "harness.stop.agreement",
    "CheckpointError": "harness.checkpoint.errors",
    "UnsafeCheckpoint": "harness.checkpoint.format",
    "HarnessConfig": "harness.config",
    "ConfigError": "harness.config",
    "validate": "harness.config",
    "PREEMPTED_EXIT_CODE": "harness.config",
    "load_config": "harness.session",
    "entrypoint": "harness.launch.worker",
    "install_stop_handlers": "harness.launch.worker",
    "Values": "harness.checkpoint.payload",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion finds them


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
