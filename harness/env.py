"""Where this process sits in the job: read once from the environment, then passed as an object.

This is the only module that reads the distributed-launch variables. It understands torchrun-style
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), SLURM task
variables (``SLURM_PROCID`` ...), and falls back to a single process.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    import torch

# SLURM jobs derive the rendezvous port from the job id so that every task, and every requeue of the
# job, computes the same port without talking to the others.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Rank, world and device of this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single": which variables the values came from
    restart_count: int = 0  # how many times the scheduler restarted this job (SLURM_RESTART_COUNT)
    slurm_job: Optional[str] = None  # the id `scontrol requeue` takes: "<array job>_<task>" or the job id

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_cuda(self) -> bool:
        # torch is imported where a device is asked for, not with this module: the launcher reads
        # the environment too, and importing torch there (~2 s) would delay every rank's start.
        import torch

        return torch.cuda.is_available()

    @property
    def backend(self) -> str:
        """nccl when this process has a GPU, gloo otherwise."""
        return "nccl" if self.uses_cuda else "gloo"

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` with GPUs, else the CPU."""
        import torch

        if self.uses_cuda:
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


CONFIG_ENV = "HARNESS_CONFIG"  # the resolved config (YAML text) the launcher hands to each rank


def launched_config(environ: Mapping[str, str] | None = None) -> Optional[dict]:
    """The config the launcher handed to this process (a rank, or a user's script), or None."""
    text = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if not text:
        return None
    import yaml

    return yaml.safe_load(text)


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launch variables once. Raises ValueError naming a malformed variable."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _from_slurm(environ)
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                   master_addr="127.0.0.1", master_port=free_port(), source="single")


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def slurm_job_id(environ: Mapping[str, str]) -> Optional[str]:
    """``<array job>_<task>`` for array jobs, else SLURM_JOB_ID; None outside SLURM."""
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return environ.get("SLURM_JOB_ID")


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return DistEnv(
        rank=rank,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        world_size=world_size,
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world_size),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", 29500),
        source="torchrun",
        restart_count=_int(environ, "SLURM_RESTART_COUNT", 0) or _int(environ, "TORCHELASTIC_RESTART_COUNT", 0)
        or _int(environ, "HARNESS_RESTART_COUNT", 0),
        slurm_job=slurm_job_id(environ),
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    job_id = environ.get("SLURM_ARRAY_JOB_ID") or environ.get("SLURM_JOB_ID", "0")
    task_id = environ.get("SLURM_ARRAY_TASK_ID", "0")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        world_size=_int(environ, "SLURM_NTASKS"),
        local_world_size=_int(environ, "SLURM_NTASKS_PER_NODE", 0)
        or _tasks_on_this_node(environ),
        master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
        master_port=_int(environ, "MASTER_PORT", 0) or slurm_port(f"{job_id}_{task_id}"),
        source="slurm",
        restart_count=_int(environ, "SLURM_RESTART_COUNT", 0) or _int(environ, "HARNESS_RESTART_COUNT", 0),
        slurm_job=slurm_job_id(environ),
    )


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; the local count is what matters for device choice.
    raw = environ.get("SLURM_TASKS_PER_NODE", "1")
    match = re.match(r"(\d+)", raw)
    return int(match.group(1)) if match else 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[03-05,07],gpu1`` -> ``node03``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_key: str) -> int:
    """A port in [20000, 40000) derived from the job id, identical on every task and requeue.

    A hash, not the id modulo the span: ids that differ by a multiple of the span (or a trailing
    array index) must not collide on a shared node.
    """
    digest = hashlib.sha256(job_key.encode()).digest()
    return SLURM_PORT_BASE + int.from_bytes(digest[:4], "big") % SLURM_PORT_SPAN


def free_port() -> int:
    """A TCP port the OS says is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
