"""Stop requests: signal handlers that only record, cross-rank agreement, cloud spot notices.

A signal may reach any subset of ranks (SLURM's ``--signal`` without ``B:``, a ``kill`` of one
process, a spot notice seen only on one node). Handlers never do I/O or collectives: they set a
flag. At step boundaries every rank contributes its flag to one all-reduce(MAX), so all ranks stop
at the same step, save once and exit with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import json
import math
import logging
import signal
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional

import torch
import torch.distributed as dist

from harness.config import PREEMPTED_EXIT_CODE
from harness.signals import REASON_SPOT, StopFlag

log = logging.getLogger(__name__)

SPOT_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
}
# Signals that DataLoader workers ignore so that they outlive the main process's save.
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """Raised on every rank after the agreed stop's checkpoint is committed.

    A SystemExit, so a script that does not catch it exits with PREEMPTED_EXIT_CODE (75), which
    schedulers and the local launcher read as "checkpoint saved, restart me".
    """

    def __init__(self, step: int, reason: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.reason = reason


def agree(flag: StopFlag, device: torch.device, proposed_interval: int = 1) -> tuple[int, int]:
    """One all-reduce(MAX) of [stop reason, steps until the next agreement].

    Returns the agreed reason (non-zero on every rank if any rank wants to stop) and the agreed
    interval (rank 0 proposes it, the others send 0), so every rank calls the next agreement at the
    same step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag.reason, proposed_interval
    tensor = torch.tensor([flag.reason, proposed_interval], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    reason, interval = tensor.tolist()
    return int(reason), max(1, int(interval))


AUTO_OVERHEAD = 0.01  # auto interval: agreement costs at most 1% of training time...
AUTO_MAX_WAIT_S = 0.25  # ...and a stop request waits at most about this long for the next agreement


def auto_interval(step_s: float, agree_s: float) -> int:
    """Steps between agreements so that their cost stays under AUTO_OVERHEAD of the step time.

    Large steps (>= 100x the all-reduce) check every step; tiny steps check every k steps, but never
    so rarely that a stop request waits more than about AUTO_MAX_WAIT_S.
    """
    if step_s <= 0:
        return 1
    wanted = math.ceil(agree_s / (AUTO_OVERHEAD * step_s))
    latest = max(1, int(AUTO_MAX_WAIT_S / step_s))
    return max(1, min(wanted, latest))


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a group-wide SIGTERM must not kill workers before the save."""
    for signum in WORKER_IGNORED:
        signal.signal(signum, signal.SIG_IGN)


class ChainedWorkerInit:
    """Ignore stop signals, then run the user's own worker_init_fn (picklable for spawn)."""

    def __init__(self, user_init: Optional[Callable[[int], None]]):
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals_in_worker(worker_id)
        if self.user_init is not None:
            self.user_init(worker_id)


def notice_present(provider: str, body: bytes, status: int) -> bool:
    """Whether a metadata response announces termination.

    AWS answers 404 until a notice exists, then 200 with JSON ``{"action": "terminate"|"stop"...}``.
    GCP answers 200 with ``TRUE`` when preempted, ``FALSE`` otherwise.
    """
    if status != 200:
        return False
    text = body.decode(errors="replace").strip()
    if provider == "gcp":
        return text.upper() == "TRUE"
    try:
        return json.loads(text).get("action") in ("terminate", "stop", "hibernate")
    except (ValueError, AttributeError):
        return False


class SpotPoller:
    """A daemon thread that polls a cloud termination notice and sets the stop flag once seen."""

    def __init__(self, flag: StopFlag, provider: str, url: Optional[str], interval_s: float):
        self.flag = flag
        self.provider = provider
        self.url = url or SPOT_URLS[provider]
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-spot-poller", daemon=True)

    def start(self) -> "SpotPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def poll_once(self) -> bool:
        headers = {"Metadata-Flavor": "Google"} if self.provider == "gcp" else {}
        request = urllib.request.Request(self.url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return notice_present(self.provider, response.read(), response.status)
        except urllib.error.HTTPError as error:
            return notice_present(self.provider, b"", error.code)
        except (urllib.error.URLError, OSError):
            return False  # metadata server unreachable: no notice, keep polling

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.poll_once():
                log.warning("spot termination notice at %s: stopping at the next step", self.url)
                self.flag.request(REASON_SPOT)
                return
            self._stopped.wait(self.interval_s)


def grace_warning(save_s: float, grace_s: float) -> Optional[str]:
    """A warning when the last save would not fit in the grace window (with 20% headroom)."""
    if save_s * 1.2 <= grace_s:
        return None
    return (f"the last checkpoint save took {save_s:.1f}s, which does not fit the {grace_s:.0f}s "
            "grace window (preempt.grace_s) with headroom: a preemption may kill the job mid-save. "
            "HINT: raise the scheduler's grace time / signal lead, or enable checkpoint.async_save")

