"""Resumable, sharded data loading whose order and augmentations are functions of the position.

Everything a loader yields is computed from ``(seed, epoch, global position)``, never from state
that accumulates while iterating:

* **Order.** Position ``p`` of epoch ``e`` holds sample ``Permutation.for_epoch(n, seed, e)(p)``, a
  keyed bijection on ``[0, n)`` (a Feistel network with cycle-walking) evaluated per index. No list
  of ``n`` indices is ever built, so an epoch over 1e10 samples costs no memory up front and
  positioning at any batch is O(1). With ``replacement=True`` position ``p`` holds
  ``hash(seed, e, p) mod n`` instead (nanoGPT-style random offsets), just as resumable.
* **Sharding.** As in ``DistributedSampler(drop_last=True)``: rank ``r`` of ``W`` takes the positions
  ``p`` with ``p % W == r``, and each rank gets ``n // W`` of them. Rank ``r``'s batch ``s`` therefore
  holds positions ``r, r+W, ...`` of ``[s*G, (s+1)*G)`` with ``G = W * batch_size``: per optimizer
  step the *global* set of samples is ``order[s*G:(s+1)*G]``, so a run resized from ``W`` to ``W'``
  ranks that keeps ``G`` trains on exactly the same samples at every step.
* **Augmentation randomness.** The sampler yields ``SampleKey(index, seed)``, where the seed hashes
  ``(seed, epoch, p)``. The loader's dataset wrapper (``SeededSamples``) seeds torch's CPU generator,
  ``random`` and ``numpy.random`` from it before ``dataset[index]`` and restores them afterwards. A
  sample's augmentation is then the same whether it is loaded by the main process or by any worker,
  after any resume, under any ``num_workers``; and the main process's own RNG streams (dropout) are
  left untouched with ``num_workers=0``.

``make_loader``, ``steps_per_epoch`` and ``position_loader`` are what the session calls.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, default_collate, get_worker_info)

from harness.stop.flag import ChainedWorkerInit

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

# splitmix64's constants (Steele, Lea & Flood 2014): an increment with no short cycle and the two
# multipliers of its finaliser, which avalanches every input bit into every output bit.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_MUL2 = np.uint64(0x94D049BB133111EB)
_GOLDEN_INT, _MIX_MUL1_INT, _MIX_MUL2_INT = int(_GOLDEN), int(_MIX_MUL1), int(_MIX_MUL2)

# Luby-Rackoff: 4 rounds of independent random round functions give a strong pseudo-random
# permutation; 6 leave a margin for a cheap (non-cryptographic) round function.
FEISTEL_ROUNDS = 6

# Positions computed per vectorised call while iterating: large enough to amortise numpy's per-call
# overhead (~1 µs per op), small enough that a rank starts yielding at once and holds ~100 KB.
POSITIONS_PER_CHUNK = 4096

# Domain tags, so keys derived for different purposes from the same (seed, epoch) are unrelated.
_TAG_ORDER = 0x6F72646572  # "order"
_TAG_DRAW = 0x64726177  # "draw" (sampling with replacement)
_TAG_SAMPLE = 0x73616D706C65  # "sample" (per-sample augmentation seeds)
_TAG_LOADER = 0x6C6F61646572  # "loader" (the DataLoader's generator: worker base seeds)
_TAG_COLLATE = 0x636F6C6C617465  # "collate" (a batch's collate_fn seed, from its first sample's)


# ----- keyed hashing ------------------------------------------------------------------------------
def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection of 64-bit words."""
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX_MUL1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX_MUL2
    return values ^ (values >> np.uint64(31))


