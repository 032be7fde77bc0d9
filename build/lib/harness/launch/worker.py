"""One rank of a job: read the resolved config, train, exit with a meaningful code.

Exit codes: 0 finished, 75 preempted (checkpoint saved, restart me), 1 error, 130 second Ctrl-C.
Started by the local launcher as ``python -m harness.launch.worker CONFIG.yaml``; the SLURM and direct
launchers call ``run_worker`` in-process.

The stop-signal handlers are installed before torch is imported (about 2 s of start-up): a SIGTERM
that reaches a rank while it starts is then a stop request, not a crash.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import yaml

from harness.stop.flag import StopFlag

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def install_stop_flag(config_data: dict) -> StopFlag:
    """Handlers for the configured stop signals, installed now (validation comes later)."""
    flag = StopFlag()
    flag.install([str(name) for name in (config_data.get("preempt") or {}).get("signals", [])])
    return flag


def run_worker(config_data: dict, flag: Optional[StopFlag] = None) -> int:
    """Train one rank from plain config data; returns the process exit code."""
    import logging

    # Imported here, after the caller could install stop handlers: these pull in torch.
    from harness.config import validate
    from harness.env import read_env
    from harness.stop.agreement import Preempted
    from harness.session import Session
    from harness.task import run_task

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = validate(config_data)
    except ValueError as error:  # ConfigError and OmegaConf's validation errors
        if flag is not None:
            flag.uninstall()
        print(f"config error: {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    env = read_env()
    try:
        with Session(cfg, env=env, config_data=config_data, flag=flag) as session:
            run_task(session, cfg.task)
    except Preempted as stop:
        print(f"[rank {env.rank}] stopped at step {stop.step} ({stop.reason})", file=sys.stderr, flush=True)
        return stop.code
    except KeyboardInterrupt:
        print(f"[rank {env.rank}] interrupted twice: stopped without saving", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return EXIT_OK


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m harness.launch.worker CONFIG.yaml (written by python -m harness.launch)",
              file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        config_data = yaml.safe_load(handle)
    flag = install_stop_flag(config_data)
    try:
        return run_worker(config_data, flag)
    except Exception:
        rank = os.environ.get("RANK", "?")
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a late signal there (handlers are reset) or torch's process-group
    # destructor can turn a finished rank's exit code into a crash.
    os._exit(code)
