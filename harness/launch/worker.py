"""One rank of a job: read the resolved config, train, exit with a meaningful code.

Exit codes: 0 finished, 75 preempted (checkpoint saved, restart me), 1 error, 130 second Ctrl-C.
Started by the local launcher as ``python -m harness.launch.worker`` (the config in HARNESS_CONFIG);
the SLURM and direct launchers call ``run_worker`` in-process.

The stop-signal handlers are installed before torch is imported (about 2 s of start-up): a SIGTERM
that reaches a rank while it starts is then a stop request, not a crash.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn, Optional, Sequence

import yaml

from harness.stop.flag import LAUNCHER_SIGNALS, StopFlag

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "stopped without saving at your request (second Ctrl-C); the newest checkpoint is kept"


def install_stop_flag(config_data: dict) -> StopFlag:
    """Handlers for the configured stop signals, installed now (validation comes later); the other
    signals a launcher blocked get their default behaviour back."""
    flag = StopFlag()
    flag.install([str(name) for name in (config_data.get("preempt") or {}).get("signals", [])])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LAUNCHER_SIGNALS)  # blocked by harness.launch.local
    return flag


def run_worker(config_data: dict, flag: Optional[StopFlag] = None) -> int:
    """Train one rank from plain config data (the built-in loop, or ``script``); returns the exit code."""
    import logging

    # Imported here, after the caller could install stop handlers: these pull in torch.
    from harness.config import validate
    from harness.env import read_env
    from harness.stop.agreement import Preempted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    env = read_env()
    try:
        cfg = validate(config_data)
    except ValueError as error:  # ConfigError and OmegaConf's validation errors: the same on every rank
        if flag is not None:
            flag.uninstall()
        if env.is_main:
            print(f"harness: invalid configuration: {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    try:
        if cfg.script:
            return run_script(cfg.script, list(cfg.script_args), config_data)
        from harness.session import Session
        from harness.task import run_task

        with Session(cfg, env=env, config_data=config_data, flag=flag) as session:
            run_task(session, cfg.task, cfg.trainer)
    except Preempted as stop:
        print(f"[rank {env.rank}] stopped at step {stop.step} ({stop.reason})", file=sys.stderr, flush=True)
        return stop.code
    except KeyboardInterrupt:
        if env.is_main:
            print(f"harness: {INTERRUPTED_MESSAGE}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not report_known_error(error, env.rank):
            raise  # a bug: main() prints its traceback
        return EXIT_ERROR
    return EXIT_OK


_COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting \d+ms for (recv|send) operation|collective operation timeout")
COLLECTIVE_TIMEOUT_HINT = (
    "a collective timed out (trainer.collective_timeout_s): the ranks did not call the same collectives, "
    "or one of them was stuck. HINT: every rank must call session.save() and session.check_stop() (and "
    "collectives of your own) equally often, never under `if rank == 0`; raise "
    "trainer.collective_timeout_s if one rank may work alone longer than that")


def timeout_hint(error: BaseException) -> Optional[str]:
    """The hint for an error of a collective that timed out (gloo, NCCL's watchdog), else None."""
    return COLLECTIVE_TIMEOUT_HINT if _COLLECTIVE_TIMEOUT.search(str(error)) else None


def report_failure(rank: str, error: BaseException) -> None:
    """A bug's traceback (call inside its ``except``), then, for a collective that timed out, what
    usually causes it: ranks that did not call the same collectives."""
    print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    hint = timeout_hint(error)
    if hint:
        print(f"[rank {rank}] {hint}", file=sys.stderr, flush=True)


def report_known_error(error: BaseException, rank: int) -> bool:
    """Report a known condition in one line, ``harness: <message>``, from the rank that hit it; True
    when ``error`` was one (the rank then exits 1 without a traceback), False for anything else.

    Known conditions are CheckpointError (a folder in use by another job, a full disk, a folder that
    cannot be written, ...) and ConfigError: their message says what happened and what to do. An
    error a collective raised because OTHER ranks failed (``failed_ranks``, harness.collectives) is
    reported by those ranks, so this rank stays quiet, whatever the cause; so is one raised because a
    peer vanished, once the Session has named it (``LOST_PEER``). A bug keeps its traceback.
    """
    from harness.checkpoint.errors import CheckpointError
    from harness.collectives import FAILED_RANKS, LOST_PEER
    from harness.config import ConfigError

    if getattr(error, LOST_PEER, None):  # the Session named the rank and node that vanished
        return True
    failed = getattr(error, FAILED_RANKS, None)
    if failed is not None and rank not in failed:
        return True
    if failed is not None and error.__cause__ is not None:
        error = error.__cause__  # on the failing rank: its own error, not the collective's summary
    if not isinstance(error, (CheckpointError, ConfigError)):
        return False
    print(f"harness: {error}", file=sys.stderr, flush=True)
    return True


def run_script(path: str, args: list[str], config_data: dict) -> int:
    """Run the user's training script as ``__main__`` in this rank, as ``python path args...`` would:
    the script's folder first on ``sys.path`` (its own modules import), ``__file__`` its absolute
    path, ``sys.argv`` ``[path, *args]``. Its config is handed over in the environment variable
    HARNESS_CONFIG (``harness.load_config()`` reads it). The stop handlers installed before are
    adopted by the script's Session. Returns the script's exit code."""
    from harness.env import CONFIG_ENV

    os.environ[CONFIG_ENV] = yaml.safe_dump(config_data, sort_keys=False)
    try:
        run_as_main(path, args)
    except SystemExit as done:  # sys.exit() / Preempted from the script
        return _exit_code(done.code)
    return EXIT_OK


def run_as_main(path: str, args: list[str]) -> None:
    """Execute the file ``path`` as ``__main__``, set up as the interpreter sets up ``python path args``:
    the resolved script's folder first on ``sys.path`` (symbolic links followed), ``__file__`` the
    absolute path (Python >= 3.9), ``sys.argv`` ``[path, *args]`` with the path as given.
    (``runpy.run_path`` differs: it sets ``sys.argv[0]`` to ``__file__`` and leaves ``sys.path`` alone.)
    Raises what the script raises; OSError when the file cannot be read."""
    import builtins
    import importlib.machinery
    import types

    file = os.path.abspath(path)
    with open(file, "rb") as source:
        code = compile(source.read(), file, "exec", dont_inherit=True)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=file, __cached__=None, __builtins__=builtins, __spec__=None,
                           __loader__=importlib.machinery.SourceFileLoader("__main__", file))
    previous = sys.modules.get("__main__")
    sys.modules["__main__"] = module  # pickling by reference (spawned workers) finds the script's names
    try:
        exec(code, module.__dict__)
    finally:
        if previous is not None:
            sys.modules["__main__"] = previous


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return EXIT_ERROR


