"""Submit the job to SLURM through submitit, and requeue it after a preemption.

Each SLURM task runs one rank in-process (``SlurmEntry``); ranks and the rendezvous come from the
SLURM variables (harness.env), the port from the job id, so a requeued job finds itself again. The
pickled entry holds only the resolved config: the run's name and its absolute checkpoint folder,
nothing that changes between requeues.

Signals: submitit asks SLURM for ``--signal=USR2@<lead>`` (to every task); ``scontrol requeue`` and
partition preemption send SIGTERM, then SIGKILL after KillWait/GraceTime. The harness's own handlers
replace submitit's for the duration of training: every rank agrees, rank 0 saves, and rank 0 then
requeues the job itself with ``scontrol requeue`` (a preempted job that exits is not requeued by
SLURM on its own). Time-outs (a stop late in the time limit) spend a budget; preemptions do not.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from harness.config import PREEMPTED_EXIT_CODE, HarnessConfig, SlurmLauncherConfig
from harness.progress import say as report_line
from harness.env import DistEnv, read_env

TIMEOUT_MARGIN_S = 90  # SLURM checks time limits coarsely: warnings can come 30-60 s early
FOLLOW_POLL_S = 5.0
# PREEMPTED is final too: a preempted job that SLURM does not requeue (JobRequeue=0, no --requeue).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TIMEOUT_COUNTER = "timeouts.json"


class SlurmError(RuntimeError):
    """SLURM refused or could not do something; the message says what and how to fix it."""


def say(text: str) -> None:
    report_line(text, "harness.slurm")


def scontrol(*args: str) -> str:
    """Run scontrol; a missing binary or a failure becomes a SlurmError with its output."""
    binary = shutil.which("scontrol")
    if binary is None:
        raise SlurmError("scontrol is not on PATH: cannot talk to SLURM from this node. "
                         "HINT: load your cluster's slurm module, or run where SLURM clients exist")
    result = subprocess.run([binary, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmError(f"scontrol {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Restarts, RunTime, ...)."""
    text = scontrol("show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", text))


