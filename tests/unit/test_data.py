"""harness.data: per-position order, sharding, resumable positions and per-sample augmentation seeds.

Real DataLoaders with real worker processes over small datasets; one 1e10-sample dataset that only
returns its index shows that positioning never touches the dataset's size.
"""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from harness.data import (Permutation, make_loader, position_loader, steps_per_epoch,
                          global_batch_size)

HUGE = 10**10
SMALL_SIZES = [1, 2, 3, 4, 5, 7, 13, 16, 17, 31, 97, 100, 127, 128, 129, 1000, 1023, 1025, 4099]


class IndexDataset:
    """Returns the index: the loader's order made visible."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class AugmentingDataset(IndexDataset):
    """Draws from all three global RNGs, like random crops and flips would."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), torch.rand(()).item(), random.random(), np.random.rand()],
                            dtype=torch.float64)


def epoch_batches(loader, seed: int = 0, epoch: int = 0, start: int = 0) -> list[torch.Tensor]:
    position_loader(loader, seed, epoch, start)
    return list(loader)


def flat(batches: list[torch.Tensor]) -> list:
    return torch.cat(batches).tolist() if batches else []


def rng_states() -> tuple:
    numpy_state = np.random.get_state()
    return (torch.get_rng_state(), random.getstate(),
            (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]))


def same_rng_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ----- keys ---------------------------------------------------------------------------------------
def test_derive_key_is_the_chain_of_keyed_hashes_it_always_was():
    """derive_key works on Python ints for speed; its keys (hence every order and seed of a run
    that resumes under a newer harness) must stay those of the numpy keyed_hash chain."""
    from harness.data import derive_key, keyed_hash

    def by_numpy(*parts: int) -> int:
        key = 0
        for part in parts:
            key = int(keyed_hash(key, np.array([part & (2**64 - 1)], dtype=np.uint64))[0])
        return key

    rng = random.Random(7)
    cases = [(0,), (2**64 - 1,), (-1, 5), (0x636F6C6C617465, 2**63), (1, 2, 3, 4)]
    cases += [tuple(rng.randrange(-2**64, 2**64) for _ in range(rng.randint(1, 5))) for _ in range(500)]
    assert [derive_key(*parts) for parts in cases] == [by_numpy(*parts) for parts in cases]


# ----- the permutation ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", SMALL_SIZES)
def test_permutation_is_a_bijection_on_small_and_odd_sizes(size):
    order = Permutation.for_epoch(size, seed=11, epoch=3)(np.arange(size, dtype=np.uint64))
    assert sorted(order.tolist()) == list(range(size))


def test_permutation_differs_between_epochs_and_seeds():
    positions = np.arange(1000, dtype=np.uint64)
    orders = {tuple(Permutation.for_epoch(1000, seed, epoch)(positions).tolist())
              for seed in (0, 1, -1, 2**40) for epoch in (0, 1, 2)}
    assert len(orders) == 12
    assert tuple(range(1000)) not in orders


def test_permutation_of_one_position_matches_the_whole_order():
    perm = Permutation.for_epoch(HUGE, seed=5, epoch=9)
    positions = np.array([0, 1, 12345, HUGE - 1], dtype=np.uint64)
    singles = [int(perm(np.array([p], dtype=np.uint64))[0]) for p in positions.tolist()]
    assert perm(positions).tolist() == singles
    assert all(0 <= index < HUGE for index in singles)


