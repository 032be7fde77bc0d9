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

import dataclasses
import datetime
import itertools
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset

from harness import data as data_mod
from harness.checkpoint.flat import is_dtensor
from harness.checkpoint.layout import CheckpointRef, step_dir_name
from harness.checkpoint.manager import CheckpointManager
from harness.checkpoint.payload import (MODEL, STREAM, DataShape, Progress, StateRegistry, duplicate_name,
                                        restore_rng, seed_everything)
from harness.checkpoint.folder import check_run_folders
from harness.collectives import LOST_PEER, Peer, describe_lost_peer, gather_peers, on_rank0
from harness.config import HarnessConfig, PREEMPTED_EXIT_CODE, validate
from harness.env import DistEnv, launched_config, read_env
from harness.progress import ProgressReporter
from harness.sinks import open_metrics_file, open_sinks
from harness.stop.agreement import AgreementClock, Preempted, agree, grace_warning
from harness.stop.flag import StopFlag, describe_reason
from harness.stop.spot import SpotPoller
from harness.strategy import make_strategy

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
        self.strategy = make_strategy(cfg.trainer, self.env)  # how the model is spread over the ranks
        # Handlers installed earlier (the launcher's worker, install_stop_handlers()) are adopted:
        # a signal that arrived while torch was importing is already recorded in that flag.
        flag = flag if flag is not None else StopFlag.installed(list(cfg.preempt.signals))
        self._flag_installed = flag is not None
        self.flag = flag if flag is not None else StopFlag()
        # The resolved config saved in every checkpoint: the launcher's (a script run by it), else cfg's.
        config_data = config_data or launched_config() or dataclasses.asdict(cfg)
        self._config_data = config_data  # also W&B's run config
        self.checkpoints = CheckpointManager(cfg, self.env, self.registry, self.progress, config_data, self.say,
                                             self.strategy)
        self.checkpoints.read_ahead()  # a restart's checkpoint is read while the script builds its model
        self.clock = AgreementClock(cfg.preempt.check_every, self.env.is_main)
        self.metrics: dict[str, Any] = {}  # values logged during the current step
        self._ended_metrics: dict[str, Any] = {}  # the values of the last completed step (its save's metric)
        self._started = False
        self._finished = False  # batches() ran to max_steps
        self._in_step = False  # inside the body of batches(): the state is mid-step
        self._stop_reason = 0  # a stop agreed mid-step, carried out when the step ends
        self._signal_at: Optional[float] = None  # time.monotonic() of the first rank's stop request
        self._save_requested = False  # save() called mid-step, carried out when the step ends
        self._data = DataShape()  # what batches()'s loader is: batch, dataset size, whose sampler
        self._loader: Optional[DataLoader] = None  # the loader batches() reads
        self._made_loader: Optional[DataLoader] = None  # the last one session.loader() returned
        self._accumulate = 1  # micro-batches per step in batches()
        self._adopted: Optional[tuple[DataLoader, DataLoader]] = None  # (a script's loader, its copy)
        self._reporter: Optional[ProgressReporter] = None
        self._spot: Optional[SpotPoller] = None
        self.peers: list[Peer] = []
        self._setup()

    # ----- set-up and tear-down -------------------------------------------------------------------
    def _setup(self) -> None:
        threads = self.cfg.trainer.num_threads or default_threads(self.env.local_world_size)
        torch.set_num_threads(threads)
        if self.env.uses_cuda:
            torch.cuda.set_device(self.env.device)
        # FSDP2 needs a process group (its device mesh) even on one rank.
        if (self.env.world_size > 1 or self.strategy.sharded) and not dist.is_initialized():
            dist.init_process_group(
                backend=self.env.backend, rank=self.env.rank, world_size=self.env.world_size,
                init_method=f"tcp://{self.env.master_addr}:{self.env.master_port}",
                timeout=datetime.timedelta(seconds=self.cfg.trainer.collective_timeout_s))
        # Which rank runs where, so a failed collective can name the node that went away.
        self.peers = gather_peers()
        seed_everything(self.cfg.trainer.seed)  # identical model init on every rank
        if not self._flag_installed:
            self.flag.install(list(self.cfg.preempt.signals))
        if self.cfg.preempt.spot and self.env.local_rank == 0:
            self._spot = SpotPoller(self.flag, self.cfg.preempt.spot, self.cfg.preempt.spot_url,
                                    self.cfg.preempt.spot_poll_s).start()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, Preempted):
            lost = describe_lost_peer(exc, self.peers, self.env.rank)
            if lost is not None:  # every rank that saw it says so: the survivors' logs name the node
                print(f"[rank {self.env.rank}] {lost}", file=sys.stderr, flush=True)
                setattr(exc, LOST_PEER, lost)  # said: the worker prints no traceback of the broken collective
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
            data_mod.release(self._loader, persistent_too=True)  # persistent workers end with the run
            if self._spot is not None:
                self._spot.stop()
            if self._reporter is not None:
                self._reporter.close()
            self.checkpoints.unlock()
            self.flag.uninstall()

    # ----- what the user's loop calls -------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps completed so far (restored on resume)."""
        return self.progress.step

    @property
    def device(self) -> torch.device:
        return self.env.device

    # ----- where the loop is in its epoch (restored on resume, so a script's per-epoch logic holds) --
    @property
    def epoch(self) -> int:
        """The epoch the current (or next) step's data comes from, counted from 0."""
        return self.progress.epoch

    @property
    def batch_in_epoch(self) -> int:
        """Loader batches of the current epoch trained on before the current step (micro-batches:
        ``accumulate`` per step); 0 in an epoch's first step."""
        return self.progress.batch_in_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch of the loader ``batches()`` reads (before it starts: of
        the last ``session.loader()``, one batch per step); the same after any resume.

        Raises RuntimeError before any loader exists, TypeError for a stream (no known length)."""
        loader = self._loader or self._made_loader
        if loader is None:
            raise RuntimeError("session.steps_per_epoch needs a loader: call session.loader(...) first")
        if data_mod.is_stream(loader):
            raise TypeError("a stream (iterable dataset) has no known epoch length")
        return data_mod.steps_per_epoch(loader) // self._accumulate

    def prepare(self, model: torch.nn.Module, name: str = MODEL,
                init: Optional[Callable[[torch.nn.Module], Any]] = None) -> torch.nn.Module:
        """Move the model to this rank's device, wrap it as ``trainer.strategy`` says (ddp: in DDP
        when there are several ranks; fsdp: FSDP2 ``fully_shard`` per block, then the root) and
        register it (unwrapped, so no ``module.`` prefix ever reaches a file).

        With fsdp, build the optimizer from the returned model's parameters (they are sharded); a
        model you sharded yourself (``fully_shard`` with your own options) is taken as it is.

        A model built on the meta device (``with torch.device("meta"): model = Big()``: no memory)
        is materialised on this rank's device, under fsdp after sharding (each rank allocates its
        shards only, so no rank ever holds the whole model), then ``init(model)`` sets its values,
        under ``torch.no_grad()``: every parameter and every buffer computed in ``__init__`` (e.g.
        ``init=lambda model: model.reset_parameters()``). Required for such a model; it runs at every
        launch, and a resume then loads the checkpoint over it.
        """
        device = self.env.device
        on_meta = any(tensor.is_meta for tensor in itertools.chain(model.parameters(), model.buffers()))
        if on_meta and init is None:
            raise ValueError(f"session.prepare: the model is on the meta device, so its memory holds nothing "
                             f"once materialised on {device}. HINT: pass init=, a function that sets every "
                             "parameter and buffer, e.g. init=lambda model: model.reset_parameters()")
        if self.strategy.sharded:
            sharded_already = any(is_dtensor(param) for param in model.parameters())
            wrapped = self.strategy.wrap(model if on_meta or sharded_already else model.to(device))
            if on_meta:
                wrapped.to_empty(device=device)
            model = wrapped
        else:
            model = model.to_empty(device=device) if on_meta else model.to(device)
        if init is not None:
            with torch.no_grad():  # before DDP is built: it broadcasts rank 0's values to every rank
                init(model)
        if not self.strategy.sharded:
            wrapped = self.strategy.wrap(model)
        self._register(name, wrapped if self.strategy.takes(wrapped) else model)
        self.checkpoints.replicated.add(name)  # DDP broadcasts its buffers: per-rank drift between steps is harmless
        return wrapped

    def register(self, **objects: Any) -> None:
        """Register objects with state_dict()/load_state_dict() (optimizer, scheduler, scaler, ...).
        With fsdp, the optimizers are saved by the strategy (sharded), everything else by rank 0."""
        for name, obj in objects.items():
            self._register(name, obj)

    def register_per_rank(self, **objects: Any) -> None:
        """Register objects whose state differs from rank to rank (an RNN's hidden state carried
        across batches, a rank's own metric accumulators, its replay buffer): every rank's state is
        saved (gathered to rank 0 at each save: keep it small) and each rank gets its own back on a
        resume with the same world size; on another world size each keeps the state it has."""
        for name, obj in objects.items():
            self._check_registrable(name)
            self.checkpoints.per_rank.register(name, obj)

    def _check_registrable(self, name: str) -> None:
        if self._started:  # the resume has run: this object would be saved but never restored
            raise RuntimeError(f"session.register({name}=...) after the run started: a resume restores "
                               "what is registered when it runs (at the first session.batches() or "
                               "session.start()). HINT: register every object before the training loop")
        taken = (*self.registry.names, *self.checkpoints.per_rank.names, *self.strategy.adopted_names)
        if name in taken:
            raise duplicate_name(name)

    def _register(self, name: str, obj: Any) -> None:
        self._check_registrable(name)
        if obj is not None and self.strategy.takes(obj):
            self.strategy.adopt(name, obj)
        else:
            self.registry.register(name, obj)

    def loader(self, dataset: Dataset, batch_size: Optional[int] = 1, shuffle: Optional[bool] = None,
               num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A DataLoader sharded over ranks whose position the harness saves and restores.

        Map-style datasets: DataLoader's keywords (``sampler``, ``batch_sampler``, ``drop_last``,
        ``persistent_workers``, ...; see ``harness.data.make_loader``); without a sampler, a keyed
        permutation per epoch (``shuffle`` unset or True), sharded like DistributedSampler; per-sample
        augmentation and per-batch collate seeds. Iterable datasets must implement
        ``state_dict()/load_state_dict()``; each rank reads its own stream (``shuffle`` ignored).
        """
        self._made_loader = self._make_loader(dataset, batch_size, shuffle, num_workers, **kwargs)
        return self._made_loader

    def _make_loader(self, dataset: Dataset, batch_size: Optional[int], shuffle: Optional[bool],
                     num_workers: int, **kwargs: Any) -> DataLoader:
        if isinstance(dataset, IterableDataset):
            return data_mod.make_stream_loader(dataset, batch_size=batch_size, world_size=self.env.world_size,
                                               num_workers=num_workers, pin_memory=self.env.uses_cuda,
                                               **kwargs)
        kwargs.setdefault("pin_memory", self.env.uses_cuda)
        return data_mod.make_loader(dataset, batch_size=batch_size, rank=self.env.rank,
                                    world_size=self.env.world_size, seed=self.cfg.trainer.seed,
                                    shuffle=shuffle, num_workers=num_workers, **kwargs)

    def _adopt(self, loader: DataLoader) -> DataLoader:
        """``batches()``'s loader, positionable: a plain DataLoader a script built is rebuilt with its
        options by ``harness.data.adopt`` (once: the same loader passed again gets the same copy)."""
        if data_mod.is_stream(loader):
            return loader
        if self._adopted is None or self._adopted[0] is not loader:
            self._adopted = (loader, data_mod.adopt(loader, self.env.rank, self.env.world_size,
                                                    self.cfg.trainer.seed))
        return self._adopted[1]

    def log(self, **values: Any) -> None:
        """Record numbers for THIS step (cleared when the step ends). Tensors are kept as they are
        and read only when printed or saved, so logging costs no device sync per step."""
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"session.log({key}=...): a tensor of shape {tuple(value.shape)}; "
                                     "log a single number (e.g. loss.mean())")
                values[key] = value.detach()
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"session.log({key}=...): {type(value).__name__} is not a number")
        self.metrics.update(values)

    def request_stop(self) -> None:
        """Ask for a stop from code: the run saves and stops at the next agreement, like a signal."""
        self.flag.request()

    def check_stop(self) -> bool:
        """Agree on a stop inside a loop of yours (evaluation, warm-up); a collective call.

        Every rank must call it equally often. Between steps (outside the body of ``batches()``),
        an agreed stop saves the last completed step and raises Preempted on every rank. Inside a
        step (the body of ``batches()``) the model may already hold the NEXT step's weights, so the
        stop is deferred: it returns True, and the save and Preempted happen when the step ends;
        use it to cut an evaluation short (``if session.check_stop(): break``) when nothing but a
        report depends on it: what the step skips is not redone after the resume. False: no stop.
        """
        if self._stop_reason:
            return True
        started = time.perf_counter()
        reason, interval, request_age_s = agree(self.flag, self.env.device, self.clock.propose())
        self.clock.agreed(self.progress.step, interval, time.perf_counter() - started)
        if not reason:
            return False
        self._signal_at = time.monotonic() - request_age_s if request_age_s else None
        if self._in_step:
            self._stop_reason = reason
            return True
        self._stop(reason)
        return True  # not reached: _stop raises

    def batches(self, loader: DataLoader, accumulate: int = 1) -> Iterator[Any]:
        """Yield the data of each optimizer step until ``trainer.max_steps``, resuming on first use.

        ``accumulate=1``: one batch per step. ``accumulate=K``: a list of K micro-batches per step
        (wrap them in ``session.micro_batches(model, ...)`` to skip DDP's gradient all-reduce on all
        but the last). Positions count micro-batches; an epoch's last ``len % K`` micro-batches are
        skipped so that no step straddles two epochs. Saves and stops happen only between steps.
        """
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate}: expected micro-batches per step >= 1")
        if self._finished:  # e.g. `for epoch in range(n): for batch in session.batches(loader)`
            raise RuntimeError(
                f"session.batches() was called again after it ran to trainer.max_steps="
                f"{self.cfg.trainer.max_steps}: it runs every epoch itself, so an epoch loop around it ran "
                "its body once, after the training. HINT: drop the epoch loop; do per-epoch work inside "
                "the loop at the epoch's last step (session.batch_in_epoch + 1 == session.steps_per_epoch)")
        self._accumulate = accumulate  # session.steps_per_epoch counts steps of this many batches
        loader = self._adopt(loader)  # a plain DataLoader of the script's own is made resumable
        if data_mod.is_stream(loader):
            yield from self._stream_batches(loader, accumulate)
            return
        self._loader = loader
        self._data = DataShape(unit=data_mod.global_batch_size(loader),  # samples per micro-batch, all ranks
                               size=data_mod.dataset_size(loader),
                               own_sampler=data_mod.uses_own_sampler(loader))  # not kept on a resize
        self.start()
        if self.checkpoints.pending_sampler is not None:
            data_mod.load_sampler_state(loader, self.checkpoints.pending_sampler)
            self.checkpoints.pending_sampler = None
        per_epoch = data_mod.steps_per_epoch(loader) // accumulate * accumulate
        if per_epoch == 0:
            raise ValueError(f"an epoch has {data_mod.steps_per_epoch(loader)} batches per rank, fewer "
                             f"than accumulate={accumulate}: shrink the batch or accumulate less")
        self._align_to_window(accumulate)
        while self.progress.step < self.cfg.trainer.max_steps:
            if self.progress.batch_in_epoch >= per_epoch:
                self._next_epoch()
            data_mod.position_loader(loader, self.cfg.trainer.seed, self.progress.epoch,
                                     self.progress.batch_in_epoch)
            first_batch, steps_before = self.progress.batch_in_epoch, self.progress.step
            yield from self._drain(iter(loader), accumulate, per_epoch)
            if self.progress.step < self.cfg.trainer.max_steps and self.progress.batch_in_epoch < per_epoch:
                # The loader ran out before the epoch's last window: never load this position again.
                self._loader_ended(first_batch, steps_before, accumulate)
        self.finish()

    def _align_to_window(self, accumulate: int) -> None:
        """Start every step at a window of ``accumulate`` micro-batches from the epoch's start.

        A resume with other samples per micro-batch (another world size or batch size) keeps the
        position by samples, which may fall inside a window: it moves back to the window's start,
        and the micro-batches in between are trained on again (never skipped).
        """
        inside = self.progress.batch_in_epoch % accumulate
        if inside:
            self.progress.batch_in_epoch -= inside
            self.say(f"WARNING: the resumed position falls {inside} micro-batch(es) into an accumulation "
                     f"window of {accumulate}: continuing from batch {self.progress.batch_in_epoch} of epoch "
                     f"{self.progress.epoch}, so those {inside} micro-batch(es) are trained on again")

    def _next_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0

    def _loader_ended(self, first_batch: int, steps_before: int, accumulate: int) -> None:
        """The loader's iterator ended: start the next epoch, unless a whole epoch gave no step (a
        loop that makes no progress raises instead of spinning, deaf to stop signals)."""
        if first_batch == 0 and self.progress.step == steps_before:
            raise ValueError(f"epoch {self.progress.epoch} of the loader gave fewer than accumulate="
                             f"{accumulate} batches, so not one step: shrink the batch, accumulate less "
                             "or give the loader more data")
        self._next_epoch()

    def _drain(self, iterator: Iterator[Any], accumulate: int, per_epoch: Optional[int]) -> Iterator[Any]:
        """Group the loader's batches into steps and end each step, until max_steps or the end of
        the epoch. The iterator is dropped however this ends: a stop or an error whose traceback the
        caller keeps would otherwise keep its DataLoader workers alive, and workers ignore SIGTERM
        (so they outlive a group-wide signal), so interpreter exit would wait for them forever."""
        try:
            if self.checkpoints.pending_rng is not None:
                # After iter() and the position's skip, so the restored state is exactly the saved one.
                restore_rng(self.checkpoints.pending_rng)
                self.checkpoints.pending_rng = None
            group: list = []
            for batch in iterator:
                group.append(batch)
                if len(group) < accumulate:
                    continue
                self._in_step = True
                try:
                    yield group if accumulate > 1 else group[0]
                finally:  # also when the caller breaks out of the loop
                    self._in_step = False
                group = []
                self._end_step(accumulate)
                if self.progress.step >= self.cfg.trainer.max_steps:
                    return
                if per_epoch is not None and self.progress.batch_in_epoch >= per_epoch:
                    return
        finally:
            del iterator
            data_mod.release(self._loader)

    def _stream_batches(self, loader: DataLoader, accumulate: int) -> Iterator[Any]:
        """``batches()`` over an iterable dataset: the loader is registered (its state is the
        stream's position) and restored on resume; an exhausted stream starts the next epoch."""
        self._loader = loader
        self.registry.register(STREAM, loader)
        self.start()
        while self.progress.step < self.cfg.trainer.max_steps:
            first_batch, steps_before = self.progress.batch_in_epoch, self.progress.step
            yield from self._drain(iter(loader), accumulate, per_epoch=None)
            if self.progress.step < self.cfg.trainer.max_steps:  # the stream ended: a new epoch
                self._loader_ended(first_batch, steps_before, accumulate)
        self.finish()

    def micro_batches(self, model: torch.nn.Module, micro: list) -> Iterator[Any]:
        """Yield a step's micro-batches; gradients are reduced only in the last one's backward (ddp:
        ``no_sync`` around the others; fsdp: no reduce-scatter). Call backward inside the loop body::

            for micro in session.micro_batches(model, step_batches):
                (loss_fn(model, micro) / len(step_batches)).backward()
        """
        for index, batch in enumerate(micro):
            with self.strategy.gradient_sync(model, enabled=index == len(micro) - 1):
                yield batch

    # ----- resume ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the newest valid checkpoint, or start fresh (optionally from init_from)."""
        if self._started:
            return
        self._started = True
        self._check_run_folder()
        self.checkpoints.lock()
        if not self.checkpoints.resumes():
            self.checkpoints.start_fresh()  # another run's checkpoints: refused, or set aside
        metrics_path = self._metrics_path() if self.env.is_main else None
        self._reporter = ProgressReporter(
            total_steps=self.cfg.trainer.max_steps, start_step=0, log_every=self.cfg.trainer.log_every,
            enabled=self.env.is_main)
        ref = self.resume_point()
        if ref is None:
            self.progress.data_unit = self._data.unit  # what batch_in_epoch counts, for a later resize
            self.progress.data_size = self._data.size  # what the epoch's order is drawn over
            seed_everything(self.cfg.trainer.seed + 1 + self.env.rank)  # distinct dropout per rank
            self.say(f"no checkpoint in {self.store.root}: starting fresh "
                     f"(rank {self.env.rank}/{self.env.world_size}, {self.env.backend}, {self.env.device})")
            if self.cfg.checkpoint.init_from:
                self.checkpoints.init_from(self.cfg.checkpoint.init_from)
        else:
            self.checkpoints.restore(ref, self._data)
        # Opened at the resumed step (rows an interrupted launch logged past it go), and after a fresh
        # start may have set an earlier run's file aside.
        for sink in open_metrics_file(metrics_path, resumed_step=self.progress.step):
            self._reporter.add_sink(sink)
        if self.env.is_main:  # TensorBoard and W&B continue their run after the resumed step
            for sink in open_sinks(self.cfg, self.progress.step, new_run=not self.checkpoints.resumes(),
                                   config_data=self._config_data):
                self._reporter.add_sink(sink)
        self._reporter.start_step = self.progress.step
        self._reporter.started = time.perf_counter()

    def _check_run_folder(self) -> None:
        """Before anything is written or trained: rank 0 checks that the checkpoint folder can be
        written (the launcher did too, but scripts also run without it); every rank learns the
        outcome, so all of them stop with one CheckpointError instead of training until the first save."""
        on_rank0(lambda: check_run_folders(self.cfg.checkpoint.dir, self.cfg.checkpoint.staging_dir),
                 "the checkpoint folder cannot be used", self.env.is_main)

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
    def _end_step(self, batches: int = 1) -> None:
        """The step's body is done: count it, report its values, save or stop if due."""
        self.clock.step_ended(time.perf_counter())
        self.progress.step += 1
        self.progress.batch_in_epoch += batches
        step = self.progress.step
        self._reporter.update(step, self.metrics)
        # Values belong to the step they were logged in; every save of this step (periodic, a
        # stop's, save() between steps) finds its checkpoint.best_metric value there.
        self._ended_metrics, self.metrics = self.metrics, {}
        # Every save of this step says whether a stop was agreed inside it: the loop may have cut
        # work short on it (an evaluation), which a resume cannot redo and says so.
        self.progress.stopped_inside = bool(self._stop_reason)
        last = step >= self.cfg.trainer.max_steps
        if step % self.cfg.checkpoint.every_steps == 0 or last or self._save_requested:
            self.save()
        if self._stop_reason:
            self._stop(self._stop_reason)
        if not last and self.clock.due(step):
            self.check_stop()

    def _stop(self, reason_code: int) -> None:
        reason = describe_reason(reason_code)
        started = time.monotonic()
        self.save()
        self.checkpoints.flush()  # async writes and staged uploads included: durable at the destination
        done = time.monotonic()
        # From the first signal on any rank (its age came with the agreement), else from the agreement.
        signal_at = self._signal_at or started  # set at the agreement, so never after it
        since_signal = done - signal_at
        self.say(f"stop requested ({reason}) at step {self.progress.step}: checkpoint "
                 f"{self.store.root}/{step_dir_name(self.progress.step)} durable {done - started:.2f}s after "
                 f"the agreement ({since_signal:.2f}s after the signal); exiting with code "
                 f"{PREEMPTED_EXIT_CODE} (relaunch to resume)")
        warning = grace_warning(since_signal, self.cfg.preempt.grace_s,
                                "the signal -> durable checkpoint (uploads included)",
                                waited_s=started - signal_at)
        if warning:
            self.say("WARNING: " + warning)
        raise Preempted(self.progress.step, reason)

    def save(self) -> None:
        """Save the last completed step (a collective: every rank must call it; rank 0 writes).

        Inside a step (the body of ``batches()``) the save is deferred to the end of the step, so a
        checkpoint never holds a half-finished step under the previous step's number.
        """
        if self._in_step:
            self._save_requested = True
            return
        self._save_requested = False
        if self._reporter is not None:
            self._reporter.flush()  # the metrics file holds every step the checkpoint holds
        metric = self._best_metric()
        self.checkpoints.save(None if metric is None else float(metric), data_mod.sampler_state(
            self._loader, self.progress.epoch, self.progress.batch_in_epoch))

    def _best_metric(self) -> Optional[float]:
        """The value of ``checkpoint.best_metric`` for the step being saved: logged since that step
        ended (e.g. an evaluation between steps), else logged during it."""
        name = self.cfg.checkpoint.best_metric
        if not name:
            return None
        value = self.metrics.get(name, self._ended_metrics.get(name))
        return None if value is None else float(value)

    def finish(self) -> None:
        """The run reached max_steps: make sure the final checkpoint is durable."""
        self.checkpoints.flush()
        self._finished = True
        self.say(f"finished {self.progress.step} steps; checkpoints in {self.store.root}")

    def say(self, text: str) -> None:
        """A line for the person watching (rank 0 only)."""
        if self._reporter is not None:
            self._reporter.message(text)
        elif self.env.is_main:
            print(f"[harness] {text}", flush=True)


def load_config(overrides: Optional[dict] = None) -> HarnessConfig:
    """The config of a script: the launcher's (``python -m harness.launch script=...`` hands it over)
    or the defaults, with ``overrides`` (nested plain data) merged on top."""
    from omegaconf import OmegaConf

    launched = launched_config() or {}
    merged = OmegaConf.merge(OmegaConf.create(launched), OmegaConf.create(overrides or {}))
    return validate(OmegaConf.to_container(merged, resolve=True))


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

