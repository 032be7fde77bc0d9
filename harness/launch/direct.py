"""Run one rank in this process: the ranks were started by torchrun or ``srun`` (see slurm/)."""

from __future__ import annotations

import time
from typing import NoReturn

from harness.config import PREEMPTED_EXIT_CODE
from harness.launch.worker import exit_now, install_stop_flag, run_worker


def run(config_data: dict, cfg=None) -> NoReturn:
    """Train this rank; under SLURM, rank 0 requeues the job after a preemption's save.

    Stop handlers go in first, before anything imports torch (about 2 s): a signal during start-up
    is then a stop request. Without a launcher of ours, time-outs cannot be told from preemptions
    (the time limit is not in the config), so every preempted stop requeues; SLURM's limits apply.
    """
    flag = install_stop_flag(config_data)
    started = time.monotonic()
    from harness.env import read_env

    env = read_env()
    code = run_worker(config_data, flag) if env.source != "slurm" else _run_under_srun(config_data, flag, env, started)
    exit_now(code)  # this process is the rank: skip the teardown that can abort a finished run


def _run_under_srun(config_data: dict, flag, env, started: float) -> int:
    from harness.launch.slurm import announce, requeue_after_preemption

    announce(env)
    code = run_worker(config_data, flag)
    if code == PREEMPTED_EXIT_CODE:
        requeue_after_preemption(env, None, time.monotonic() - started)
    return code