class TimeoutBudget:
    """Requeues spent on time-outs, counted in a file in the run's stable SLURM folder."""

    def __init__(self, folder: str, limit: int):
        self.path = os.path.join(folder, TIMEOUT_COUNTER)
        self.limit = limit

    def used(self) -> int:
        try:
            with open(self.path) as handle:
                return int(json.load(handle)["timeouts"])
        except FileNotFoundError:
            return 0

    def reset(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def spend(self) -> bool:
        """Count one time-out; False when the budget was already exhausted."""
        used = self.used()
        if used >= self.limit:
            return False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as handle:
            json.dump({"timeouts": used + 1}, handle)
        os.replace(self.path + ".tmp", self.path)
        return True


def is_time_out(elapsed_s: float, timeout_min: int, signal_delay_s: int) -> bool:
    """A stop this late in the time limit is the time-limit warning, not a preemption."""
    return elapsed_s >= timeout_min * 60 - signal_delay_s - TIMEOUT_MARGIN_S


def requeue_after_preemption(env: DistEnv, launcher: Optional[SlurmLauncherConfig], elapsed_s: float) -> None:
    """Rank 0, after the checkpoint is committed: put the job back in the queue (or say why not)."""
    if not env.is_main:
        return
    job_id = env.slurm_job
    if job_id is None:
        raise SlurmError("SLURM_JOB_ID is not set: this process is not a SLURM job")
    if launcher is not None and is_time_out(elapsed_s, launcher.timeout_min, launcher.signal_delay_s):
        budget = TimeoutBudget(launcher.folder, launcher.max_timeout_requeues)
        if not budget.spend():
            say(f"time limit reached and the time-out requeue budget ({budget.limit}, "
                "launcher.max_timeout_requeues) is spent: not requeueing. The checkpoint is saved; "
                "resubmit the same command to continue")
            return
        say(f"time limit reached: requeueing job {job_id} (time-out {budget.used()}/{budget.limit})")
    else:
        say(f"preempted: requeueing job {job_id} (restart #{env.restart_count + 1})")
    try:
        scontrol("requeue", job_id)
    except SlurmError as error:
        say(f"WARNING: {error}. The checkpoint is saved: if SLURM does not requeue the job itself, "
            "resubmit the same command to resume")


def announce(env: DistEnv) -> None:
    """One line per task naming the job and how often SLURM restarted it."""
    say(f"rank {env.rank}/{env.world_size} on {os.uname().nodename}, job "
        f"{env.slurm_job}, SLURM_RESTART_COUNT={env.restart_count}")


class SlurmEntry:
    """What submitit runs in every task: one rank of the job, then a requeue if it was preempted."""

    def __init__(self, config_data: dict):
        self.config_data = config_data

    def __call__(self) -> dict:
        from harness.config import validate
        from harness.launch.worker import install_stop_flag, run_worker

        started = time.monotonic()
        # submitit's handlers requeue from inside the handler, on rank 0 alone, and the harness would
        # chain to them. The harness agrees across ranks, saves, then requeues: take them out, and
        # record stop signals from now on.
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        flag = install_stop_flag(self.config_data)
        env = read_env()
        launcher = validate(self.config_data).launcher
        announce(env)
        code = run_worker(self.config_data, flag)
        if code == PREEMPTED_EXIT_CODE:
            requeue_after_preemption(env, launcher, time.monotonic() - started)
            atexit.register(exit_without_teardown)
            return {"status": "preempted", "rank": env.rank}
        if code != 0:
            raise RuntimeError(f"rank {env.rank} failed with exit code {code}")
        atexit.register(exit_without_teardown)
        return {"status": "finished", "rank": env.rank}


def exit_without_teardown() -> None:
    """At interpreter exit, after submitit pickled the result: leave without torch's teardown.

    Ranks that completed (past the final barrier) sometimes abort in torch's process-group teardown
    ("terminate called without an active exception", exit 134), most often across hosts. submitit
    writes the result pickle after ``SlurmEntry`` returns, so ``os._exit`` cannot go there; atexit
    runs after that, and after non-daemon threads were joined. An uncaught exception (e.g. the
    pickle could not be written) keeps its exit code 1.
    """
    code = 1 if getattr(sys, "last_value", None) is not None else 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def partition_limits(partition: Optional[str]) -> Optional[tuple[str, int, int]]:
    """(name, nodes, most CPUs on one node) of a partition (the default one when None), via sinfo.

    None when sinfo is unavailable; a SlurmError when the partition does not exist.
    """
    binary = shutil.which("sinfo")
    if binary is None:
        return None
    result = subprocess.run([binary, "-h", "-o", "%P|%D|%c"], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    rows = {}
    default = None
    for line in result.stdout.split():
        name, nodes, cpus = line.split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        previous = rows.get(name, (0, 0))
        rows[name] = (previous[0] + int(nodes), max(previous[1], int(re.sub(r"\D", "", cpus) or 0)))
    wanted = partition or default
    if wanted not in rows:
        raise SlurmError(f"launcher.partition={partition!r} does not exist on this cluster; "
                         f"partitions: {sorted(rows)}")
    return wanted, rows[wanted][0], rows[wanted][1]


def check_request(launcher: SlurmLauncherConfig) -> None:
    """Refuse, before sbatch, a request no node of the partition can ever satisfy."""
    limits = partition_limits(launcher.partition)
    if limits is None:
        return
    name, nodes, cpus = limits
    wanted = launcher.nproc_per_node * launcher.cpus_per_task
    if wanted > cpus:
        raise SlurmError(
            f"launcher.nproc_per_node={launcher.nproc_per_node} x launcher.cpus_per_task="
            f"{launcher.cpus_per_task} = {wanted} CPUs per node, but partition {name!r} nodes have at "
            f"most {cpus}. HINT: lower one of them, or pick another launcher.partition")
    if launcher.nodes > nodes:
        raise SlurmError(f"launcher.nodes={launcher.nodes}, but partition {name!r} has {nodes} node(s)")


def absolute_dirs(config_data: dict) -> dict:
    """Pin relative local paths to the submit directory (the job's cwd may differ)."""
    data = json.loads(json.dumps(config_data))
    for section, key in (("checkpoint", "dir"), ("launcher", "folder")):
        value = data[section][key]
        if "://" not in value:
            data[section][key] = os.path.abspath(value)
    if data.get("script"):
        data["script"] = os.path.abspath(data["script"])
    if "://" in data["launcher"]["folder"]:
        raise SlurmError(f"launcher.folder={data['launcher']['folder']} is a URL, but submitit needs a "
                         "shared local folder for logs and job pickles. HINT: set launcher.folder="
                         "<path on a shared filesystem> when checkpoint.dir is a URL")
    return data


def make_executor(cfg: HarnessConfig, folder: str):
    import submitit

    launcher: SlurmLauncherConfig = cfg.launcher
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    parameters = dict(
        name=cfg.name, nodes=launcher.nodes, tasks_per_node=launcher.nproc_per_node,
        cpus_per_task=launcher.cpus_per_task, timeout_min=launcher.timeout_min,
        slurm_signal_delay_s=launcher.signal_delay_s,
        # --requeue: clusters with JobRequeue=0 refuse `scontrol requeue` of jobs submitted without it.
        slurm_additional_parameters={"requeue": True, **dict(launcher.additional)},
    )
    if launcher.gpus_per_node:
        parameters["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb is not None:
        parameters["mem_gb"] = launcher.mem_gb
    optional = {"slurm_partition": launcher.partition, "slurm_account": launcher.account,
                "slurm_qos": launcher.qos, "slurm_constraint": launcher.constraint}
    parameters.update({key: value for key, value in optional.items() if value})
    executor.update_parameters(**parameters)
    return executor


def submit(config_data: dict, cfg: HarnessConfig) -> int:
    """Submit and print the job id and log folder; with launcher.follow, wait for the end."""
    try:
        data = absolute_dirs(config_data)
    except SlurmError as error:
        say(str(error))
        return 2
    folder = data["launcher"]["folder"]
    if shutil.which("sbatch") is None:
        say("sbatch is not on PATH: cannot submit. HINT: run on a SLURM login node "
            "(or start the local test cluster: bash slurm/local-cluster.sh start)")
        return 2
    try:
        check_request(cfg.launcher)
    except SlurmError as error:
        say(f"SLURM rejected the job: {error}")
        return 2
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = make_executor(cfg, folder)
    # A new submission gets the whole time-out budget again (requeues of THIS job spend it).
    TimeoutBudget(folder, cfg.launcher.max_timeout_requeues).reset()
    try:
        job = executor.submit(SlurmEntry(data))
    except subprocess.CalledProcessError as error:
        output = (error.output or b"")
        output = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        say(f"SLURM rejected the job: {output.strip() or error}")
        return 2
    except (FailedJobError, FailedSubmissionError, OSError) as error:  # submitit's wrappers of sbatch errors
        say(f"SLURM rejected the job: {str(error).strip()}")
        return 2
    say(f"submitted job {job.job_id} ({cfg.name}); logs: {folder}/{job.job_id}_*_log.out|err; "
        f"checkpoints: {data['checkpoint']['dir']}")
    print(job.job_id, flush=True)
    if not cfg.launcher.follow:
        return 0
    return follow(job)


def follow(job) -> int:
    """Print state changes (and requeues) until the job ends. 0 only when it COMPLETED and its
    ranks finished training; 75 when it stopped after a save without being requeued; 1 otherwise."""
    last = None
    while True:
        try:
            info = job_info(job.job_id)
        except SlurmError as error:  # the record expired (MinJobAge) before we saw the end
            say(f"job {job.job_id}: no longer known to SLURM ({error}); see its logs")
            return 1
        state = info.get("JobState", "UNKNOWN")
        current = (state, info.get("Restarts"))
        if current != last:
            say(f"job {job.job_id}: {state} (restarts {info.get('Restarts', '0')})")
            last = current
        if state in FINAL_STATES:
            return _final_code(job, state)
        time.sleep(FOLLOW_POLL_S)


def _final_code(job, state: str) -> int:
    if state == "PREEMPTED":
        say(f"job {job.job_id} was preempted and not requeued: relaunch to resume")
        return PREEMPTED_EXIT_CODE
    if state != "COMPLETED":
        return 1
    try:
        statuses = {result.get("status") for result in job.results()}
    except Exception as error:  # submitit raises its own types for unreadable result pickles
        say(f"job {job.job_id} COMPLETED but its results are unreadable ({error})")
        return 1
    if "preempted" in statuses:
        say(f"job {job.job_id} stopped after saving a checkpoint and was not requeued (is requeue "
            "allowed on this cluster?): relaunch to resume")
        return PREEMPTED_EXIT_CODE
    return 0


def run(config_data: dict, cfg: HarnessConfig) -> int:
    """The backend entry (harness.launch.backend)."""
    return submit(config_data, cfg)
