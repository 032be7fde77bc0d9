"""The checkpoint policy of one run: which checkpoint to resume from, restoring it on every rank,
saving and flushing. The mechanism lives below it (store, writer, storage, format, payload).

Every public method is a collective (every rank calls it, in the same order): rank 0 alone writes and
chooses, the others learn the outcome, and a failure on any rank raises on all of them.
"""

from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist

from harness.checkpoint import checksum, prefetch
from harness.checkpoint import manifest as manifests
from harness.checkpoint.format import read_payload
from harness.checkpoint.keys import match_state, rename_prefixes
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import (HASH_CHUNK, INFO_SHARDED, INFO_STRATEGY, LOCK_NAME, SET_ASIDE_DIR,
                                       SHARDS_DIR, CheckpointRef, checking_rank, payload_file, step_dir_name, step_of)
from harness.checkpoint.payload import (KEY_CONFIG, KEY_PER_RANK, KEY_PROGRESS, KEY_RNG, KEY_SAMPLERS, KEY_STATE, MODEL,
                                        DataShape, Progress, StateRegistry, build_payload, capture_rng,
                                        check_payload, digest, extract_model_state, on_cpu, own_memory,
                                        seed_everything, versions)
from harness.checkpoint.storage import open_storage
from harness.checkpoint.storage.staged import StagedStorage, publish
from harness.checkpoint.store import CheckpointStore, Retention, local_checkpoint
from harness.checkpoint.writer import CheckpointWriter
from harness.collectives import distributed, failed_on, on_rank0, raise_if_any_failed, which_failed
from harness.config import CheckpointConfig, HarnessConfig
from harness.env import DistEnv
from harness.stop.agreement import grace_warning

if TYPE_CHECKING:
    from harness.strategy import Strategy

log = logging.getLogger("harness")

# The data part of the world-size warning when the loader's order is the user's sampler. The
# harness's keyed permutation is a function of (seed, epoch, position) and survives a resize; a
# sampler that deals the data out to ranks itself keeps its stream only if it deals one epoch order
# round-robin (DistributedSampler, RASampler: rank r takes positions r, r+W, ...), which the harness
# cannot see.
OWN_SAMPLER_STREAM = (
    "the loader uses your own sampler (or batch sampler), which deals the data out to the ranks itself, so "
    "the harness cannot keep its sample stream on another world size: each of the {now} ranks now draws "
    "its share of that sampler's order for {now} ranks instead of {saved}. It is the same stream only if "
    "the sampler deals one epoch order round-robin to the ranks (as DistributedSampler and RASampler do) "
    "and the dataset splits evenly among them; otherwise samples of this epoch may be trained on twice "
    "or skipped ({position})")
DCP_METADATA = ".metadata"  # the file that makes a folder a torch.distributed.checkpoint
# Said when a run resumes a checkpoint of the other strategy (ddp <-> fsdp).
STRATEGY_CHANGED = (
    "checkpoint was written with trainer.strategy={saved}, this run uses trainer.strategy={now}: model, "
    "optimizer, scheduler, data position and RNG carry over exactly (the shards are converted); training "
    "then follows {now}, whose gradient reductions may differ from {saved}'s in floating-point order")


def sharded_folder(path: str) -> Optional[str]:
    """The DCP folder of a sharded checkpoint that ``path`` names (the folder itself, its step
    folder, or the step folder's payload file); None for anything else."""
    for folder in (path, os.path.join(path, SHARDS_DIR), os.path.join(os.path.dirname(path), SHARDS_DIR)):
        if os.path.isfile(os.path.join(folder, DCP_METADATA)):
            return folder
    return None


STOPPED_INSIDE = ("note: the stop was agreed inside step {step} (session.check_stop() returned True there). "
                  "Whatever your loop cut short on it in that step (an evaluation, an epoch's end: a "
                  "learning-rate change or a best model chosen on its result) is not redone: the run goes "
                  "on from the state that step was left in. HINT: let an evaluation whose result changes "
                  "training run to its end (README: Exactness)")


# Settings that shape what is trained, compared on a resume (trainer.max_steps and trainer.strategy
# have messages of their own; log_every, metrics_file, collective_timeout_s and meta_init, which skips
# a random init the checkpoint overwrites, change nothing trained).
TRAINING_SECTIONS = ("task", "script", "script_args", "trainer")
NOT_COMPARED = {"trainer.max_steps", "trainer.strategy", "trainer.log_every", "trainer.metrics_file",
                "trainer.collective_timeout_s", "task.meta_init"}
CHANGES_SHOWN = 5


