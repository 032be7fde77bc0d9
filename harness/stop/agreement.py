"""Cross-rank agreement on a stop request, and the clock that decides when to agree.

A signal may reach any subset of ranks (SLURM's ``--signal`` without ``B:``, a ``kill`` of one
process, a spot notice seen only on one node). Handlers never do I/O or collectives: they set a
flag. At step boundaries every rank contributes its flag to one all-reduce(MAX), so all ranks stop
at the same step, save once and exit with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from harness.config import PREEMPTED_EXIT_CODE
from harness.stop.flag import StopFlag


class Preempted(SystemExit):
    """Raised on every rank after the agreed stop's checkpoint is committed.

    A SystemExit, so a script that does not catch it exits with PREEMPTED_EXIT_CODE (75), which
    schedulers and the local launcher read as "checkpoint saved, restart me".
    """

    def __init__(self, step: int, reason: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.reason = reason


def agree(flag: StopFlag, device: torch.device, proposed_interval: int = 1) -> tuple[int, int, float]:
    """One all-reduce(MAX) of [stop reason, steps until the next agreement, age of the request].

    Returns the agreed reason (non-zero on every rank if any rank wants to stop), the agreed
    interval (rank 0 proposes it, the others send 0), so every rank calls the next agreement at the
    same step, and the seconds since the first rank's stop request (0.0 without one): each rank
    sends its own request's age, so the stop line times from the signal wherever it arrived. A
    single process has nobody to agree with: it reads its flag at every step's end.
    """
    age_ms = 0 if flag.requested_at is None else int(1000 * (time.monotonic() - flag.requested_at))
    if not (dist.is_available() and dist.is_initialized()):
        return flag.reason, 1, age_ms / 1000
    tensor = torch.tensor([flag.reason, proposed_interval, age_ms], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    reason, interval, oldest_ms = tensor.tolist()
    return int(reason), max(1, int(interval)), oldest_ms / 1000


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


class AgreementClock:
    """Decides at which steps the ranks agree on a stop (the agreement itself is a collective).

    ``check_every > 0`` agrees every that many steps. ``0`` (auto): rank 0 times steps and
    agreements and proposes an interval (auto_interval); the others propose 0 and MAX picks rank 0's,
    so every rank agrees at the same step.
    """

    def __init__(self, check_every: int, is_main: bool):
        self.check_every = check_every
        self.is_main = is_main
        self.next_step = 0  # the step at which the next agreement happens
        self._step_s: Optional[float] = None  # average step time
        self._agree_s: Optional[float] = None  # average duration of an agreement
        self._agreements = 0
        self._step_started: Optional[float] = None

    def step_ended(self, now: float) -> None:
        if self._step_started is not None:  # exponential average, robust to one slow step
            elapsed = now - self._step_started
            self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed
        self._step_started = now

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def propose(self) -> int:
        """This rank's proposal of steps until the next agreement."""
        if self.check_every:
            return self.check_every
        if not self.is_main or self._step_s is None or self._agree_s is None:
            return 1 if self.is_main else 0
        return auto_interval(self._step_s, self._agree_s)

    def agreed(self, step: int, interval: int, elapsed_s: float) -> None:
        # The first collective pays connection set-up; later ones are averaged against noise.
        if self._agreements:
            self._agree_s = elapsed_s if self._agree_s is None else 0.8 * self._agree_s + 0.2 * elapsed_s
        self._agreements += 1
        self.next_step = step + interval


def grace_warning(save_s: float, grace_s: float, what: str = "the last checkpoint save",
                  waited_s: float = 0.0) -> Optional[str]:
    """A warning when ``what`` (which took ``save_s``) would not fit in the grace window (with 20%
    headroom). ``waited_s``: the part of it spent before the ranks agreed to stop (the step or the
    loop of yours that was running), when most of the time went there rather than to the save."""
    if save_s * 1.2 <= grace_s:
        return None
    problem = (f"{what} took {save_s:.1f}s, which does not fit the {grace_s:.0f}s grace window "
               "(preempt.grace_s) with headroom: a preemption may kill the job mid-save. ")
    if waited_s > save_s / 2:
        return problem + (f"{waited_s:.1f}s of it passed before the ranks agreed to stop. HINT: a long "
                          "step or a loop of yours (an evaluation) ran between agreements: set "
                          "preempt.check_every=1, or end such a loop early with session.check_stop() "
                          "where its results may be dropped (README: Exactness)")
    return problem + ("HINT: raise the scheduler's grace time / signal lead, or enable "
                      "checkpoint.async_save")