def entrypoint(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` as the whole life of a rank, then exit without torch's teardown.

    Exit codes: 0 when ``main`` returns, 75 when it raised Preempted (checkpoint saved, restart
    me), 130 after a second Ctrl-C, 1 on any other error: one line ``harness: <message>`` for a
    CheckpointError or ConfigError (see ``report_known_error``), a traceback for anything else. The process exits with
    ``os._exit`` after flushing output: a late signal during interpreter teardown, or torch's
    occasional process-group destructor abort ("terminate called without an active exception"),
    can then no longer turn a finished rank into a crash. Use it as your script's last line::

        if __name__ == "__main__":
            harness.entrypoint(main)
    """
    try:
        main()
        code = EXIT_OK
    except SystemExit as done:  # Preempted is a SystemExit with code 75
        code = _exit_code(done.code)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line for the job, not one per rank
            print(f"harness: {INTERRUPTED_MESSAGE}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException as error:
        rank = os.environ.get("RANK", "0")
        if not (isinstance(error, Exception) and report_known_error(error, int(rank) if rank.isdigit() else 0)):
            report_failure(rank, error)
        code = EXIT_ERROR
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    # Skip interpreter teardown: a late signal there (handlers are reset) or torch's process-group
    # destructor can turn a finished rank's exit code into a crash.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def install_stop_handlers(signals: Optional[Sequence[str]] = None) -> StopFlag:
    """Install the stop-signal handlers now; call it first thing in a script started by torchrun or
    srun, BEFORE importing torch (~2 s), so a signal during start-up is a stop request, not a crash.
    The script's Session adopts these handlers. Scripts run by ``python -m harness.launch`` get them
    from the launcher and need not call it."""
    from harness.config import PreemptConfig  # no torch behind it

    flag = StopFlag()
    flag.install(list(signals if signals is not None else PreemptConfig().signals))
    return flag


LAUNCHER_POLL_S = 1.0


def watch_launcher(launcher_pid: int, grace_s: float) -> None:
    """Exit this rank if its launcher died and it has not stopped within ``grace_s``.

    A rank whose launcher dies gets SIGTERM (PR_SET_PDEATHSIG, harness.launch.local) and saves and
    exits; but one blocked in native code (a collective whose peer never comes) never runs that
    handler, and would live on as an orphan holding its memory and device. Runs in a daemon thread
    (collectives release the GIL while they wait) that holds no lock while it sleeps, so a
    DataLoader worker forked meanwhile inherits nothing held; prints where the rank is stuck, exits."""
    while os.getppid() == launcher_pid:
        time.sleep(LAUNCHER_POLL_S)
    time.sleep(grace_s)
    print(f"[rank {os.environ.get('RANK', '?')}] the launcher is gone and this rank did not stop within "
          f"preempt.grace_s={grace_s:g} s (blocked in a collective or in native code?): exiting. Where "
          "it was:", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    exit_now(EXIT_ERROR)


def main() -> int:
    """``python -m harness.launch.worker``: one rank started by the local launcher."""
    from harness.env import CONFIG_ENV

    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"usage: {CONFIG_ENV}=<YAML config> python -m harness.launch.worker "
              "(started by python -m harness.launch)", file=sys.stderr)
        return 2
    config_data = yaml.safe_load(text)
    flag = install_stop_flag(config_data)
    from harness.config import PreemptConfig  # no torch behind it

    grace_s = float((config_data.get("preempt") or {}).get("grace_s", PreemptConfig().grace_s))
    threading.Thread(target=watch_launcher, args=(os.getppid(), grace_s), name="harness-launcher-watch",
                     daemon=True).start()
    try:
        return run_worker(config_data, flag)
    except Exception as error:
        report_failure(os.environ.get("RANK", "?"), error)
        return EXIT_ERROR


if __name__ == "__main__":
    exit_now(main())