# ----- sharding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_shards_are_disjoint_and_cover_drop_lasts_share(shuffle):
    size, world, batch = 103, 4, 5  # 25 per rank, 3 samples dropped
    shards = [flat(epoch_batches(make_loader(IndexDataset(size), batch, rank, world, seed=7,
                                             shuffle=shuffle), seed=7, epoch=2))
              for rank in range(world)]
    assert all(len(shard) == size // world for shard in shards)
    union = set().union(*map(set, shards))
    assert len(union) == world * (size // world)
    assert union <= set(range(size))
    if not shuffle:  # the fixed order is DistributedSampler's, shard for shard
        for rank, shard in enumerate(shards):
            reference = DistributedSampler(range(size), world, rank, shuffle=False, drop_last=True)
            assert shard == list(reference)


def test_each_steps_global_samples_are_the_same_for_world_sizes_1_2_4():
    size, global_batch, seed = 8 * 12 + 5, 8, 3
    per_world = {}
    for world in (1, 2, 4):
        loaders = [make_loader(IndexDataset(size), global_batch // world, rank, world, seed)
                   for rank in range(world)]
        assert {steps_per_epoch(loader) for loader in loaders} == {size // global_batch}
        assert global_batch_size(loaders[0]) == global_batch
        per_rank = [epoch_batches(loader, seed, epoch=1) for loader in loaders]
        per_world[world] = [sorted(sum((batches[step].tolist() for batches in per_rank), []))
                            for step in range(size // global_batch)]
    assert per_world[1] == per_world[2] == per_world[4]
    assert sorted(sum(per_world[1], [])) != list(range(12 * global_batch))  # shuffled, not a prefix


# ----- positions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_position_loader_yields_exactly_the_tail_of_the_epoch(num_workers):
    loader = make_loader(IndexDataset(97), 4, 1, 2, seed=1, num_workers=num_workers)
    steps = steps_per_epoch(loader)
    full = epoch_batches(loader, 1, epoch=5)
    assert len(full) == steps == 12
    for start in (1, 7, steps - 1, steps):
        assert flat(epoch_batches(loader, 1, 5, start)) == flat(full[start:])
    assert flat(epoch_batches(loader, 1, 6)) != flat(full)


def test_position_past_the_end_of_the_epoch_is_refused():
    loader = make_loader(IndexDataset(40), 4, 0, 2, seed=0)  # 20 per rank: 5 batches
    with pytest.raises(ValueError, match="batch 6 is past the end of the epoch: it has 5 batches"):
        position_loader(loader, 0, 0, 6)
    with pytest.raises(ValueError, match="epoch"):
        position_loader(loader, 0, -1, 0)


def test_batch_larger_than_a_ranks_share_names_both_numbers():
    with pytest.raises(ValueError, match=r"batch_size=6 is larger than each rank's share of an epoch "
                                         r"\(5 samples: 21 samples over 4 ranks\)"):
        make_loader(IndexDataset(21), 6, 0, 4, seed=0)


def test_with_replacement_is_deterministic_and_resumable():
    def build():
        return make_loader(IndexDataset(50), 5, 1, 2, seed=4, replacement=True, num_workers=1)

    first = epoch_batches(build(), 4, epoch=2)
    again = epoch_batches(build(), 4, epoch=2)
    assert flat(first) == flat(again)
    assert flat(epoch_batches(build(), 4, 2, 3)) == flat(first[3:])
    drawn = flat(first)
    assert len(drawn) == 25 and all(0 <= index < 50 for index in drawn)
    assert len(set(drawn)) < len(drawn)  # with replacement: repeats within the epoch
    assert flat(epoch_batches(build(), 4, epoch=3)) != drawn


def test_loader_generator_seed_is_distinct_per_rank_and_epoch():
    seeds = set()
    for rank in range(3):
        loader = make_loader(IndexDataset(30), 2, rank, 3, seed=9)
        for epoch in range(2):
            position_loader(loader, 9, epoch, 0)
            seeds.add(loader.generator.initial_seed())
    assert len(seeds) == 6


# ----- per-sample augmentation seeds --------------------------------------------------------------
def test_augmentations_are_identical_for_any_num_workers_and_after_a_reposition():
    def batches(num_workers: int, start: int = 0) -> list:
        loader = make_loader(AugmentingDataset(64), 4, 1, 2, seed=2, num_workers=num_workers)
        return flat(epoch_batches(loader, 2, 1, start))

    reference = batches(0)
    assert batches(1) == reference
    assert batches(2) == reference
    assert batches(2, start=3) == reference[3 * 4:]
    assert batches(0, start=5) == reference[5 * 4:]


def test_ranks_and_epochs_draw_distinct_augmentations():
    def draws(rank: int, epoch: int) -> list:
        loader = make_loader(AugmentingDataset(32), 4, rank, 2, seed=2, shuffle=False)
        return [row[1:] for row in flat(epoch_batches(loader, 2, epoch))]

    rank0 = draws(0, 0)
    assert len({tuple(row) for row in rank0 + draws(1, 0)}) == 32
    assert draws(0, 1) != rank0


def test_without_sample_seeds_the_stream_depends_on_num_workers():
    """Negative control for the test above: unseeded augmentations follow the worker processes."""
    def batches(num_workers: int) -> list:
        loader = make_loader(AugmentingDataset(64), 4, 1, 2, seed=2, num_workers=num_workers,
                             seed_samples=False)
        return flat(epoch_batches(loader, 2, 1))

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert batches(0) != batches(2)


@pytest.mark.parametrize("seed_samples, cached_gaussian",
                         [(True, False), (True, True), (False, False)])
def test_main_process_rng_is_untouched_with_num_workers_0(seed_samples, cached_gaussian):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.randn(1 if cached_gaussian else 2)  # an odd count leaves numpy's second Gaussian cached
    before = rng_states()
    loader = make_loader(AugmentingDataset(40), 4, 0, 1, seed=3, seed_samples=seed_samples)
    assert len(epoch_batches(loader, 3, 0)) == 10
    # seed_samples=False is the negative control: the dataset drew from the global streams.
    assert same_rng_states(before, rng_states()) == seed_samples


# ----- scale --------------------------------------------------------------------------------------
@pytest.mark.parametrize("replacement", [False, True])
def test_positioning_in_a_1e10_sample_epoch_costs_no_memory_and_is_reproducible(replacement):
    def first_batches(start: int) -> list:
        loader = make_loader(IndexDataset(HUGE), 8, 3, 4, seed=6, replacement=replacement)
        position_loader(loader, 6, 2, start)
        iterator = iter(loader)
        return [next(iterator).tolist() for _ in range(2)]

    steps = HUGE // 32
    tracemalloc.start()
    late = first_batches(steps - 2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20  # a list of 1e10/4 indices would take tens of GB
    assert late == first_batches(steps - 2)
    indices = sum(late, [])
    assert len(set(indices)) == 16 and all(0 <= index < HUGE for index in indices)
    assert first_batches(steps // 2) != late
    loader = make_loader(IndexDataset(HUGE), 8, 3, 4, seed=6, replacement=replacement)
    position_loader(loader, 6, 2, steps - 2)
    assert len(list(loader)) == 2  # the epoch ends there


class FailingDataset(IndexDataset):
    def __getitem__(self, index: int) -> int:
        torch.rand(3), random.random(), np.random.rand()
        raise KeyError(index)


def test_a_failing_sample_still_restores_the_main_process_rng():
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    before = rng_states()
    with pytest.raises(KeyError):
        next(iter(make_loader(FailingDataset(8), 2, 0, 1, seed=0)))
    assert same_rng_states(before, rng_states())


def test_an_iterable_dataset_is_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(TypeError, match="not a map-style dataset"):
        make_loader(Stream(), 2, 0, 1, seed=0)
