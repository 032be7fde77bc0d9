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
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from harness import data as data_mod
from harness.config import HarnessConfig, PREEMPTED_EXIT_CODE
from harness.env import DistEnv, read_env
from harness.keys import match_state, rename_prefixes
from harness.preempt import Preempted, SpotPoller, agree, auto_interval, grace_warning
from harness.signals import StopFlag, describe_reason
from harness.progress import ProgressReporter
from harness.state import (KEY_CONFIG, KEY_PROGRESS, KEY_RNG, KEY_STATE, MODEL, Progress,
                           StateRegistry, build_payload, capture_rng, check_payload,
                           extract_model_state, restore_rng, seed_everything, torch_load, versions)
from harness.store import CheckpointError, CheckpointRef, CheckpointStore, Retention, open_storage
from harness.writer import CheckpointWriter

log = logging.getLogger("harness")


class Session:
    """One rank's view of a resumable run. Use as a context manager; see the module docstring."""

    def __init__(self, cfg: HarnessConfig, env: Optional[DistEnv] = None,
                 config_data: Optional[dict] = None, flag: Optional[StopFlag] = None):
        """``flag``: a StopFlag whose handlers the caller installed earlier (e.g. before importing
        torch); the session installs its own otherwise. Either way close() uninstalls them."""
        self.cfg = cfg
        self.env = env or read_env()
        self.config_data = config_data or {}
        self.progress = Progress(world_size=self.env.world_size)
        self.registry = StateRegistry()
        self._flag_installed = flag is not None
        self.flag = flag if flag is not None else StopFlag()
        # Only rank 0 writes, so only rank 0 stages; the others read what rank 0 chose from dir.
        staging_dir = cfg.checkpoint.staging_dir if self.env.is_main else None
        self.store = CheckpointStore(open_storage(cfg.checkpoint.dir, staging_dir))
        self.retention = Retention(keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                   keep_best=cfg.checkpoint.keep_best, best_mode=cfg.checkpoint.best_mode)
        self.writer = CheckpointWriter(self.store, self.retention, asynchronous=cfg.checkpoint.async_save) \
            if self.env.is_main else None
        self.metrics: dict[str, float] = {}
        self.last_saved_step: Optional[int] = None
        self.resumed_from: Optional[CheckpointRef] = None
        self._started = False
        self._pending_rng: Optional[dict] = None
        self._resume_point: Optional[tuple[Optional[CheckpointRef]]] = None  # chosen once, lazily
        self._reporter: Optional[ProgressReporter] = None
        self._spot: Optional[SpotPoller] = None
        self._next_check = 0  # step at which the next stop agreement happens
        self._step_s: Optional[float] = None  # average step time (auto agreement interval)
        self._agree_s: Optional[float] = None  # average duration of an agreement
        self._agreements = 0
        self._step_started: Optional[float] = None
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
                self._flush_writes()  # a collective: every rank learns whether the last save landed
            elif self.writer is not None:
                self._flush_local()
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
        reason, interval = agree(self.flag, self.env.device, self._propose_interval())
        elapsed = time.perf_counter() - started
        # The first collective pays connection set-up; later ones are averaged against noise.
        if self._agreements:
            self._agree_s = elapsed if self._agree_s is None else 0.8 * self._agree_s + 0.2 * elapsed
        self._agreements += 1
        self._next_check = self.progress.step + interval
        if reason:
            self._stop(reason)

    def _propose_interval(self) -> int:
        """Rank 0's proposal of steps until the next agreement; the others propose 0 (MAX wins)."""
        if self.cfg.preempt.check_every:
            return self.cfg.preempt.check_every
        if not self.env.is_main or self._step_s is None or self._agree_s is None:
            return 1 if self.env.is_main else 0
        return auto_interval(self._step_s, self._agree_s)

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
            if self._pending_rng is not None:
                # After iter() and the skip, so the restored state is exactly the saved one.
                restore_rng(self._pending_rng)
                self._pending_rng = None
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
        if not self.cfg.checkpoint.resume and self.env.is_main and self.store.latest_listed():
            self.say(f"WARNING: checkpoint.resume=false, but {self.store.root} holds checkpoints: "
                     "this run starts fresh and overwrites checkpoints of the same steps")
        if ref is None:
            seed_everything(self.cfg.trainer.seed + 1 + self.env.rank)  # distinct dropout per rank
            self.say(f"no checkpoint in {self.store.root}: starting fresh "
                     f"(rank {self.env.rank}/{self.env.world_size}, {self.env.backend}, {self.env.device})")
            if self.cfg.checkpoint.init_from:
                self._init_from(self.cfg.checkpoint.init_from)
        else:
            self._restore_everywhere(ref)
        self._reporter.start_step = self.progress.step
        self._reporter.started = time.perf_counter()

    def _metrics_path(self) -> Optional[str]:
        if self.cfg.trainer.metrics_file:
            return self.cfg.trainer.metrics_file
        if "://" in self.cfg.checkpoint.dir:
            return None
        return os.path.join(self.cfg.checkpoint.dir, "metrics.jsonl")

    def resume_point(self) -> Optional[CheckpointRef]:
        """The checkpoint this run resumes from (None: a fresh start); a collective on first call."""
        if self._resume_point is None:
            self._resume_point = (self._choose_checkpoint(),) if self.cfg.checkpoint.resume else (None,)
        return self._resume_point[0]

    def _choose_checkpoint(self) -> Optional[CheckpointRef]:
        """Rank 0 verifies and picks; every rank loads the same one."""
        def newest_valid() -> Optional[CheckpointRef]:
            self.store.storage.flush()  # staging: finish uploads left by a crash, so others can read them
            return self.store.latest_valid(checksum=self.cfg.checkpoint.verify)

        return self._on_rank0(newest_valid, f"rank 0 could not look for checkpoints in {self.store.root}")

    def _on_rank0(self, work: Callable[[], Any], failure: str) -> Any:
        """Run ``work`` on rank 0 and hand its result to every rank (a collective).

        If it raised, every rank raises a CheckpointError starting with ``failure``, so no rank is
        left waiting in a later collective for a peer that died.
        """
        result, error = None, None
        if self.env.is_main:
            try:
                result = work()
            except Exception as exc:  # disk, network, serialization: every rank must learn it
                error = exc
        shared = [result, None if error is None else f"{type(error).__name__}: {error}"]
        if dist.is_initialized():
            dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None:
            raise CheckpointError(f"{failure}: {shared[1]}") from error
        return shared[0]

    def _load_payload(self, ref: CheckpointRef) -> dict:
        rel = f"{ref.name}/state.pt"
        path = self.store.storage.local_path(rel)
        source = path if path is not None else _read_remote(self.store, rel)
        payload = torch_load(source, map_location=self.env.device,
                             unsafe=self.cfg.checkpoint.unsafe_load, mmap=path is not None)
        return check_payload(payload, f"{self.store.root}/{rel}")

    def _restore_everywhere(self, ref: CheckpointRef) -> None:
        """Restore on every rank; if any rank fails, all of them raise (none waits in a collective)."""
        error = None
        try:
            self._restore(ref)
        except Exception as exc:
            error = exc
        failed = torch.tensor([error is not None], dtype=torch.int64, device=self.env.device)
        if dist.is_initialized():
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise CheckpointError(f"another rank failed to load {self.store.root}/{ref.name}; see its log")

    def _restore(self, ref: CheckpointRef) -> None:
        started = time.perf_counter()
        payload = self._load_payload(ref)
        self.registry.load_state_dict(payload[KEY_STATE])
        self.progress.load_state_dict(payload[KEY_PROGRESS])
        self._remap_world(payload[KEY_RNG])
        self.last_saved_step = self.progress.step
        self.resumed_from = ref
        self._warn_config_changes(payload.get(KEY_CONFIG) or {})
        self.say(f"resumed from {self.store.root}/{ref.name} at step {self.progress.step} "
                 f"(epoch {self.progress.epoch}, batch {self.progress.batch_in_epoch}) "
                 f"in {time.perf_counter() - started:.2f}s; restart #{self.env.restart_count}")
        save_s = ref.manifest.get("write_s")
        warning = grace_warning(save_s, self.cfg.preempt.grace_s) if save_s else None
        if warning:
            self.say("WARNING: " + warning)

    def _remap_world(self, rng_per_rank: list) -> None:
        saved_world = len(rng_per_rank)
        if saved_world == self.env.world_size:
            self._pending_rng = rng_per_rank[self.env.rank]
            return
        # DDP state is replicated, so weights and optimizer carry over exactly. The data position is
        # kept by samples consumed in the epoch; per-rank RNG streams cannot be kept.
        samples_done = self.progress.batch_in_epoch * self.progress.world_size
        self.progress.batch_in_epoch = samples_done // self.env.world_size
        self.progress.world_size = self.env.world_size
        seed_everything(self.cfg.trainer.seed + 1 + self.env.rank + 7919 * self.progress.step)
        self.say(f"WARNING: checkpoint was written by {saved_world} ranks, this run has "
                 f"{self.env.world_size}: weights, optimizer and step carry over exactly; the data "
                 f"position is kept by samples consumed (batch {self.progress.batch_in_epoch} of epoch "
                 f"{self.progress.epoch}); RNG streams are reseeded, so the run will not match an "
                 "uninterrupted one bit for bit")

    def _warn_config_changes(self, saved: dict) -> None:
        old = (saved.get("trainer") or {}).get("max_steps")
        if old is not None and old != self.cfg.trainer.max_steps:
            self.say(f"WARNING: trainer.max_steps changed from {old} to {self.cfg.trainer.max_steps} "
                     "since the checkpoint: schedules that depend on it (e.g. cosine LR) will differ "
                     "from an uninterrupted run")

    def _init_from(self, path: str) -> None:
        model = self.registry.get(MODEL)
        if model is None:
            raise RuntimeError("checkpoint.init_from needs a model: call session.prepare(model) first")
        file_state = extract_model_state(
            torch_load(path, map_location=self.env.device, unsafe=self.cfg.checkpoint.unsafe_load), path)
        file_state = rename_prefixes(file_state, self.cfg.checkpoint.init_rename)
        loadable, report = match_state(model.state_dict(), file_state)
        if self.cfg.checkpoint.init_strict and not report.clean:
            raise ValueError(f"checkpoint.init_from={path} does not match the model "
                             f"(checkpoint.init_strict=true):\n{report.format()}")
        model.load_state_dict(loadable, strict=False)
        self.say(f"initialised {len(loadable)} tensors from {path}\n{report.format()}")

    # ----- each step ------------------------------------------------------------------------------
    def _end_step(self) -> None:
        now = time.perf_counter()
        if self._step_started is not None:  # exponential average of the step time, for auto checks
            elapsed = now - self._step_started
            self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed
        self._step_started = now
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
        if not last and step >= self._next_check:
            self.check_stop()

    def _stop(self, reason_code: int) -> None:
        reason = describe_reason(reason_code)
        started = time.perf_counter()
        if self.last_saved_step != self.progress.step:
            self.save()
        self._flush_writes()
        self.say(f"stop requested ({reason}) at step {self.progress.step}: checkpoint "
                 f"{self.store.root}/step_{self.progress.step:09d} committed in "
                 f"{time.perf_counter() - started:.2f}s; exiting with code {PREEMPTED_EXIT_CODE} "
                 "(relaunch to resume)")
        raise Preempted(self.progress.step, reason)

    def save(self) -> None:
        """Save now (a collective: every rank must call it). Rank 0 writes; others wait for it."""
        if self.last_saved_step == self.progress.step:
            return
        rng_per_rank = self._gather_rng()

        def submit() -> None:  # rank 0; returns once committed (async: once snapshotted)
            payload = build_payload(self.registry.state_dict(), self.progress, rng_per_rank, self.config_data)
            metric = self.metrics.get(self.cfg.checkpoint.best_metric or "")
            info = versions() | {"world_size": self.env.world_size, "metric": metric}
            self.writer.submit(self.progress.step, payload, info)

        self._on_rank0(submit, f"rank 0 failed to save step {self.progress.step}")
        self.last_saved_step = self.progress.step
        if self.writer is not None and self.writer.last_save_s is not None:
            warning = grace_warning(self.writer.last_save_s, self.cfg.preempt.grace_s)
            if warning and not self.writer.asynchronous:
                self.say("WARNING: " + warning)

    def _flush_writes(self) -> None:
        """Wait until the last checkpoint is committed (and uploaded, when staging); a collective.

        Rank 0 flushes and tells every rank the outcome, so no rank reports a save that failed.
        """
        self._on_rank0(self._flush_local, f"rank 0 failed to commit step {self.last_saved_step}")

    def _flush_local(self) -> None:
        """Rank 0: wait for the background writer, then for staged uploads."""
        self.writer.flush()
        self.store.storage.flush()

    def _gather_rng(self) -> list:
        state = capture_rng()
        if not dist.is_initialized():
            return [state]
        gathered: list = [None] * self.env.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def finish(self) -> None:
        """The run reached max_steps: make sure the final checkpoint is durable."""
        self._flush_writes()
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


def _read_remote(store: CheckpointStore, rel: str):
    import io

    return io.BytesIO(store.storage.read_bytes(rel))
