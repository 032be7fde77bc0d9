"""What a launcher backend must do, and the registry that maps ``launcher.backend`` to one.

A backend is a module with ``run(config_data: dict, cfg: HarnessConfig) -> int`` (the process exit
code). Its duties, which the tests of each backend check:

1. Start (or be) the ranks with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT agreed by all.
2. Stop signals reach every rank as a stop request, never as a crash: forward the configured
   ``preempt.signals`` to ranks it started; ranks it runs in-process install their handlers
   (``harness.stop.flag``) before importing torch.
3. Honour exit code 75 (``PREEMPTED_EXIT_CODE``): a checkpoint was committed; restart (local:
   ``launcher.max_restarts``), requeue (SLURM) or pass 75 on to the orchestrator. Never turn it into 1.
4. When a rank fails, stop the others and name the failing rank; never leave ranks running without
   their launcher.

Adding a backend: a module here with ``run``, a schema in ``harness.config`` (LAUNCHERS) and a
preset in ``conf/launcher/``, and one line in BACKENDS below.
"""

from __future__ import annotations

import importlib
from typing import Callable

# launcher.backend -> module holding run(config_data, cfg). Imported lazily: the direct backend must
# install signal handlers before anything imports torch.
BACKENDS: dict[str, str] = {
    "local": "harness.launch.local",
    "direct": "harness.launch.direct",
    "slurm": "harness.launch.slurm",
}


def backend_runner(name: str) -> Callable[..., int]:
    """The ``run`` function of backend ``name``; ValueError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"launcher.backend={name!r} is unknown: expected one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).run
