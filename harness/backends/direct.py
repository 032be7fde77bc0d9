"""Run one rank in this process: the ranks were started by torchrun or ``srun`` (see slurm/)."""

from __future__ import annotations

import time
from typing import Optional

from harness.config import PREEMPTED_EXIT_CODE
from harness.env import read_env
from harness.signals import StopFlag
from harness.worker import run_worker


def run_direct(config_data: dict, flag: Optional[StopFlag] = None) -> int:
    """Train this rank; under SLURM, rank 0 requeues the job after a preemption's save.

    Without a launcher of ours, time-outs cannot be told from preemptions (the time limit is not in
    the config), so every preempted stop requeues; SLURM's own limits apply.
    """
    started = time.monotonic()
    env = read_env()
    if env.source != "slurm":
        return run_worker(config_data, flag)
    from harness.backends.slurm import announce, requeue_after_preemption

    announce(env)
    code = run_worker(config_data, flag)
    if code == PREEMPTED_EXIT_CODE:
        requeue_after_preemption(env, None, time.monotonic() - started)
    return code