def keyed_hash(key: int, values: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each uint64 in ``values`` under ``key`` (0 <= key < 2**64); same shape.

    For a fixed key it is a bijection of 64-bit words, so distinct positions never collide.
    """
    return _mix64(_mix64(values ^ np.uint64(key)) + _GOLDEN)


def _mix64_int(value: int) -> int:
    """``_mix64`` of one Python int in [0, 2**64): the same bits, without numpy's per-call cost."""
    value ^= value >> 30
    value = (value * _MIX_MUL1_INT) & MASK64
    value ^= value >> 27
    value = (value * _MIX_MUL2_INT) & MASK64
    return value ^ (value >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit key from any integers (negative ones by their two's complement): order matters.

    Each part is absorbed as ``key = keyed_hash(key, part)``, computed on Python ints: a key per
    batch (the collate seed) costs ~2 µs instead of ~30 µs through one-element numpy arrays.
    """
    key = 0
    for part in parts:
        key = _mix64_int((_mix64_int((part & MASK64) ^ key) + _GOLDEN_INT) & MASK64)
    return key


# ----- the epoch's order --------------------------------------------------------------------------
@dataclass(frozen=True)
class Permutation:
    """A keyed pseudo-random bijection on ``[0, size)``, evaluated per position in O(1) memory.

    A balanced Feistel network permutes the smallest ``[0, 4**k)`` that holds ``size``; positions it
    maps outside ``[0, size)`` are encrypted again until they land inside (cycle-walking), which keeps
    the restriction a bijection. The domain is below ``4 * size``, so a position takes on average
    fewer than 4 encryptions (about 1.05 at size 1e6, 1.7 at 1e10).
    """

    size: int
    round_keys: tuple[int, ...]

    @classmethod
    def for_epoch(cls, size: int, seed: int, epoch: int) -> "Permutation":
        if size < 1:
            raise ValueError(f"a permutation needs at least one element, got size={size}")
        keys = tuple(derive_key(_TAG_ORDER, seed, epoch, r) for r in range(FEISTEL_ROUNDS))
        return cls(size, keys)

    @property
    def half_bits(self) -> int:
        """Bits in each Feistel half: the domain is ``4 ** half_bits >= size`` (at least 4)."""
        return max(1, ((self.size - 1).bit_length() + 1) // 2)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The element at each position (uint64 array in ``[0, size)`` -> uint64 array)."""
        out = self._encrypt(positions.astype(np.uint64))
        walking = np.flatnonzero(out >= np.uint64(self.size))
        while walking.size:
            out[walking] = self._encrypt(out[walking])
            walking = walking[out[walking] >= np.uint64(self.size)]
        return out

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = values >> half, values & mask
        for key in self.round_keys:
            left, right = right, left ^ (keyed_hash(key, right) & mask)
        return (left << half) | right


def draws_with_replacement(size: int, seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """Sample indices for positions of an epoch drawn with replacement: ``hash(seed, epoch, p) % size``.

    The modulo's bias is below ``size / 2**64`` (5e-10 at 1e10 samples): immaterial for training.
    """
    return keyed_hash(derive_key(_TAG_DRAW, seed, epoch), positions.astype(np.uint64)) % np.uint64(size)


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The augmentation seed of each global position of an epoch (uint64): distinct within an epoch."""
    return keyed_hash(derive_key(_TAG_SAMPLE, seed, epoch), positions.astype(np.uint64))


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's DataLoader generator for an epoch (its workers' base seeds)."""
    return derive_key(_TAG_LOADER, seed, epoch, rank)


# ----- the sampler --------------------------------------------------------------------------------
class SampleKey(NamedTuple):
    """What the sampler yields and ``SeededSamples`` receives: a sample and its augmentation seed."""

    index: int
    seed: int


class ResumableSampler(Sampler[SampleKey]):
    """One rank's share of an epoch, from any batch onwards, computed per position.

    Yields ``steps * batch_size`` keys per full epoch (whole batches only: every rank takes the same
    number of optimizer steps), minus the ``start_batch * batch_size`` already consumed; ``len()`` is
    always the full epoch's.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, replacement: bool = False, drop_last: bool = True):
        _check_shape(size, batch_size if drop_last else 1, rank, world_size)
        if replacement and not shuffle:
            raise ValueError("replacement=True draws random indices; it cannot be combined with "
                             "shuffle=False (use replacement=False for a fixed order)")
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.replacement = replacement
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self._order: Optional[Permutation] = None
        self.set_position(seed, 0, 0)

    @property
    def num_samples(self) -> int:
        """This rank's share of an epoch, as DistributedSampler computes it: with ``drop_last`` the
        remainder of ``size / world_size`` is left out, without it the epoch is padded by wrapping
        around to its first positions."""
        return self.size // self.world_size if self.drop_last else -(-self.size // self.world_size)

    @property
    def steps(self) -> int:
        """Batches per epoch, the same on every rank: full ones only with ``drop_last``
        (``size // global_batch``), else the last, partial one too."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    @property
    def epoch_samples(self) -> int:
        """Keys this rank yields in a full epoch."""
        return self.steps * self.batch_size if self.drop_last else self.num_samples

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """DistributedSampler's call: start epoch ``epoch`` from its first batch."""
        self.set_position(self.seed, epoch, 0)

    def set_position(self, seed: int, epoch: int, batch_in_epoch: int) -> None:
        """Start at batch ``batch_in_epoch`` of epoch ``epoch``: O(1) in the dataset's size.

        Raises ValueError for a negative epoch, or a batch outside ``[0, steps]`` (``steps`` itself
        is the epoch's end: nothing left to yield).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= batch_in_epoch <= self.steps:
            raise ValueError(f"batch {batch_in_epoch} is past the end of the epoch: it has {self.steps} "
                             f"batches of {self.batch_size} per rank ({self.size} samples over "
                             f"{self.world_size} ranks)")
        self.seed, self.epoch, self.start_batch = seed, epoch, batch_in_epoch
        self._order = Permutation.for_epoch(self.size, seed, epoch) if self.shuffle else None

    def global_positions(self, first: int, stop: int) -> np.ndarray:
        """Global positions of this rank's local positions ``[first, stop)`` of the epoch."""
        return np.arange(first, stop, dtype=np.uint64) * np.uint64(self.world_size) + np.uint64(self.rank)

    def indices_at(self, positions: np.ndarray) -> np.ndarray:
        """The sample index at each global position of the current epoch (uint64 array); positions
        past the dataset (``drop_last=False``'s padding) wrap around to the epoch's first ones."""
        positions = positions % np.uint64(self.size)
        if self.replacement:
            return draws_with_replacement(self.size, self.seed, self.epoch, positions)
        if self._order is None:  # shuffle=False: the dataset's own order, as DistributedSampler
            return positions.astype(np.uint64)
        return self._order(positions)

    def __iter__(self) -> Iterator[SampleKey]:
        stop = self.epoch_samples
        # Bind the position now: set_position during iteration must not change this pass.
        seed, epoch, first = self.seed, self.epoch, self.start_batch * self.batch_size
        for chunk_start in range(first, stop, POSITIONS_PER_CHUNK):
            positions = self.global_positions(chunk_start, min(chunk_start + POSITIONS_PER_CHUNK, stop))
            indices = self.indices_at(positions).tolist()
            seeds = sample_seeds(seed, epoch, positions).tolist()
            yield from map(SampleKey, indices, seeds)

    def __len__(self) -> int:
        # A full epoch whatever the position: len(loader) is what a script sizes its schedules by,
        # and it must not shrink after a resume (iteration from a position yields the epoch's tail).
        return self.epoch_samples


def _check_shape(size: int, batch_size: int, rank: int, world_size: int) -> None:
    """Reject shapes that would give some rank no full batch; the message names both numbers."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} ranks")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    share = size // world_size
    if share < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than each rank's share of an epoch "
                         f"({share} samples: {size} samples over {world_size} ranks): "
                         "shrink the batch or add data")


# ----- a user's sampler or batch sampler -----------------------------------------------------------
DEFAULT_PREFETCH = 2  # DataLoader's prefetch_factor when workers are used and it is not given
LOOKAHEAD_MARGIN = 4  # batch states kept beyond what the workers can hold
# What a sampler's state may hold: what ``torch.load(weights_only=True)`` reads back.
PLAIN_TYPES = (type(None), bool, int, float, str, bytes, torch.Tensor)


def _set_epoch(sampler: Sampler, epoch: int) -> None:
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)


def _is_stateful(sampler: Sampler) -> bool:
    return callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None))


def _check_plain(value: Any, owner: str) -> None:
    """TypeError unless ``value`` is plain data that a checkpoint can be loaded back safely with."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, owner)
            _check_plain(item, owner)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, owner)
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"{owner}() holds a {type(value).__name__}: a checkpoint keeps only plain data "
                        "(dicts, lists, numbers, strings, tensors) so that it loads with weights_only=True; "
                        "return e.g. a generator's get_state() instead of the generator")


class OwnState:
    """A user's sampler with ``state_dict()/load_state_dict()``, resumed from its own state.

    The protocol is torchdata's (``Stateful``, e.g. its StatefulDistributedSampler): ``state_dict()``
    may be taken between any two indices, and ``load_state_dict(state)`` then ``iter()`` yields from
    where it was taken. The state is taken each time a batch's indices are drawn (``take``), kept for
    the last ``lookahead`` batches (DataLoader workers draw ahead of the step being trained), and
    each rank saves the one at the trained position. Resuming calls ``set_epoch`` of the saved epoch,
    loads the state, and lets the sampler continue by itself. A resume that lands on the next epoch
    first iterates the saved epoch to the sampler's end, so that its state moves on as in the
    uninterrupted run: exact when the state moves by ``set_epoch``, ``iter()`` and the indices the
    epoch uses (torchdata's sampler; one reshuffling from its own generator at each ``iter()``), not
    for one that draws from a generator per index past those ``drop_last`` leaves out. A sampler
    without the protocol is resumed by ``set_epoch`` and a skip (``begin`` returns False).
    """

    def __init__(self, sampler: Sampler, lookahead: int):
        self.sampler, self.stateful = sampler, _is_stateful(sampler)
        self.taken: collections.deque = collections.deque(maxlen=lookahead)  # {"epoch", "batch", "state"}
        self.pending: Optional[dict] = None  # a saved entry, loaded when its epoch begins

    def begin(self, epoch: int, batch: int, draw_rest: Callable[[], None]) -> bool:
        """Prepare to draw epoch ``epoch`` from batch ``batch``: True when the sampler was set to that
        position from its saved state (it then skips by itself), False when the caller must skip.
        ``draw_rest()`` iterates the sampler to its end, dropping what it yields."""
        pending, self.pending = self.pending, None
        if pending is not None and (pending["epoch"], pending["batch"]) == (epoch, batch):
            self._load(pending)
            self.taken.append(pending)
            return True
        if pending is not None and pending["epoch"] == epoch - 1:
            self._load(pending)
            draw_rest()
        # Any other saved position (the batch size changed mid-epoch): the epoch starts afresh and
        # the caller skips by samples, as for a sampler without state; the resume warns of the change.
        _set_epoch(self.sampler, epoch)
        return False

    def _load(self, saved: dict) -> None:
        _set_epoch(self.sampler, saved["epoch"])
        self.sampler.load_state_dict(copy.deepcopy(saved["state"]))

    def take(self, epoch: int, batch: int) -> None:
        """The sampler's state once the indices before batch ``batch`` of epoch ``epoch`` are drawn."""
        if self.stateful:
            state = copy.deepcopy(self.sampler.state_dict())
            _check_plain(state, f"{type(self.sampler).__name__}.state_dict")
            self.taken.append({"epoch": epoch, "batch": batch, "state": state})

    def at(self, epoch: int, batch: int) -> Optional[dict]:
        matching = (entry for entry in reversed(self.taken) if (entry["epoch"], entry["batch"]) == (epoch, batch))
        return next(matching, None)


class UserSampler(Sampler[SampleKey]):
    """A user's sampler (this rank's indices, DistributedSampler's contract), made positionable.

    Epoch ``e`` from batch ``b``: ``set_epoch(e)`` when the sampler has it, then the first
    ``b * batch_size`` indices are drawn and dropped (index draws only, no sample is loaded); each
    key's seed hashes the global position ``local * world_size + rank`` as ``ResumableSampler``'s.
    Exact when the sampler's order is a function of ``set_epoch`` (or fixed), as DistributedSampler
    and torchvision's RASampler are. A sampler with ``state_dict()/load_state_dict()`` (torchdata's
    StatefulDistributedSampler) is resumed from its own state instead, which skips by itself
    (``OwnState``); its indices are then drawn a batch at a time. ``lookahead``: batches the
    DataLoader may draw ahead of the one trained (``_lookahead``). Raises TypeError for a sampler
    without ``__len__`` (the epoch's length sizes steps and skips).
    """

    def __init__(self, sampler: Sampler, batch_size: int, rank: int, world_size: int, seed: int,
                 drop_last: bool = True, lookahead: int = 4):
        if not hasattr(sampler, "__len__"):
            raise TypeError(f"sampler {type(sampler).__name__} has no __len__: the harness needs the "
                            "epoch's length to count steps and to position a resume")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size
        self.drop_last = drop_last
        self.seed, self.epoch, self.start_batch = seed, 0, 0
        self.own_state = OwnState(sampler, lookahead)
        if self.steps < 1:
            raise ValueError(f"sampler {type(sampler).__name__} yields {len(sampler)} indices per epoch, "
                             f"fewer than batch_size={batch_size} with drop_last=True")

    @property
    def steps(self) -> int:
        size = len(self.sampler)
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch_samples(self) -> int:
        return self.steps * self.batch_size if self.drop_last else len(self.sampler)

    def set_position(self, seed: int, epoch: int, batch_in_epoch: int) -> None:
        """Start at batch ``batch_in_epoch`` of epoch ``epoch`` (ValueError past the epoch's end)."""
        if not 0 <= batch_in_epoch <= self.steps:
            raise ValueError(f"batch {batch_in_epoch} is past the end of the epoch: its sampler gives "
                             f"{self.steps} batches of {self.batch_size}")
        self.seed, self.epoch, self.start_batch = seed, epoch, batch_in_epoch

    def __iter__(self) -> Iterator[SampleKey]:
        seed, epoch, first, stop = self.seed, self.epoch, self.start_batch * self.batch_size, self.epoch_samples
        resumed = self.own_state.begin(epoch, self.start_batch, lambda: _drop(iter(self.sampler)))
        indices = iter(self.sampler)
        if not resumed:
            indices = itertools.islice(indices, first, None)  # the skip: index draws only
        indices = itertools.islice(indices, stop - first)
        # A stateful sampler's state is taken per batch, so its indices are drawn a batch at a time.
        per_chunk = self.batch_size if self.own_state.stateful else POSITIONS_PER_CHUNK
        for chunk_start in range(first, stop, per_chunk):
            chunk = list(itertools.islice(indices, per_chunk))
            self.own_state.take(epoch, chunk_start // self.batch_size + 1)
            positions = np.arange(chunk_start, chunk_start + len(chunk), dtype=np.uint64)
            seeds = sample_seeds(seed, epoch, positions * np.uint64(self.world_size) + np.uint64(self.rank))
            yield from map(SampleKey, chunk, seeds.tolist())

    def __len__(self) -> int:
        return self.epoch_samples


class UserBatchSampler(Sampler[list]):
    """A user's batch sampler (lists of this rank's indices), made positionable like ``UserSampler``:
    ``set_epoch(e)`` when it has it, then ``b`` batches drawn and dropped. Sample ``j`` of batch ``k``
    is seeded from the global position ``(k * world_size + rank) * 2**32 + j``."""

    def __init__(self, batch_sampler: Sampler, rank: int, world_size: int, seed: int, lookahead: int = 4):
        if not hasattr(batch_sampler, "__len__"):
            raise TypeError(f"batch_sampler {type(batch_sampler).__name__} has no __len__: the harness "
                            "needs the epoch's length to count steps and to position a resume")
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size
        self.seed, self.epoch, self.start_batch = seed, 0, 0
        self.own_state = OwnState(batch_sampler, lookahead)

    @property
    def steps(self) -> int:
        return len(self.batch_sampler)

    @property
    def global_batch(self) -> int:
        """Batches, not samples, per step over all ranks: a batch sampler's batches may vary in size."""
        return self.world_size

    def set_position(self, seed: int, epoch: int, batch_in_epoch: int) -> None:
        if not 0 <= batch_in_epoch <= self.steps:
            raise ValueError(f"batch {batch_in_epoch} is past the end of the epoch: its batch sampler "
                             f"gives {self.steps} batches")
        self.seed, self.epoch, self.start_batch = seed, epoch, batch_in_epoch

    def __iter__(self) -> Iterator[list]:
        seed, epoch = self.seed, self.epoch
        resumed = self.own_state.begin(epoch, self.start_batch, lambda: _drop(iter(self.batch_sampler)))
        batches = iter(self.batch_sampler)
        if not resumed:
            batches = itertools.islice(batches, self.start_batch, None)
        for number, batch in enumerate(batches, start=self.start_batch):
            self.own_state.take(epoch, number + 1)
            first = np.uint64(number * self.world_size + self.rank) << np.uint64(32)
            seeds = sample_seeds(seed, epoch, first + np.arange(len(batch), dtype=np.uint64))
            yield list(map(SampleKey, batch, seeds.tolist()))

    def __len__(self) -> int:
        return self.steps


def _drop(iterator: Iterator[Any]) -> None:
    for _ in iterator:
        pass


# ----- per-sample seeding -------------------------------------------------------------------------
class SeededSamples(Dataset):
    """Wraps a map-style dataset: ``self[SampleKey(i, s)]`` is ``(s, dataset[i])``, drawn under seed ``s``.

    With ``seed_samples`` the global RNGs that augmentations use (torch's CPU generator, ``random``,
    ``numpy.random``) are seeded from ``s`` before the call and restored afterwards, also when it
    raises; CUDA generators are not touched. torch and numpy's legacy ``seed(int)`` keep 32 bits of a
    seed, so among ~65k samples two share those streams about once (``random`` takes all 64 bits).
    With ``seed_samples=False`` the dataset draws from whatever state the process has (a control).
    The seed travels with the sample to ``SeededCollate``, which seeds the batch's collate from it.
    """

    def __init__(self, dataset: Dataset, seed_samples: bool = True, collate: Optional["SeededCollate"] = None):
        self.dataset = dataset
        self.seed_samples = seed_samples
        self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[int, Any]:
        index, sample_seed = key
        if not self.seed_samples:
            return sample_seed, self.dataset[index]
        return sample_seed, call_seeded(sample_seed, self.dataset.__getitem__, index)

    def __getitems__(self, keys: list) -> Any:
        """A batch's samples, as DataLoader fetches them. In the main process the training RNG is
        saved and restored once around the batch, not around each sample (numpy's save and restore
        cost ~150 µs, seeding a sample ~12 µs), and a seeded ``collate`` (``make_loader`` sets it)
        runs inside the same block: the result is then ``Collated``, which ``SeededCollate`` hands
        on as it is."""
        seeds_collate = self.collate is not None and self.collate.seeded
        if get_worker_info() is not None or not (self.seed_samples or seeds_collate):
            return self._samples(keys)
        with training_rng_kept():
            keyed = self._samples(keys)
            # An unseeded collate (the default one, or a control) runs as the DataLoader calls it.
            return Collated(self.collate.collate(keyed)) if seeds_collate else keyed

    def _samples(self, keys: list) -> list:
        if not self.seed_samples:
            return [(sample_seed, self.dataset[index]) for index, sample_seed in keys]
        return [(sample_seed, _seeded(sample_seed, self.dataset.__getitem__, index))
                for index, sample_seed in keys]


class Collated(NamedTuple):
    """A batch collated in the main process by ``SeededSamples.__getitems__``."""
    batch: Any


class SeededCollate:
    """The loader's ``collate_fn``: strips the seeds ``SeededSamples`` attached and calls the user's
    collate with the global RNGs seeded from the batch's first sample's seed (so from (seed, epoch,
    the batch's position, rank)), in a worker or in the main process alike; the main process's
    training RNG is restored afterwards. ``seed_collate=False``: no seeding (a control). The default
    collate draws no random numbers and is called unseeded (no cost)."""

    def __init__(self, collate_fn: Optional[Callable], seed_collate: bool = True):
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.seeded = seed_collate and self.collate_fn is not default_collate

    def __call__(self, keyed: Any) -> Any:
        if isinstance(keyed, Collated):
            return keyed.batch
        if not self.seeded or not keyed:
            return self.collate(keyed)
        with training_rng_kept():
            return self.collate(keyed)

    def collate(self, keyed: list) -> Any:
        """The user's collate of ``(seed, sample)`` pairs, seeded unless it is a control; the
        caller keeps the training RNG (``training_rng_kept``)."""
        samples = [sample for _, sample in keyed]
        if not self.seeded or not keyed:
            return self.collate_fn(samples)
        return _seeded(derive_key(_TAG_COLLATE, keyed[0][0]), self.collate_fn, samples)


def call_seeded(seed: int, function: Callable, *args: Any) -> Any:
    """``function(*args)`` with torch's CPU generator, ``random`` and ``numpy.random`` seeded from
    ``seed``; in the main process (not a DataLoader worker) their states are restored afterwards,
    also when it raises, so training's RNG (dropout) never sees these draws."""
    with training_rng_kept():
        return _seeded(seed, function, *args)


def _seeded(seed: int, function: Callable, *args: Any) -> Any:
    _seed_global_rngs(seed)
    return function(*args)


@contextlib.contextmanager
def training_rng_kept() -> Iterator[None]:
    """In the main process, restore the global RNGs (torch's CPU generator, ``random``,
    ``numpy.random``) to their state on entry when the block ends, also when it raises. In a
    DataLoader worker nothing is kept: its global RNGs serve nothing else."""
    if get_worker_info() is not None:
        yield
        return
    torch_state, python_state, numpy_state = torch.default_generator.get_state(), random.getstate(), \
        np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _seed_global_rngs(sample_seed: int) -> None:
    # Different 32-bit words for torch and numpy: both seed MT19937 by init_genrand from 32 bits,
    # so the same word would give them the same raw stream. default_generator, not
    # torch.manual_seed: the latter also reseeds the CUDA generators, which nothing here restores.
    low, high = sample_seed & MASK32, sample_seed >> 32
    torch.default_generator.manual_seed(low)
    np.random.seed(high)
    random.seed(sample_seed)


# ----- the loader ---------------------------------------------------------------------------------
# DataLoader options the harness passes through unchanged: they change how batches are made, never
# which samples a batch holds.
PASSED_OPTIONS = ("timeout", "multiprocessing_context", "prefetch_factor", "persistent_workers",
                  "pin_memory_device")


def make_loader(dataset: Dataset, batch_size: Optional[int], rank: int, world_size: int, seed: int,
                shuffle: Optional[bool] = None, num_workers: int = 0, pin_memory: bool = False,
                collate_fn: Optional[Callable] = None,
                worker_init_fn: Optional[Callable[[int], None]] = None,
                replacement: bool = False, seed_samples: bool = True, *,
                sampler: Optional[Sampler] = None, batch_sampler: Optional[Sampler] = None,
                drop_last: bool = True, in_order: bool = True, seed_collate: bool = True,
                generator: Optional[torch.Generator] = None, **passed: Any) -> DataLoader:
    """A loader over this rank's share of each epoch whose position can be set to any batch.

    Takes DataLoader's keywords. Order: without ``sampler``/``batch_sampler`` the harness's keyed
    permutation (``shuffle``, default True) sharded over ranks; ``sampler=`` a user's sampler of this
    rank's indices (``UserSampler``), ``batch_sampler=`` a user's batch sampler (``UserBatchSampler``).
    ``drop_last`` (default True): full batches only; False: an epoch's last, partial batch too (the
    harness's order is then padded as DistributedSampler pads). ``timeout``,
    ``multiprocessing_context``, ``prefetch_factor``, ``persistent_workers``, ``pin_memory_device``:
    passed through. Workers ignore stop signals (the main process saves, so workers must not die
    first); the loader has its own generator, seeded per (seed, epoch, rank), so ``iter()`` never
    draws from the global RNG. ``replacement``: draw indices with replacement (``n`` per epoch).
    ``seed_samples``/``seed_collate``: seed the global RNGs per sample around ``dataset[i]`` and per
    batch around ``collate_fn`` (``SeededSamples``, ``SeededCollate``); False only as controls.
    ``loader.dataset`` is the ``SeededSamples`` wrapper; the user's dataset is its ``.dataset``.

    Raises TypeError for an iterable-style dataset, a ``generator`` (the harness seeds the loader
    from ``trainer.seed``) or an unknown keyword; ValueError for ``in_order=False`` (batches in
    completion order: N batches done is not the epoch's first N, so no position can be saved),
    ``shuffle=True`` with a sampler, options DataLoader combines only with ``batch_size`` given
    together with ``batch_sampler``, and a batch larger than a rank's share of an epoch.
    """
    _refuse_unkeepable(dataset, passed, in_order, generator)
    if sampler is not None or batch_sampler is not None:
        if shuffle:
            raise ValueError("shuffle=True with a sampler or batch_sampler: the sampler decides the order "
                             "(DataLoader refuses the pair too); leave shuffle unset")
        if sampler is not None and batch_sampler is not None:
            raise ValueError("sampler and batch_sampler are mutually exclusive (as in DataLoader)")
    collate = SeededCollate(collate_fn, seed_collate)
    options: dict[str, Any] = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate,
                                   worker_init_fn=ChainedWorkerInit(worker_init_fn),
                                   generator=torch.Generator().manual_seed(loader_seed(seed, 0, rank)), **passed)
    wrapped = SeededSamples(dataset, seed_samples, collate)
    lookahead = _lookahead(num_workers, passed.get("prefetch_factor"))
    if batch_sampler is not None:
        positioned = UserBatchSampler(batch_sampler, rank=rank, world_size=world_size, seed=seed,
                                      lookahead=lookahead)
        return DataLoader(wrapped, batch_sampler=positioned, **options)
    if batch_size is None:
        raise ValueError("batch_size=None (no batching) is not supported: the harness counts steps in "
                         "batches; pass batch_size or a batch_sampler")
    if sampler is not None:
        positioned = UserSampler(sampler, batch_size, rank=rank, world_size=world_size, seed=seed,
                                 drop_last=drop_last, lookahead=lookahead)
    else:
        positioned = ResumableSampler(len(dataset), batch_size=batch_size, rank=rank, world_size=world_size,
                                      seed=seed, shuffle=True if shuffle is None else shuffle,
                                      replacement=replacement, drop_last=drop_last)
    return DataLoader(wrapped, batch_size=batch_size, sampler=positioned, drop_last=drop_last, **options)


def _lookahead(num_workers: int, prefetch_factor: Optional[int]) -> int:
    """Batches a DataLoader's sampler may be drawn ahead of the batch being trained: each worker holds
    ``prefetch_factor`` (default 2) batches, plus the one in hand; kept with a margin."""
    return num_workers * (prefetch_factor or DEFAULT_PREFETCH) + LOOKAHEAD_MARGIN


def _refuse_unkeepable(dataset: Dataset, passed: dict, in_order: bool, generator: Any) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"{type(dataset).__name__} is not a map-style dataset with __len__: the "
                        "harness positions data by index (dataset[i] for i < len(dataset))")
    unknown = sorted(set(passed) - set(PASSED_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected DataLoader option(s) {unknown}: the harness's loader takes "
                        "batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, "
                        f"drop_last, worker_init_fn, in_order, {', '.join(PASSED_OPTIONS)}")
    if generator is not None:
        raise TypeError("generator=: the harness seeds the loader's generator per (trainer.seed, epoch, "
                        "rank) so that a resume draws the same; set trainer.seed instead")
    if not in_order:
        raise ValueError("in_order=False hands out batches as workers finish them: the N batches "
                         "trained on are then not the epoch's first N, so the position cannot be saved "
                         "and a resume would repeat or skip samples; leave in_order=True")


def adopt(loader: DataLoader, rank: int, world_size: int, seed: int) -> DataLoader:
    """A resumable loader with the options of ``loader``, a plain DataLoader a script built.

    Its sampler is kept (resumed by ``set_epoch`` and a skip, see ``UserSampler``), except
    DataLoader's own defaults: ``RandomSampler`` (``shuffle=True``) and ``SequentialSampler``
    become the harness's sharded order, shuffled or not, since they would give every rank the
    whole dataset. A user's batch sampler is kept likewise. A loader the harness made is returned
    as it is. Raises TypeError for an iterable dataset (use ``session.loader``, which needs its
    position protocol), plus what ``make_loader`` raises for options it cannot keep.
    """
    if _positioner_or_none(loader) is not None:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("a DataLoader over an IterableDataset cannot be positioned from outside: build it "
                        "with session.loader(dataset, ...), which saves the stream's own position")
    options: dict[str, Any] = {name: getattr(loader, name) for name in PASSED_OPTIONS}
    if loader.num_workers == 0:
        options.pop("prefetch_factor")  # DataLoader refuses it without workers
    options.update(num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                   collate_fn=None if loader.collate_fn is default_collate else loader.collate_fn,
                   worker_init_fn=loader.worker_init_fn, in_order=getattr(loader, "in_order", True))
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return make_loader(loader.dataset, None, rank, world_size, seed, batch_sampler=batch_sampler, **options)
    sampler = loader.sampler
    if isinstance(sampler, (RandomSampler, SequentialSampler)):
        shuffle, sampler = isinstance(sampler, RandomSampler), None
    else:
        shuffle = None
    return make_loader(loader.dataset, loader.batch_size, rank, world_size, seed, shuffle=shuffle,
                       sampler=sampler, drop_last=loader.drop_last, **options)


def _positioner_or_none(loader: DataLoader):
    if isinstance(loader.batch_sampler, UserBatchSampler):
        return loader.batch_sampler
    if isinstance(loader.sampler, (ResumableSampler, UserSampler)):
        return loader.sampler
    return None


def _sampler_of(loader: DataLoader):
    positioner = _positioner_or_none(loader)
    if positioner is None:
        raise TypeError("the loader's position cannot be restored: build it with session.loader(...) "
                        "or harness.data.make_loader(...), or pass it to session.batches(), which adopts "
                        "a plain DataLoader")
    return positioner


def uses_own_sampler(loader: DataLoader) -> bool:
    """Whether a harness loader's order comes from a user's sampler or batch sampler."""
    return not isinstance(_sampler_of(loader), ResumableSampler)


def steps_per_epoch(loader: DataLoader) -> int:
    """Loader batches in a full epoch, the same on every rank and after any resume."""
    return _sampler_of(loader).steps


def global_batch_size(loader: DataLoader) -> int:
    """Samples per optimizer step over all ranks (``world_size * batch_size``); with a user's batch
    sampler, batches (``world_size``): its batches may vary in size."""
    return _sampler_of(loader).global_batch


def dataset_size(loader: DataLoader) -> Optional[int]:
    """Samples in the loader's dataset (the epoch's order is drawn over them), or None if it has no
    length. A resume compares it with the checkpoint's: the same position in another order is
    another set of samples."""
    try:
        return len(loader.dataset)
    except TypeError:
        return None


def sampler_state(loader: Optional[DataLoader], epoch: int, batch_in_epoch: int) -> Optional[dict]:
    """This rank's user sampler's own state at batch ``batch_in_epoch`` of epoch ``epoch`` (see
    ``OwnState``), or None: no user sampler, one without ``state_dict()``, or no such batch drawn."""
    positioner = None if loader is None else _positioner_or_none(loader)
    if positioner is None or isinstance(positioner, ResumableSampler):
        return None
    return positioner.own_state.at(epoch, batch_in_epoch)


def load_sampler_state(loader: DataLoader, saved: dict) -> None:
    """Resume ``loader``'s user sampler from ``saved`` (``sampler_state`` of a saved run, this rank)
    when the epoch it was taken in begins. TypeError for a loader without a user sampler with
    ``load_state_dict()``: the state was saved from one, so the script's data code has changed."""
    positioner = _positioner_or_none(loader)
    if positioner is None or isinstance(positioner, ResumableSampler) or not positioner.own_state.stateful:
        raise TypeError("the checkpoint holds the state of a sampler with state_dict()/load_state_dict(), "
                        "but this loader has no such sampler: pass the same sampler= as the run that "
                        "saved it, or start a new run folder")
    positioner.own_state.pending = saved


def position_loader(loader: DataLoader, seed: int, epoch: int, batch_in_epoch: int) -> None:
    """Make the next ``iter(loader)`` yield epoch ``epoch`` from batch ``batch_in_epoch`` on.

    With the harness's order O(1) in the dataset's size: no index before the position is computed
    or loaded; with a user's sampler the indices before it are drawn and dropped. Also reseeds
    the loader's generator for (seed, epoch, rank). Raises ValueError for a position past the end of
    the epoch (``batch_in_epoch > steps_per_epoch(loader)``), TypeError for a foreign loader.
    """
    sampler = _sampler_of(loader)
    sampler.set_position(seed, epoch, batch_in_epoch)
    loader.generator.manual_seed(loader_seed(seed, epoch, sampler.rank))


# ----- streams: iterable datasets that carry their own position ------------------------------------
class StreamLoader(DataLoader):
    """A DataLoader over an iterable dataset with ``state_dict()/load_state_dict()`` (the protocol of
    torchdata's StatefulDataLoader and Hugging Face ``datasets`` streaming), without workers.

    The loader is a Stateful: its state is the dataset's position, which the harness saves with each
    checkpoint and restores before the next ``iter()``. Without workers nothing is prefetched, so
    after N batches the dataset's position is exactly N x batch_size items in.
    """

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])


def release(loader: Optional[DataLoader], persistent_too: bool = False) -> None:
    """Drop the live iterator a loader keeps itself (torchdata's StatefulDataLoader does, to report
    its state; DataLoader does with ``persistent_workers``), so its worker processes shut down now
    rather than at interpreter exit. A stream's position was read into the checkpoint already; the
    next ``iter()`` starts from load_state_dict. Persistent workers are kept between epochs unless
    ``persistent_too`` (the session closes: a stop or an error)."""
    iterator = getattr(loader, "_iterator", None) if loader is not None else None
    if iterator is None or (loader.persistent_workers and not persistent_too):
        return
    loader._iterator = None  # private, but the only handle: StatefulDataLoader keeps it there
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):  # now, not whenever the garbage collector gets to it
        shutdown()


