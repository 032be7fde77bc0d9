"""Run N worker processes on this machine, like torchrun, and rehearse a scheduler's restarts.

Why not torch.distributed.elastic's agent: on SIGTERM it exits 1 (hiding our "preempted" code) and
SIGKILLs workers after 30 s, and it does not forward SIGUSR1/SIGUSR2 by default. This launcher
forwards every stop signal, waits for the ranks' agreed save, and returns their exit code.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

from harness.config import PREEMPTED_EXIT_CODE, HarnessConfig, LocalLauncherConfig
from harness.progress import say as report_line
from harness.env import CONFIG_ENV, free_port
from harness.launch.worker import EXIT_INTERRUPTED
from harness.stop.flag import LAUNCHER_SIGNALS, is_new_press

# The launcher catches LAUNCHER_SIGNALS. The ranks get only their configured stop signals
# (preempt.signals): one they do not handle would kill them mid-training without a save. SIGHUP
# (terminal closed) is passed on as SIGTERM.
POLL_S = 0.05
KILL_AFTER_FAILURE_S = 10.0  # time the surviving ranks get to report a failed peer before SIGKILL
# After a second Ctrl-C a rank raises KeyboardInterrupt at once, unless it is blocked in native code
# (a collective whose peer never comes), where no Python handler runs: those are killed after this.
KILL_AFTER_INTERRUPT_S = 5.0


# Device nodes of the GPU drivers torch.cuda can use: NVIDIA's (/dev/nvidiactl, also in containers),
# AMD ROCm's (/dev/kfd) and WSL2's GPU paravirtualisation (/dev/dxg). Without any of them torch
# counts no GPU, so the launcher can say so without importing torch.
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
CPU_RANKS = 2


def default_nproc() -> int:
    """One rank per visible GPU; 2 CPU ranks without one."""
    if not any(os.path.exists(node) for node in GPU_DRIVER_NODES):
        return CPU_RANKS
    # Imported here, only when a GPU may be there to count: the launcher itself never needs torch,
    # and importing it (~2 s) would delay every worker's start by as much.
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_RANKS


def say(text: str) -> None:
    report_line(text, "harness.launch")


@dataclass
class WorkerGroup:
    """The processes of one attempt, and the signals the launcher itself received."""

    procs: list[subprocess.Popen]
    stop_signals: frozenset[int]  # what the ranks handle (preempt.signals)
    signals_received: list[int] = field(default_factory=list)
    interrupted_at: Optional[float] = None  # time.monotonic() of the second Ctrl-C
    last_interrupt: Optional[float] = None  # time.monotonic() of the last Ctrl-C counted

    def translate(self, signum: int) -> Optional[int]:
        """The signal to send the ranks for one the launcher caught, or None to send nothing."""
        if signum in self.stop_signals:
            return signum
        if signum == signal.SIGHUP and signal.SIGTERM in self.stop_signals:
            return signal.SIGTERM
        return None

    def forward(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if not is_new_press(self.last_interrupt):
                return  # the same Ctrl-C delivered twice: the ranks have it already
            self.last_interrupt = time.monotonic()
        self.signals_received.append(signum)
        if self.signals_received.count(signal.SIGINT) == 2:
            self.interrupted_at = time.monotonic()
        target = self.translate(signum)
        if target is None:
            say(f"{signal.Signals(signum).name} is not in preempt.signals: not forwarded to the ranks")
            return
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, target)
                except ProcessLookupError:
                    pass

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def worker_env(rank: int, nproc: int, master_addr: str, port: int, attempt: int) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR=master_addr,
                MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT=str(attempt),
                PYTHONUNBUFFERED="1")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prepare_rank(launcher_pid: int) -> None:
    """Runs in each child between fork and exec.

    The stop signals stay BLOCKED (the launcher blocked them to spawn; the mask survives exec): one
    that arrives before the rank installs its handlers stays pending and is handled, instead of
    killing a rank that is still importing torch while its peers wait for it. The worker unblocks
    them right after installing its handlers (harness.stop.flag).

    The rank gets SIGTERM when the launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG): it saves
    and exits instead of training on as an orphan next to a relaunched job.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the orphan guard in the worker still applies
        pass
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def run_attempt(config_text: str, nproc: int, master_addr: str, attempt: int,
                stop_signals: frozenset[int]) -> tuple[int, bool]:
    """Start the ranks, forward signals, wait. Returns (exit code, whether the launcher was signalled)."""
    port = free_port()
    group = WorkerGroup([], stop_signals)
    # A signal that arrives while the ranks are being spawned stays pending until every rank exists,
    # so it is forwarded to all of them, not to the ones started so far.
    signal.pthread_sigmask(signal.SIG_BLOCK, LAUNCHER_SIGNALS)
    previous = {signum: signal.signal(signum, group.forward) for signum in LAUNCHER_SIGNALS}
    try:
        try:
            for rank in range(nproc):
                group.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "harness.launch.worker"],
                    env=worker_env(rank, nproc, master_addr, port, attempt) | {CONFIG_ENV: config_text},
                    start_new_session=True,  # only forwarded signals reach the ranks
                    preexec_fn=functools.partial(_prepare_rank, os.getpid())))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, LAUNCHER_SIGNALS)
        return _wait(group), bool(group.signals_received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        group.kill_all()


def _wait(group: WorkerGroup) -> int:
    failed_at: Optional[float] = None
    while True:
        codes = [proc.poll() for proc in group.procs]
        # Ranks handle every signal they are sent from the first lines of the worker on, so one
        # killed by a forwarded signal had not even reached them (interpreter start-up): nothing was
        # lost since the newest checkpoint, so that counts as preempted, not failed.
        forwarded = {-target for target in map(group.translate, group.signals_received) if target}
        failures = [(rank, code) for rank, code in enumerate(codes)
                    if code is not None and code not in (0, PREEMPTED_EXIT_CODE) and code not in forwarded]
        if failures and failed_at is None:
            failed_at = time.monotonic()
            _report_failures(group, failures, running=any(code is None for code in codes))
        if all(code is not None for code in codes):
            break
        if failed_at is not None and time.monotonic() - failed_at > KILL_AFTER_FAILURE_S:
            group.kill_all()
        if group.interrupted_at is not None and time.monotonic() - group.interrupted_at > KILL_AFTER_INTERRUPT_S:
            _kill_after_interrupt(group)
            return EXIT_INTERRUPTED
        time.sleep(POLL_S)
    if any(code == EXIT_INTERRUPTED for _, code in failures):
        return EXIT_INTERRUPTED  # the others failed because of it (a peer gone mid-collective)
    if failures:
        return failures[0][1] if failures[0][1] > 0 else 128 - failures[0][1]
    if any(code in forwarded for code in codes):
        say("ranks were stopped by a forwarded signal during start-up: nothing to save since the "
            "newest checkpoint")
        return PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else 0


def _kill_after_interrupt(group: WorkerGroup) -> None:
    """The second Ctrl-C was forwarded, yet some ranks still run: kill them, and say so."""
    alive = [f"{rank} (pid {proc.pid})" for rank, proc in enumerate(group.procs) if proc.poll() is None]
    group.kill_all()
    for proc in group.procs:
        proc.wait()
    say(f"rank{'s' if len(alive) > 1 else ''} {', '.join(alive)} did not stop within {KILL_AFTER_INTERRUPT_S:.0f} s "
        "of the second Ctrl-C (blocked in a collective or in native code): killed. The job stopped "
        f"without saving at your request; exit code {EXIT_INTERRUPTED}. Relaunch the same command to "
        "resume from the newest checkpoint")


def _report_failures(group: WorkerGroup, failures: list[tuple[int, int]], running: bool) -> None:
    """One line per exit code of the ranks that failed together (the ranks say why); a rank stopped
    by a second Ctrl-C (exit 130) did what was asked, so that is said once, not reported as a crash."""
    codes = sorted({code for _, code in failures if code != EXIT_INTERRUPTED})
    for code in codes:
        ranks = [rank for rank, failed in failures if failed == code]
        names = ", ".join(f"{rank} (pid {group.procs[rank].pid})" for rank in ranks)
        say(f"rank{'s' if len(ranks) > 1 else ''} {names} failed with {describe_exit(code)}"
            + ("; stopping the other ranks" if running else ""))
    if any(code == EXIT_INTERRUPTED for _, code in failures):
        say(f"job stopped without saving at your request (second Ctrl-C); exit code {EXIT_INTERRUPTED}. "
            "Relaunch the same command to resume from the newest checkpoint")


def describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_local(config_data: dict, launcher: LocalLauncherConfig) -> int:
    """Run the job, restarting it after a preemption up to ``launcher.max_restarts`` times."""
    nproc = launcher.nproc_per_node or default_nproc()
    stop_signals = frozenset(signal.Signals[name] for name in config_data["preempt"]["signals"])
    # Handed to the ranks in their environment: no file to leave behind if the launcher is killed.
    config_text = yaml.safe_dump(config_data, sort_keys=False)
    attempt = 0
    while True:
        say(f"starting {nproc} worker processes (attempt {attempt + 1})")
        code, signalled = run_attempt(config_text, nproc, launcher.master_addr, attempt, stop_signals)
        if code != PREEMPTED_EXIT_CODE:
            return code
        if signalled or attempt >= launcher.max_restarts:
            say(f"job preempted: exit code {code} asks to restart it (relaunch the same "
                "command to resume from the newest checkpoint)")
            return code
        attempt += 1
        say(f"job preempted: restarting it ({attempt}/{launcher.max_restarts} restarts)")


def run(config_data: dict, cfg: HarnessConfig) -> int:
    """The backend entry (harness.launch.backend)."""
    return run_local(config_data, cfg.launcher)
