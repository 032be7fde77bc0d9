"""The training loop's API: the harness owns distribution, checkpoints, resume and stopping.

A user's loop stays as plain as nanoGPT's::

    with Session(cfg) as session:
        model = session.prepare(MyModel())
        optimizer = torch.optim.AdamW(model.parameters())
        session.register(optimizer=optimizer)
        for batch in session.batches(session.loader(dataset, batch_size=32)):
            loss = model(batch).mean()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            session.log(loss=loss)

``batches()`` resumes from the newest complete checkpoint, restores the data position and RNG, saves
every ``checkpoint.every_steps`` and, when any rank received a stop signal, saves once and raises
``Preempted`` (exit code 75) on every rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from harness import data as data_mod
from harness.checkpoint.layout import CheckpointRef, step_dir_name
from harness.checkpoint.manager import CheckpointManager
from harness.checkpoint.payload import MODEL, Progress, StateRegistry, restore_rng, seed_everything
from harness.config import HarnessConfig, PREEMPTED_EXIT_CODE
from harness.env import DistEnv, read_env
from harness.progress import ProgressReporter
from harness.stop.agreement import AgreementClock, Preempted, agree
from harness.stop.flag import StopFlag, describe_reason
from harness.stop.spot import SpotPoller

log = logging.getLogger("harness")


class Session:
    """One rank's view of a resumable run. Use as a context manager; see the module docstring."""

    def __init__(self, cfg: HarnessConfig, env: Optional[DistEnv] = None,
                 config_data: Optional[dict] = None, flag: Optional[StopFlag] = None):
        """``flag``: a StopFlag whose handlers the caller installed earlier (e.g. before importing
        torch); the session installs its own otherwise. Either way close() uninstalls them."""
        self.cfg = cfg
        self.env = env or read_env()
        self.progress = Progress(world_size=self.env.world_size)
        self.registry = StateRegistry()
        self._flag_installed = flag is not None
        self.flag = flag if flag is not None else StopFlag()
        self.checkpoints = CheckpointManager(cfg, self.env, self.registry, self.progress,
                                             config_data or {}, self.say)
        self.clock = AgreementClock(cfg.preempt.check_every, self.env.is_main)
        self.metrics: dict[str, Any] = {}
        self._started = False
        self._reporter: Optional[ProgressReporter] = None
        self._spot: Optional[SpotPoller] = None
        self._setup()

    # ----- set-up and tear-down -------------------------------------------------------------------
    def _setup(self) -> None:
        threads = self.cfg.trainer.num_threads or default_threads(self.env.local_world_size)
        torch.set_num_threads(threads)
        if self.env.uses_cuda:
            torch.cuda.set_device(self.env.device)
        if self.env.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend=self.env.backend, rank=self.env.rank, world_size=self.env.world_size,
                init_method=f"tcp://{self.env.master_addr}:{self.env.master_port}",
                timeout=datetime.timedelta(seconds=self.cfg.trainer.collective_timeout_s))
        seed_everything(self.cfg.trainer.seed)  # identical model init on every rank
        if not self._flag_installed:
            self.flag.install(list(self.cfg.preempt.signals))
        if self.cfg.preempt.spot and self.env.local_rank == 0:
            self._spot = SpotPoller(self.flag, self.cfg.preempt.spot, self.cfg.preempt.spot_url,
                                    self.cfg.preempt.spot_poll_s).start()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(barrier=exc_type is None or issubclass(exc_type, Preempted))

    def close(self, barrier: bool = True) -> None:
        """Flush the checkpoint writer, let every rank leave together, restore signal handlers."""
        try:
            if barrier:
                self.checkpoints.flush()  # a collective: every rank learns whether the last save landed
            else:
                self.checkpoints.flush_here()
            if barrier and dist.is_initialized():
                # Gloo fails fast when a peer is gone: nobody leaves before everybody is done.
                dist.barrier()
        finally:
            if self._spot is not None:
                self._spot.stop()
            if self._reporter is not None:
                self._reporter.close()
            self.flag.uninstall()

    # ----- what the user's loop calls -------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps completed so far (restored on resume)."""
        return self.progress.step

    @property
    def device(self) -> torch.device:
        return self.env.device

    def prepare(self, model: torch.nn.Module, name: str = MODEL) -> torch.nn.Module:
        """Move the model to this rank's device, wrap it in DDP when there are several ranks, and
        register it (unwrapped, so no ``module.`` prefix ever reaches a file)."""
        model = model.to(self.env.device)
        self.registry.register(name, model)
        if self.env.world_size > 1:
            device_ids = [self.env.device.index] if self.env.uses_cuda else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def register(self, **objects: Any) -> None:
        """Register objects with state_dict()/load_state_dict() (optimizer, scheduler, scaler, ...)."""
        for name, obj in objects.items():
            self.registry.register(name, obj)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
               **kwargs: Any) -> DataLoader:
        """A DataLoader sharded over ranks whose position the harness saves and restores."""
        return data_mod.make_loader(dataset, batch_size=batch_size, rank=self.env.rank,
                                    world_size=self.env.world_size, seed=self.cfg.trainer.seed,
                                    shuffle=shuffle, num_workers=num_workers,
                                    pin_memory=self.env.uses_cuda, **kwargs)

    def log(self, **values: Any) -> None:
        """Record values for this step (tensors are read at the end of the step)."""
        self.metrics.update(values)

    def request_stop(self) -> None:
        """Ask for a stop from code: the run saves and stops at the next agreement, like a signal."""
        self.flag.request()

    def check_stop(self) -> None:
        """Agree on a stop inside a loop of yours (evaluation, warm-up); a collective call.

        Every rank must call it equally often. If any rank has a stop request, the state after the
        last completed training step is saved and Preempted is raised on every rank.
        """
        started = time.perf_counter()
        reason, interval = agree(self.flag, self.env.device, self.clock.propose())
        self.clock.agreed(self.progress.step, interval, time.perf_counter() - started)
        if reason:
            self._stop(reason)

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        """Yield one batch per optimizer step until ``trainer.max_steps``, resuming on first use."""
        self.start()
        per_epoch = data_mod.steps_per_epoch(loader)
        while self.progress.step < self.cfg.trainer.max_steps:
            if self.progress.batch_in_epoch >= per_epoch:
                self.progress.epoch += 1
                self.progress.batch_in_epoch = 0
            data_mod.position_loader(loader, self.cfg.trainer.seed, self.progress.epoch,
                                     self.progress.batch_in_epoch)
            iterator = iter(loader)
            if self.checkpoints.pending_rng is not None:
                # After iter() and the skip, so the restored state is exactly the saved one.
                restore_rng(self.checkpoints.pending_rng)
                self.checkpoints.pending_rng = None
            for batch in iterator:
                yield batch
                self._end_step()
                if self.progress.step >= self.cfg.trainer.max_steps:
                    break
        self.finish()

    # ----- resume ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the newest valid checkpoint, or start fresh (optionally from init_from)."""
        if self._started:
            return
        self._started = True
        self._reporter = ProgressReporter(
            total_steps=self.cfg.trainer.max_steps, start_step=0, log_every=self.cfg.trainer.log_every,
            enabled=self.env.is_main, metrics_path=self._metrics_path())
        ref = self.resume_point()
        if not self.cfg.checkpoint.resume and self.checkpoints.holds_checkpoints():
            self.say(f"WARNING: checkpoint.resume=false, but {self.store.root} holds checkpoints: "
                     "this run starts fresh and overwrites checkpoints of the same steps")
        if ref is None:
            seed_everything(self.cfg.trainer.seed + 1 + self.env.rank)  # distinct dropout per rank
            self.say(f"no checkpoint in {self.store.root}: starting fresh "
                     f"(rank {self.env.rank}/{self.env.world_size}, {self.env.backend}, {self.env.device})")
            if self.cfg.checkpoint.init_from:
                self.checkpoints.init_from(self.cfg.checkpoint.init_from)
        else:
            self.checkpoints.restore(ref)
        self._reporter.start_step = self.progress.step
        self._reporter.started = time.perf_counter()

    @property
    def store(self):
        """The run's CheckpointStore (commit, list, verify, prune)."""
        return self.checkpoints.store

    @property
    def resumed_from(self) -> Optional[CheckpointRef]:
        return self.checkpoints.resumed_from

    @property
    def last_saved_step(self) -> Optional[int]:
        return self.checkpoints.last_saved_step

    def _metrics_path(self) -> Optional[str]:
        if self.cfg.trainer.metrics_file:
            return self.cfg.trainer.metrics_file
        if "://" in self.cfg.checkpoint.dir:
            return None
        return os.path.join(self.cfg.checkpoint.dir, "metrics.jsonl")

    def resume_point(self) -> Optional[CheckpointRef]:
        """The checkpoint this run resumes from (None: a fresh start); a collective on first call."""
        return self.checkpoints.resume_point()

    # ----- each step ------------------------------------------------------------------------------
    def _end_step(self) -> None:
        self.clock.step_ended(time.perf_counter())
        self.progress.step += 1
        self.progress.batch_in_epoch += 1
        step = self.progress.step
        values = {key: float(value.item()) if isinstance(value, torch.Tensor) else float(value)
                  for key, value in self.metrics.items()}
        self.metrics = values
        self._reporter.update(step, values)
        last = step >= self.cfg.trainer.max_steps
        if step % self.cfg.checkpoint.every_steps == 0 or last:
            self.save()
        if not last and self.clock.due(step):
            self.check_stop()

    def _stop(self, reason_code: int) -> None:
        reason = describe_reason(reason_code)
        started = time.perf_counter()
        self.save()
        self.checkpoints.flush()
        self.say(f"stop requested ({reason}) at step {self.progress.step}: checkpoint "
                 f"{self.store.root}/{step_dir_name(self.progress.step)} committed in "
                 f"{time.perf_counter() - started:.2f}s; exiting with code {PREEMPTED_EXIT_CODE} "
                 "(relaunch to resume)")
        raise Preempted(self.progress.step, reason)

    def save(self) -> None:
        """Save now (a collective: every rank must call it). Rank 0 writes; others wait for it."""
        metric = self.metrics.get(self.cfg.checkpoint.best_metric or "")
        self.checkpoints.save(metric)

    def finish(self) -> None:
        """The run reached max_steps: make sure the final checkpoint is durable."""
        self.checkpoints.flush()
        self.say(f"finished {self.progress.step} steps; checkpoints in {self.store.root}")

    def say(self, text: str) -> None:
        """A line for the person watching (rank 0 only)."""
        if self._reporter is not None:
            self._reporter.message(text)
        elif self.env.is_main:
            print(f"[harness] {text}", flush=True)


def default_threads(local_world_size: int) -> int:
    """CPU threads per rank: the CPUs this process may run on (SLURM/cgroup affinity), shared by the
    node's ranks when they all see the whole machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    if usable >= (os.cpu_count() or 1):  # no affinity limit: the node's ranks share every core
        usable //= max(1, local_world_size)
    return max(1, usable)