def is_stream(loader: DataLoader) -> bool:
    """Whether ``loader`` reads an iterable dataset (no epochs positions; the loader is a Stateful)."""
    return isinstance(loader.dataset, IterableDataset)


def make_stream_loader(dataset: IterableDataset, batch_size: int, world_size: int, num_workers: int = 0,
                       pin_memory: bool = False, collate_fn: Optional[Callable] = None,
                       worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """A resumable loader over an iterable dataset: each rank reads its own stream (shard it by rank
    yourself, e.g. ``datasets.distributed.split_dataset_by_node``).

    Raises TypeError when the dataset cannot report its position (it would silently restart from
    the beginning of the stream on every resume) and ImportError when ``num_workers > 0`` needs
    torchdata's StatefulDataLoader (it collects the position from every worker) and it is missing.
    """
    if not (callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))):
        raise TypeError(f"{type(dataset).__name__} is an IterableDataset without state_dict()/"
                        "load_state_dict(): a resume would restart its stream from the beginning. "
                        "HINT: implement both (Hugging Face datasets streaming does), or use a "
                        "map-style dataset (__getitem__ + __len__)")
    options = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                   collate_fn=collate_fn, drop_last=True)
    if num_workers == 0:
        return StreamLoader(dataset, **options)
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError as error:
        raise ImportError("num_workers > 0 with an iterable dataset needs torchdata's "
                          "StatefulDataLoader to collect every worker's position: pip install "
                          "'harness[stream]' (or torchdata), or set num_workers=0") from error
    return StatefulDataLoader(dataset, worker_init_fn=ChainedWorkerInit(worker_init_fn), **options)