def _training_settings(config: dict) -> dict[str, Any]:
    """The TRAINING_SECTIONS of a config, flattened to dotted keys (a script's run: without ``task``,
    which only the built-in loop reads)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif prefix not in NOT_COMPARED:
            flat[prefix] = value

    for section in TRAINING_SECTIONS:
        if section in config and not (section == "task" and config.get("script")):
            walk(section, config[section])
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _change(key: str, before: Any, now: Any) -> str:
    """``key before -> now``; for two lists (script_args) only the items that changed, each with the
    flag before it when only its value changed (``['--lr', '3'] -> ['--lr', '5']``)."""
    if not (isinstance(before, list) and isinstance(now, list)):
        return f"{key} {_short(before)} -> {_short(now)}"
    def part(b1: int, b2: int, n1: int, n2: int) -> str:
        if b1 == b2:
            return f"{key} added {_short(now[n1:n2])}"
        if n1 == n2:
            return f"{key} removed {_short(before[b1:b2])}"
        flag = b1 > 0 and str(before[b1 - 1]).startswith("-") and not any(
            str(item).startswith("-") for item in before[b1:b2] + now[n1:n2])
        return f"{key} {_short(before[b1 - flag:b2])} -> {_short(now[n1 - flag:n2])}"

    parts = []
    for tag, b1, b2, n1, n2 in difflib.SequenceMatcher(a=before, b=now, autojunk=False).get_opcodes():
        if tag == "replace" and b2 - b1 == n2 - n1:  # item by item: each value with its own flag
            parts += [part(b1 + i, b1 + i + 1, n1 + i, n1 + i + 1) for i in range(b2 - b1)]
        elif tag != "equal":
            parts.append(part(b1, b2, n1, n2))
    return "; ".join(parts)


class CheckpointManager:
    """Resume, save and flush for one rank; see the module docstring."""

    def __init__(self, cfg: HarnessConfig, env: DistEnv, registry: StateRegistry, progress: Progress,
                 config_data: dict, say: Callable[[str], None], strategy: Optional["Strategy"] = None):
        """``strategy``: the run's harness.strategy; a sharded one saves and restores the state it
        adopted (model, optimizers) through its own files, and the payload holds the rest."""
        self.cfg = cfg
        if strategy is None:
            from harness.strategy.ddp import DDPStrategy

            strategy = DDPStrategy(env)
        self.strategy = strategy
        self.ckpt: CheckpointConfig = cfg.checkpoint
        self.env = env
        self.registry = registry
        self.per_rank = StateRegistry()  # objects each rank saves and gets back its own (Session.register_per_rank)
        self.progress = progress
        self.config_data = config_data
        self.say = say
        # Every rank opens the staging folder: all ranks of a node then read a checkpoint staged
        # complete there from it, or all from the remote (a node-local copy: _node_copy), never a
        # mix. Only rank 0 writes the payload and uploads it; a sharded strategy's ranks also stage
        # and upload their own shard files (_save_shards). The others' uploader never starts.
        self.store = CheckpointStore(open_storage(self.ckpt.dir, self.ckpt.staging_dir))
        self.retention = Retention(keep_last=self.ckpt.keep_last, keep_every=self.ckpt.keep_every,
                                   keep_best=self.ckpt.keep_best, best_mode=self.ckpt.best_mode)
        self.writer = CheckpointWriter(self.store, self.retention, asynchronous=self.ckpt.async_save) \
            if env.is_main else None
        self.last_saved_step: Optional[int] = None
        self.replicated: set[str] = set()  # registered names the strategy keeps equal on every rank (a DDP model)
        self._ranks_compared = False  # the shared objects were compared across ranks (first save of a launch)
        self.resumed_from: Optional[CheckpointRef] = None
        self.pending_rng: Optional[dict] = None  # this rank's RNG, restored once the loader is positioned
        self.pending_sampler: Optional[dict] = None  # this rank's user sampler as its epoch began
        self._resume_point: Optional[tuple[Optional[CheckpointRef]]] = None  # chosen once, lazily
        self._lock_fd: Optional[int] = None  # rank 0's lock on the run folder
        # Payload maps that verification read in, by path: the load reuses them (store.problems).
        self._verified_maps: dict[str, mmap.mmap] = {}
        self.reading_ahead: Optional[prefetch.ReadAhead] = None  # see read_ahead

    # ----- one job per folder ---------------------------------------------------------------------
    def lock(self) -> None:
        """Refuse to run while another job writes to the same checkpoint folder (a collective).

        Rank 0 holds an exclusive POSIX record lock (``lockf``) on ``<dir>/.harness.lock``, its host
        and pid written in it, for the life of its process. The kernel drops it when the process
        dies, even by SIGKILL, so a crashed job never leaves a stale lock; unlike ``flock``, forked
        DataLoader workers do not inherit it (they may outlive their rank by seconds), and NFS
        supports it. Remote (fsspec) folders are not locked.
        """
        on_rank0(self._lock_here, "another job holds this run's checkpoint folder", self.env.is_main)

    def _lock_here(self) -> None:
        path = self.store.storage.local_path(LOCK_NAME)
        if path is None or self._lock_fd is not None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.store.root} is in use by another job ({holder}). HINT: wait for it to end or "
                "stop it, or give this run another name / checkpoint.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.ctime()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the folder (rank 0; not a collective). Closing the descriptor drops the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----- resume ---------------------------------------------------------------------------------
    def resume_point(self) -> Optional[CheckpointRef]:
        """The checkpoint this run resumes from (None: a fresh start); a collective on first call."""
        if self._resume_point is None:
            if self.reading_ahead is not None:  # the resume reads the rest itself
                self.reading_ahead.stop()
            self._resume_point = (self._choose(),) if self.resumes() else (None,)
        return self._resume_point[0]

    def read_ahead(self) -> None:
        """A restart: read the newest checkpoint's files this rank will read into the page cache in
        the background, while the script builds its model and optimizer (``prefetch``; a hint, not a
        collective: the resume still lists, verifies and chooses on its own). Each rank reads the
        files it verifies; local rank 0 also the payload, which every rank of its node loads."""
        if self.resumes() and not self.ckpt.staging_dir and self.store.storage.local_path("") is not None:
            self.reading_ahead = prefetch.start(self.files_to_read_ahead)

    def files_to_read_ahead(self) -> list[str]:
        """The local paths ``read_ahead`` reads on this rank (lists the run folder)."""
        ref = self.store.newest_complete()
        if ref is None:
            return []
        world, rank, payload = self.env.world_size, self.env.rank, payload_file(ref.manifest)
        wanted = [rel for rel in manifests.entries(ref.manifest)
                  if checking_rank(rel, world) == rank or (rel == payload and self.env.local_rank == 0)]
        paths = [self.store.storage.local_path(f"{ref.name}/{rel}") for rel in wanted]
        return [path for path in paths if path is not None]

    def resumes(self) -> bool:
        """``checkpoint.resume=false`` applies to a run's first launch only: a restart (SLURM
        requeue, the local launcher's or restart-loop.sh's restarts) continues what that launch
        began, so it always resumes."""
        return self.ckpt.resume or self.env.restart_count > 0

    def _choose(self, below: Optional[int] = None) -> Optional[CheckpointRef]:
        """The newest valid checkpoint (or the newest below step ``below``), the same on every rank.

        Rank 0 lists the complete checkpoints; then, newest first, every rank verifies its share of
        each one's files (``layout.checking_rank``: the shard files of rank r on rank r, the rest on
        rank 0), and the ranks agree on the outcome, so a corrupt shard found by any rank makes
        every rank skip that checkpoint together (rank 0 warns, naming the rank that found it)."""
        def listed() -> list[CheckpointRef]:
            self.store.storage.flush()  # staging: finish uploads left by a crash, so others can read them
            return [ref for ref in reversed(self.store.list_complete()) if below is None or ref.step < below]

        candidates = on_rank0(listed, f"could not look for checkpoints in {self.store.root}", self.env.is_main)
        for ref in candidates:
            found = self._problems_everywhere(ref)
            if not found:
                return ref
            if self.env.is_main:
                log.warning("skipping corrupt checkpoint %s/%s: %s", self.store.root, ref.name, "; ".join(found))
        if candidates and below is None:
            # Starting fresh would train from step 0 as if nothing had been saved, and write new
            # checkpoints over the damaged ones: a person must decide (every rank raises this).
            names = ", ".join(ref.name for ref in candidates)
            raise failed_on(CheckpointError(
                f"every complete checkpoint in {self.store.root} failed verification ({names}; the warnings "
                "above say why), so this run will not start fresh over them. HINT: restore the folder from "
                "a copy, move the damaged step_* folders aside, or add checkpoint.resume=false "
                "checkpoint.set_aside=true to set them aside and start over"), [0])  # rank 0 says it
        return None

    def _problems_everywhere(self, ref: CheckpointRef) -> list[str]:
        """What any rank found wrong with its share of ``ref``'s files ("rank <r>: <problem>"),
        known to every rank (a collective). An error other than a damaged file raises on every rank."""
        world, rank = self.env.world_size, self.env.rank
        found, error = [], None
        try:
            found = self.store.problems(ref, verify=self.ckpt.verify, mapped=self._verified_maps,
                                        only=lambda rel: checking_rank(rel, world) == rank)
        except Exception as exc:  # not a damaged file (those are problems): every rank must stop
            error = exc
        raise_if_any_failed(error, f"verifying {self.store.root}/{ref.name} failed", self.env.device)
        per_rank = self._gather(found)
        problems = list(dict.fromkeys(f"rank {where}: {problem}" for where, problems in enumerate(per_rank)
                                      for problem in problems))
        if problems:
            self._drop_verified_maps()
        return problems

    def _drop_verified_maps(self) -> None:
        """Unmap what verification read in and no load used (a checkpoint skipped after all)."""
        for file_map in self._verified_maps.values():
            file_map.close()
        self._verified_maps.clear()

    def start_fresh(self) -> None:
        """A first launch with ``checkpoint.resume=false``: make sure no earlier run's checkpoint can
        be resumed, pruned or overwritten by this one (a collective).

        A folder holding checkpoint folders (complete or partial) is refused with a clear error,
        unless ``checkpoint.set_aside=true``: then rank 0 moves everything the earlier run left in the
        folder (checkpoints, metrics, TensorBoard files, W&B run id) to ``set_aside/<UTC time>/``, so
        this run's restarts and requeues find only their own checkpoints. Nothing is deleted.
        """
        on_rank0(self._set_aside_earlier_run, f"{self.store.root} holds another run's checkpoints",
                 self.env.is_main)

    def _set_aside_earlier_run(self) -> None:
        found = sorted(name for name in self.store.storage.list_names() if step_of(name) is not None)
        if not found:
            return
        newest = self.store.latest_listed()
        described = f"{len(found)} checkpoint folder(s), newest complete step {newest.step if newest else 'none'}"
        if not self.ckpt.set_aside:
            raise CheckpointError(
                f"checkpoint.resume=false, but {self.store.root} holds {described} of an earlier run; a "
                "fresh run never resumes from, prunes or overwrites them. HINT: resume it (drop "
                "checkpoint.resume=false), give this run its own checkpoint.dir (or name), or add "
                f"checkpoint.set_aside=true to move them to {self.store.root}/{SET_ASIDE_DIR}/<UTC time>/")
        root = self.store.storage.local_path("")
        if root is None or self.ckpt.staging_dir:
            raise CheckpointError(
                f"checkpoint.set_aside=true moves files within a local folder; {self.store.root} is "
                "remote or staged. HINT: move or delete its step_* folders yourself, or use another "
                "checkpoint.dir")
        target = os.path.join(root, SET_ASIDE_DIR, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        os.makedirs(target)
        for name in sorted(os.listdir(root)):
            if name not in (LOCK_NAME, SET_ASIDE_DIR):
                os.rename(os.path.join(root, name), os.path.join(target, name))
        self.say(f"checkpoint.resume=false: set aside the earlier run's {described} (and its metrics) "
                 f"in {target}")

    def restore(self, ref: CheckpointRef, data: DataShape = DataShape()) -> None:
        """Restore ``ref`` on every rank; if any rank fails, all of them raise.

        ``data``: THIS run's loader. Its samples per batch keep the data position by samples consumed
        when they differ from the saved run's; with the user's own sampler, another world size's
        warning says its stream cannot be kept; another dataset size gets a warning of its own.

        A payload that some rank cannot read (damage that verification does not see, a payload
        format this harness does not read) is skipped on every rank, with a warning, for the next
        older valid checkpoint, chosen by rank 0 as the first was; with none left, every rank
        raises. An error while applying a payload that was read (a model that does not match it)
        raises at once: an older checkpoint would not match either.
        """
        payload = self._read_everywhere(ref)
        while payload is None:
            older = self._choose(below=ref.step)
            if older is None:
                raise CheckpointError(
                    f"{self.store.root}/{ref.name} could not be read (see the ranks' warnings) and no "
                    "older valid checkpoint is left. HINT: move the unreadable checkpoint aside to "
                    "start fresh, or restore an older copy of the folder")
            self.say(f"WARNING: {self.store.root}/{ref.name} could not be read; resuming from the "
                     f"previous valid checkpoint {older.name} instead")
            ref = older
            self._resume_point = (ref,)
            payload = self._read_everywhere(ref)
        self._drop_verified_maps()
        error = None
        try:
            self._restore(ref, payload, data)
        except Exception as exc:
            error = exc
        raise_if_any_failed(error, f"loading {self.store.root}/{ref.name} failed", self.env.device)

    def _read_everywhere(self, ref: CheckpointRef) -> Optional[dict]:
        """The payload of ``ref`` on every rank, or None on every rank when any rank could not read
        it (each failing rank logs why). A collective."""
        payload, error, node_copy = None, None, None
        try:
            node_copy = self._node_copy(ref)  # a collective for remote folders
            payload = self._load_payload(ref, node_copy)
        except Exception as exc:  # an unreadable payload: every rank falls back together
            error = exc
            log.warning("rank %d could not read %s/%s: %s: %s", self.env.rank, self.store.root,
                        ref.payload_path, type(exc).__name__, exc)
        try:
            failed = which_failed(error, self.env.device)
        finally:
            if node_copy is not None and self.env.local_rank == 0:
                # Every rank of the node has mapped it or failed (mapped pages stay valid).
                os.unlink(node_copy)
        return None if failed else payload

    def _node_copy(self, ref: CheckpointRef) -> Optional[str]:
        """For a remote folder (s3://...): local rank 0 of every node streams the payload to a
        node-local temporary file, and the node's ranks memory-map it, so a node holds one copy of
        the checkpoint instead of one per rank. None for folders with a local path. A collective."""
        rel = ref.payload_path
        here = self.store.storage.local_path(rel) is not None  # the same on every rank of a node
        target = self._node_path(ref, os.path.basename(rel))
        error = None
        if self.env.local_rank == 0 and not here:
            try:
                self._download(rel, target)
            except OSError as exc:
                error = exc
        # Every rank agrees even where its node needed no copy (a node with a staged copy and one
        # without must not pair different collectives).
        raise_if_any_failed(error, f"downloading {self.store.root}/{rel} failed", self.env.device)
        return None if here else target

    def _node_path(self, ref: CheckpointRef, name: str) -> str:
        """A node-local temporary path for a copy of ``ref``'s ``name``, the same on every rank of
        the job (and distinct for another job or checkpoint)."""
        where = f"{self.store.root}/{ref.name}:{ref.manifest.get('created_unix')}"
        key = hashlib.sha256(where.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"harness-resume-{key}-{self.env.master_port}-{name}")

    def _download(self, rel: str, target: str) -> None:
        with self.store.storage.open_read(rel) as source, open(target, "wb") as copy:
            shutil.copyfileobj(source, copy, HASH_CHUNK)

    def _load_payload(self, ref: CheckpointRef, node_copy: Optional[str]) -> dict:
        """The payload, memory-mapped, on the CPU: modules and optimizers copy what they load onto
        their own device (the optimizer keeps its ``step`` counters on the CPU, where torch wants
        them); mapping to the GPU first would only add a copy and put those counters on the GPU."""
        rel = ref.payload_path
        path = node_copy or self.store.storage.local_path(rel)
        verified_map = None if node_copy else self._verified_maps.pop(rel, None)
        payload = read_payload(path, unsafe=self.ckpt.unsafe_load, mapped=verified_map)
        return check_payload(payload, f"{self.store.root}/{rel}")

    def _restore(self, ref: CheckpointRef, payload: dict, data: DataShape) -> None:
        started = time.perf_counter()
        written_by, sharded = self._layout(ref)  # from the manifest: the same on every rank
        in_shards: dict = {}
        error = None
        try:
            saved = payload[KEY_STATE]
            if sharded and not self.strategy.sharded:  # fsdp -> ddp: the model and optimizers are in the shards
                in_shards = {name: self.registry.get(name) for name in self.registry.names if name not in saved}
            self.registry.load_state_dict(saved, elsewhere=in_shards, adopted=self.strategy.adopted_names)
            if self.strategy.sharded and not sharded:
                self.strategy.load_full(saved)  # ddp -> fsdp: each rank keeps its slice of the full tensors
            self._load_per_rank(payload.get(KEY_PER_RANK) or [])
            own_memory(self.registry, payload)  # nothing may keep the file mapped once the payload is dropped
            own_memory(self.per_rank, payload)
        except Exception as exc:
            error = exc
        if sharded:
            # Agreed first: a rank that failed above must not leave the others in DCP's collectives.
            raise_if_any_failed(error, f"loading {self.store.root}/{ref.name} failed", self.env.device)
            # Every rank reads the shards it needs, resharded to this world size (a collective).
            self._load_shards(ref, in_shards)
        elif error is not None:
            raise error
        self.progress.load_state_dict(payload[KEY_PROGRESS])
        self._remap(payload[KEY_RNG], data.unit, data.own_sampler)
        self._note_data_size(data.size)
        samplers = payload.get(KEY_SAMPLERS) or []
        if len(samplers) == self.env.world_size:  # on another world size each rank draws another share
            self.pending_sampler = samplers[self.env.rank]
        self.last_saved_step = self.progress.step
        self.resumed_from = ref
        self._warn_config_changes(payload.get(KEY_CONFIG) or {})
        if written_by != self.strategy.name:
            self.say(STRATEGY_CHANGED.format(saved=written_by, now=self.strategy.name))
        self.say(f"resumed from {self.store.root}/{ref.name} at step {self.progress.step} "
                 f"(epoch {self.progress.epoch}, batch {self.progress.batch_in_epoch}) "
                 f"in {time.perf_counter() - started:.2f}s; restart #{self.env.restart_count}")
        if self.progress.stopped_inside:
            self.say(STOPPED_INSIDE.format(step=self.progress.step))  # each step's end resets the mark
        save_s = ref.manifest.get("write_s")
        warning = grace_warning(save_s, self.cfg.preempt.grace_s) if save_s else None
        if warning:
            self.say("WARNING: " + warning)

    def _load_shards(self, ref: CheckpointRef, in_shards: dict) -> None:
        """Load ``ref``'s shard folder on every rank (a collective). A folder without a local path
        (s3://, or staged on another node) is first copied whole by local rank 0 of each node to a
        node-local temporary folder, which the node's ranks read and which is deleted once every
        rank has loaded. The copies are of the files the manifest lists, which every rank verified
        (its share) before; a file that differs from its manifest entry now fails the resume."""
        folder = self.store.storage.local_path(f"{ref.name}/{SHARDS_DIR}")  # the same on a node's ranks
        copy = None if folder is not None else self._node_path(ref, SHARDS_DIR)
        error = None
        if copy is not None and self.env.local_rank == 0:
            try:
                self._download_shards(ref, copy)
            except (OSError, CheckpointError) as exc:
                error = exc
        raise_if_any_failed(error, f"downloading {self.store.root}/{ref.name}/{SHARDS_DIR} failed", self.env.device)
        try:
            self.strategy.load(folder or copy, in_shards)
        except Exception as exc:  # every rank must be done with the copy before it goes
            error = exc
        failed = which_failed(error, self.env.device)
        if copy is not None and self.env.local_rank == 0:
            shutil.rmtree(copy, ignore_errors=True)  # a temporary copy; the checkpoint stays on the remote
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"loading {self.store.root}/{ref.name}/{SHARDS_DIR} failed: "
                                  f"rank(s) {failed} failed; see their logs")

    def _download_shards(self, ref: CheckpointRef, target: str) -> None:
        """Copy every ``shards/`` file ``ref``'s manifest lists into ``target`` (emptied first),
        checking each against its size and (``checkpoint.verify``) its checksum."""
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.makedirs(target)
        prefix = f"{SHARDS_DIR}/"
        for name, (size, expected) in sorted(manifests.entries(ref.manifest).items()):
            if not name.startswith(prefix):
                continue
            path = os.path.join(target, name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._download(f"{ref.name}/{name}", path)
            if os.path.getsize(path) != size or (
                    self.ckpt.verify and checksum.of_file(path, checksum.algorithm_of(expected)) != expected):
                raise CheckpointError(f"{self.store.root}/{ref.name}/{name} changed since it was verified "
                                      "(its copy differs from the manifest)")

    def _load_per_rank(self, saved: list) -> None:
        """Give each rank its own per-rank objects' state back; on another world size they keep the
        state they have (a rank's state cannot be dealt to another number of ranks), and the resume
        says so. A checkpoint without them (written before they were registered) is an error, as for
        any registered object."""
        if not self.per_rank.names:
            return
        if saved and len(saved) != self.env.world_size:
            self.say(f"WARNING: the per-rank state of {self.per_rank.names} was saved by {len(saved)} ranks, "
                     f"this run has {self.env.world_size}: each rank keeps the state it starts with")
            return
        self.per_rank.load_state_dict(saved[self.env.rank] if saved else {})

    def _layout(self, ref: CheckpointRef) -> tuple[str, bool]:
        """(the strategy that wrote ``ref``, whether it keeps state in a shard folder), from its
        manifest. Raises CheckpointError for a shard folder other than ``shards`` (a name taken
        from a file never becomes a path)."""
        shards = ref.manifest.get(INFO_SHARDED)
        if shards is not None and shards != SHARDS_DIR:
            raise CheckpointError(f"{self.store.root}/{ref.name}: its manifest names shard folder {shards!r}; "
                                  f"this harness reads {SHARDS_DIR!r} only")
        return str(ref.manifest.get(INFO_STRATEGY, "ddp")), shards is not None

    def _remap(self, rng_per_rank: list, data_unit: Optional[int], own_sampler: bool = False) -> None:
        """Each rank's RNG when the world is the same; else keep the data position by samples.

        DDP state is replicated, so weights and optimizer carry over exactly on any world size. With
        the harness's loader the sample order and each sample's augmentation depend on (seed, epoch,
        position) only, so when the samples per step are kept the data stream continues exactly;
        what cannot be kept on another world size is each rank's own RNG stream (dropout), reseeded
        here: the run then continues as a statistically equivalent run, not the same one. With the
        user's own sampler (``own_sampler``) the stream is not kept either: that sampler deals the
        epoch out by rank itself, so on another world size each rank draws another share; the one
        warning says so.
        """
        saved_world = len(rng_per_rank)
        saved_unit = self.progress.data_unit
        if saved_unit is None and data_unit is not None:  # a file from before data_unit existed
            saved_unit = data_unit // self.env.world_size * saved_world
        same_data = saved_unit is None or data_unit is None or saved_unit == data_unit
        if saved_world == self.env.world_size:
            self.pending_rng = rng_per_rank[self.env.rank]  # each rank's stream continues
            if same_data:
                self.progress.data_unit = data_unit or saved_unit
                return
        resized = saved_world != self.env.world_size
        if saved_unit is not None and data_unit is not None:
            samples_done = self.progress.batch_in_epoch * saved_unit
            self.progress.batch_in_epoch, partial = divmod(samples_done, data_unit)
            notes = [f"{samples_done} this epoch"]
            if partial:
                notes.append(f"{partial} samples of the last, partial batch are trained on again")
            if not same_data:
                notes.append(f"samples per batch changed from {saved_unit} to {data_unit}")
            data = f"the data position is kept by samples consumed ({'; '.join(notes)})"
            if same_data and not (own_sampler and resized):
                data += ", the sample stream and its augmentations continue exactly"
        else:  # position only known in batches (no harness loader seen yet)
            self.progress.batch_in_epoch = self.progress.batch_in_epoch * self.progress.world_size // self.env.world_size
            data = "the data position is kept by samples consumed"
        if own_sampler and resized:
            data = OWN_SAMPLER_STREAM.format(saved=saved_world, now=self.env.world_size, position=data)
        self.progress.world_size = self.env.world_size
        self.progress.data_unit = data_unit
        if resized:
            seed_everything(self.cfg.trainer.seed + 1 + self.env.rank + 7919 * self.progress.step)
        if not resized:
            randomness = ("each rank's RNG continues, but its draws now fall on other samples, so a "
                          "model with dropout or other random layers continues as a different run")
        else:
            randomness = ("randomness drawn on the ranks (dropout, stochastic depth, noise) comes from "
                          "new per-rank streams, so a model with such layers continues as a statistically "
                          "equivalent run, not the same one; without them, and without BatchNorm (whose "
                          "statistics depend on each rank's batch), weights follow an uninterrupted run "
                          "to floating-point reduction order")
        self.say(f"WARNING: checkpoint was written by {saved_world} ranks, this run has "
                 f"{self.env.world_size}: weights, optimizer and step carry over exactly; {data} "
                 f"(batch {self.progress.batch_in_epoch} of epoch {self.progress.epoch}); {randomness}")

    def _note_data_size(self, size: Optional[int]) -> None:
        """Warn when the dataset's size differs from the checkpoint's: the epoch's order is drawn
        over the new dataset, so the saved position no longer marks the samples already seen."""
        saved, self.progress.data_size = self.progress.data_size, size
        if saved is None or size is None or saved == size:
            return
        position = (f"epoch {self.progress.epoch} continues at batch {self.progress.batch_in_epoch} of an "
                    "order drawn over the new dataset, so some of its samples are trained on twice and "
                    "others not at all; " if self.progress.batch_in_epoch else "")
        self.say(f"WARNING: the dataset held {saved} samples at the checkpoint and holds {size} now: "
                 f"{position}the run continues as one on the new dataset, not as the run it would have "
                 "been uninterrupted")

    def _warn_config_changes(self, saved: dict) -> None:
        old = (saved.get("trainer") or {}).get("max_steps")
        if old is not None and old != self.cfg.trainer.max_steps:
            self.say(f"WARNING: trainer.max_steps changed from {old} to {self.cfg.trainer.max_steps} "
                     "since the checkpoint: schedules that depend on it (e.g. cosine LR) will differ "
                     "from an uninterrupted run")
        if not saved:  # checkpoints of the tools and tests carry no config
            return
        before, now = _training_settings(saved), _training_settings(self.config_data)
        changed = [_change(key, before.get(key), now.get(key))
                   for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
        if changed:
            shown = "; ".join(changed[:CHANGES_SHOWN]) + (f"; and {len(changed) - CHANGES_SHOWN} more"
                                                          if len(changed) > CHANGES_SHOWN else "")
            self.say(f"note: the run resumes with settings that differ from its checkpoint's: {shown}. It "
                     "continues with them where the script reads them (state restored from the checkpoint, "
                     "such as an optimizer's or a scheduler's learning rate, keeps its saved values), so it "
                     "may not be the run it would have been uninterrupted")

    def init_from(self, path: str) -> None:
        """Load pretrained weights into the model on every rank (a fresh run's ``init_from``).

        Every rank reads the file itself (it may live on node-local disks); if it is missing or does
        not match on any rank, every rank raises.
        """
        error = None
        try:
            self._init_from(path)
        except Exception as exc:
            error = exc
        raise_if_any_failed(error, f"checkpoint.init_from={path} could not be loaded", self.env.device)

    def _init_source(self, path: str) -> str:
        """The file or checkpoint folder ``init_from`` reads: a file as it is; a checkpoint folder if
        its files are whole (present, at their recorded sizes); a run's folder's newest whole
        checkpoint. Raises CheckpointError naming what is missing or damaged."""
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint.init_from={path}: no such file or folder")
        if os.path.isfile(path):
            return path
        store, ref = local_checkpoint(path, say=lambda text: self.say(f"checkpoint.init_from: {text}"))
        folder = os.path.join(store.root, ref.name)
        return folder if sharded_folder(folder) else os.path.join(store.root, ref.payload_path)

    def _init_from(self, path: str) -> None:
        model = self.registry.get(MODEL) or self.strategy.adopted(MODEL)
        if model is None:
            raise RuntimeError("checkpoint.init_from needs a model: call session.prepare(model) first")
        source = self._init_source(path)
        shards = sharded_folder(source)
        if shards is None:
            file_state = extract_model_state(read_payload(source, unsafe=self.ckpt.unsafe_load), path)
        else:  # planned from the shards' metadata; the tensors are read into the model below
            from harness.strategy import dcp_state  # torch.distributed.checkpoint: only when used

            file_state = dcp_state.model_shapes(shards, MODEL)
        renamed = rename_prefixes({key: key for key in file_state}, self.ckpt.init_rename)  # new key: file key
        # A sharded model's state_dict() holds DTensors: their shapes are the full ones.
        loadable, report = match_state(model.state_dict(), {key: file_state[old] for key, old in renamed.items()})
        if self.ckpt.init_strict and not report.clean:
            raise ValueError(f"checkpoint.init_from={path} does not match the model "
                             f"(checkpoint.init_strict=true):\n{report.format()}")
        if shards is None:
            self.strategy.load_weights(model, loadable)
        else:  # each rank reads only what it holds: its shards of a sharded model
            dcp_state.load_model_keys(shards, MODEL, model, {renamed[key]: key for key in loadable})
        self.say(f"initialised {len(loadable)} tensors from {path}\n{report.format()}")

    # ----- save -----------------------------------------------------------------------------------
    def save(self, metric: Optional[float], sampler_state: Optional[dict] = None) -> None:
        """Save the current state as step ``progress.step`` (rank 0 writes; others wait for it).

        ``metric`` is the value of ``checkpoint.best_metric`` measured at this step, or None.
        ``sampler_state``: this rank's user sampler as the epoch began (``data.sampler_state``).
        """
        if self.last_saved_step == self.progress.step:
            return
        compared = self._shared_digests()
        per_rank = self._gather((capture_rng(), sampler_state, on_cpu(self.per_rank.state_dict()), compared))
        rng_per_rank, samplers_per_rank, states_per_rank, digests = (list(column) for column in zip(*per_rank))
        if compared is not None:
            self._warn_if_ranks_differ(digests)
        written = self._save_shards() if self.strategy.sharded else None

        def submit() -> None:  # rank 0; returns once committed (async: once snapshotted)
            payload = build_payload(self.registry.state_dict(), self.progress, rng_per_rank, self.config_data,
                                    samplers_per_rank, states_per_rank)
            info = versions() | {"world_size": self.env.world_size, "metric": metric}
            if written is not None:
                info |= {INFO_STRATEGY: self.strategy.name, INFO_SHARDED: SHARDS_DIR}
            self.writer.submit(self.progress.step, payload, info, written)

        on_rank0(submit, f"failed to save step {self.progress.step}", self.env.is_main)
        self.last_saved_step = self.progress.step
        if self.writer is not None and self.writer.last_save_s is not None and not self.writer.asynchronous:
            warning = grace_warning(self.writer.last_save_s, self.cfg.preempt.grace_s)
            if warning:
                self.say("WARNING: " + warning)

    def _shared_digests(self) -> Optional[dict[str, str]]:
        """At a launch's first save with several ranks: a digest of each registered object that only
        rank 0 saves and that nothing keeps equal across ranks (not a DDP model, not an optimizer,
        whose gradients DDP averages), to find state that silently differs per rank. None otherwise."""
        if self._ranks_compared or self.env.world_size == 1:
            return None
        self._ranks_compared = True
        digests: dict[str, Optional[str]] = {}
        for name in self.registry.names:
            obj = self.registry.get(name)
            if name in self.replicated or isinstance(obj, torch.optim.Optimizer):
                continue
            try:
                digests[name] = digest(obj.state_dict(), values=True)
            except Exception:  # a tensor type it cannot read: not compared (the save itself must go on)
                digests[name] = None
        return digests

    def _warn_if_ranks_differ(self, digests: list[dict[str, Optional[str]]]) -> None:
        for name, rank0 in digests[0].items():
            if rank0 is None or any(per_rank.get(name) is None for per_rank in digests):
                continue
            others = [rank for rank, per_rank in enumerate(digests) if per_rank.get(name) != rank0]
            if others:
                more = f" and {len(others) - 1} more" if others[1:] else ""
                self.say(f"WARNING: the registered {name!r} differs between ranks at step {self.progress.step} "
                         f"(rank {others[0]} differs from rank 0{more}): "
                         "only rank 0's is saved, and after a resume every rank holds rank 0's. Harmless if "
                         "what differs is overwritten before it is read (timm's scheduler keeps each rank's "
                         "last loss); otherwise the resumed run is not the one it would have been (an EMA "
                         "of each rank's BatchNorm statistics, a rank's meters). HINT: keep it the same on "
                         f"every rank, or register it with session.register_per_rank({name}=...)")

    def _save_shards(self) -> dict[str, dict]:
        """Every rank writes its shards of step ``progress.step`` and hashes the files it wrote; rank
        0 gets every rank's entries ({"shards/<file>": entry}) once all files are durable. A
        collective: a failure on any rank raises on every rank, and nothing is committed.

        Order: rank 0 empties ``<step>/shards`` (the step folder is no checkpoint while it has no
        manifest), every rank writes and fsyncs its files (DCP, a collective), hashes its own, the
        entries are gathered (the agreement that every rank's files are durable), rank 0 fsyncs the
        folders. Only then may rank 0 write the payload and, last, the manifest.

        Staged (``checkpoint.staging_dir``): the shards are written to the staging folder, and each
        rank then uploads the files it hashed to ``checkpoint.dir`` itself, before the gather: the
        gather is then also the agreement that every shard is on the remote, which rank 0 records
        in its StagedStorage, whose uploader publishes the payload and, last, the manifest.
        """
        step = self.progress.step
        name = step_dir_name(step)
        staged = self._staged()
        writes_to = CheckpointStore(staged.local) if staged is not None else self.store
        on_rank0(lambda: self._open_shards(writes_to, step),
                 f"failed to prepare {writes_to.root}/{name}/{SHARDS_DIR}", self.env.is_main)
        # Each rank's own path to the folder (a shared filesystem may be mounted elsewhere on its node).
        folder = writes_to.storage.local_path(f"{name}/{SHARDS_DIR}")
        entries, error = {}, None
        try:
            os.makedirs(folder, exist_ok=True)  # staged on another node than rank 0's
            for rel in self.strategy.save(folder):
                path = os.path.join(folder, rel)
                entries[f"{SHARDS_DIR}/{rel}"] = checksum.file_entry(os.path.getsize(path), checksum.of_file(path))
            if staged is not None:
                for rel, entry in entries.items():  # synchronous: the save returns once they are remote
                    publish(staged.local, staged.remote, f"{name}/{rel}", entry["checksum"])
        except Exception as exc:  # every rank must learn it before rank 0 could commit
            error = exc
        raise_if_any_failed(error, f"failed to save the shards of step {step}", self.env.device)
        written = {rel: entry for rank_entries in self._gather(entries) for rel, entry in rank_entries.items()}

        def durable() -> None:
            writes_to.make_durable(step, SHARDS_DIR)
            if staged is not None:  # every rank's upload returned: the manifest may follow them
                staged.published_elsewhere({f"{name}/{rel}": entry["checksum"] for rel, entry in written.items()})

        on_rank0(durable, f"failed to make {writes_to.root}/{name} durable", self.env.is_main)
        return written

    def _staged(self) -> Optional[StagedStorage]:
        storage = self.store.storage
        return storage if isinstance(storage, StagedStorage) else None

    def _open_shards(self, writes_to: CheckpointStore, step: int) -> None:
        """Rank 0: an empty shard folder for ``step`` where the ranks write (see open_folder); when
        staged, the step's earlier staged state (a queued removal or upload) is settled first, and
        a copy of the step on the remote (one the resume skipped) is deleted, manifest first: the
        ranks' uploads replace its shards one by one, and its old manifest must never list a mix
        (with ``checkpoint.verify=false`` only sizes would be checked)."""
        staged = self._staged()
        if staged is not None:
            name = step_dir_name(step)
            staged.claim(name)
            try:
                staged.remote.remove_dir(name)
            except FileNotFoundError:  # the usual case: a new step
                pass
        writes_to.open_folder(step, SHARDS_DIR)

    def _gather(self, item: object) -> list:
        if not distributed():
            return [item]
        gathered: list = [None] * self.env.world_size
        dist.all_gather_object(gathered, item)
        return gathered

    def flush(self) -> None:
        """Wait until the last checkpoint is committed (and uploaded, when staging); a collective.

        Rank 0 flushes and tells every rank the outcome, so no rank reports a save that failed.
        """
        on_rank0(self.flush_here, f"failed to commit step {self.last_saved_step}", self.env.is_main)

    def flush_here(self) -> None:
        """Rank 0, not a collective: wait for the background writer, then for staged uploads."""
        if self.writer is not None:
            self.writer.flush()
            self.store.storage.flush()

