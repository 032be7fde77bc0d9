"""The data path through a real single-rank Session (in-process): the loop's public position
(epoch, batch in epoch, steps per epoch), len() of the loader after a resume, and resumes of every
kind of loader a script brings, compared with an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from harness import Preempted, Session, validate
from harness.env import DistEnv

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                 master_port=0, source="single")


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is ``[i, noise]``: the noise is drawn from torch's global RNG, like an augmentation."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), torch.rand(()).item()])


def run(ckpt_dir: Path, make_loader: Callable[[Session], object], max_steps: int,
        stop_at: Optional[int] = None, accumulate: int = 1, seen: Optional[list] = None) -> list[dict]:
    """Train a tiny model; return per step what the loop saw (also appended to ``seen``).
    ``stop_at``: request a stop in that step (the run then raises Preempted after saving it)."""
    # check_every=1: a stop requested in a step is agreed at its end, however fast the machine runs
    cfg = validate({"trainer": {"max_steps": max_steps, "seed": 5, "num_threads": 1},
                    "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1000}, "preempt": {"check_every": 1}})
    seen = [] if seen is None else seen
    with Session(cfg, env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session.register(optimizer=optimizer)
        loader = make_loader(session)
        for batch in session.batches(loader, accumulate=accumulate):
            micro = batch if accumulate > 1 else [batch]
            seen.append({"step": session.step, "epoch": session.epoch, "batch_in_epoch": session.batch_in_epoch,
                         "steps_per_epoch": session.steps_per_epoch, "len": len(loader),
                         "data": torch.cat(micro).clone(), "dropout": torch.rand(()).item()})
            for part in micro:
                model(part[:, :2]).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if stop_at is not None and session.step + 1 == stop_at:
                session.request_stop()
    return seen


def interrupted(tmp_path: Path, make_loader, max_steps: int, stop_at: int, **options) -> tuple[list, list]:
    """(uninterrupted steps, the steps of a run stopped at ``stop_at`` then resumed)."""
    reference = run(tmp_path / "reference", make_loader, max_steps, **options)
    with pytest.raises(Preempted):
        first = run(tmp_path / "run", make_loader, max_steps, stop_at=stop_at, **options)
    resumed = run(tmp_path / "run", make_loader, max_steps, **options)
    return reference, resumed


def assert_same_steps(resumed: list[dict], reference: list[dict]) -> None:
    assert len(resumed) < len(reference), "the resumed run must start mid-run"
    for mine, theirs in zip(resumed, reference[len(reference) - len(resumed):], strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            same = torch.equal(mine[key], theirs[key]) if key == "data" else mine[key] == theirs[key]
            assert same, f"step {theirs['step']}: {key} {mine[key]} != {theirs[key]}"


@pytest.mark.parametrize("accumulate", [1, 2])
def test_epoch_position_and_loader_length_are_the_same_after_a_resume(tmp_path, accumulate):
    # 40 samples, batches of 4: 10 batches per epoch; the stop lands mid-epoch 1.
    reference, resumed = interrupted(tmp_path, lambda s: s.loader(IndexDataset(40), batch_size=4),
                                     max_steps=25 // accumulate, stop_at=13 // accumulate,
                                     accumulate=accumulate)
    steps = 10 // accumulate
    assert [row["epoch"] for row in reference] == [step // steps for step in range(len(reference))]
    assert [row["batch_in_epoch"] for row in reference] == \
        [step % steps * accumulate for step in range(len(reference))]
    assert {row["steps_per_epoch"] for row in reference + resumed} == {steps}
    assert {row["len"] for row in reference + resumed} == {10}, "len(loader) is a full epoch's"
    assert_same_steps(resumed, reference)


def noisy_collate(samples: list) -> torch.Tensor:
    """mixup-like: a random draw per batch from torch, random and numpy, as transforms.v2 do."""
    import random

    import numpy as np

    batch = torch.stack(samples)
    return torch.cat([batch, torch.full((len(samples), 1), torch.rand(()).item() + random.random()
                                        + float(np.random.rand()))], dim=1)


class EpochBatchSampler(torch.utils.data.Sampler):
    """A user's batch sampler with set_epoch: batches of 3 or 5 indices in an epoch-seeded order."""

    def __init__(self, size: int):
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist()
        batches, start = [], 0
        while start < self.size:
            width = 3 if len(batches) % 2 else 5
            batches.append(order[start:start + width])
            start += width
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def _distributed(dataset) -> torch.utils.data.Sampler:
    return torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=11)


DATA = IndexDataset(42)
OPTIONS = {
    "drop_last_false": dict(batch_size=4, drop_last=False),
    "workers_persistent_prefetch": dict(batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=3,
                                        multiprocessing_context="fork", timeout=60, collate_fn=noisy_collate),
    "user_sampler": dict(batch_size=4, sampler=_distributed(DATA), collate_fn=noisy_collate),
    "user_sampler_partial_last": dict(batch_size=4, sampler=_distributed(DATA), drop_last=False),
    "user_batch_sampler": dict(batch_sampler=EpochBatchSampler(42), num_workers=1, collate_fn=noisy_collate),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_dataloader_options_resume_exactly_mid_epoch(tmp_path, name):
    reference, resumed = interrupted(tmp_path, lambda s: s.loader(DATA, **OPTIONS[name]), max_steps=27, stop_at=13)
    assert_same_steps(resumed, reference)
    per_epoch = reference[0]["steps_per_epoch"]
    assert reference[per_epoch]["epoch"] == 1 and reference[per_epoch]["batch_in_epoch"] == 0
    if name.endswith("partial_last") or name == "drop_last_false":
        assert per_epoch == 11 and len(reference[10]["data"]) == 2, "the last, partial batch is a step"


def test_a_users_sampler_yields_the_indices_it_would_in_a_plain_dataloader(tmp_path):
    plain_sampler = _distributed(DATA)
    plain_sampler.set_epoch(1)
    plain = [int(i) for i in plain_sampler][:40]
    seen = run(tmp_path / "run", lambda s: s.loader(DATA, batch_size=4, sampler=_distributed(DATA)), max_steps=20)
    assert [int(i) for row in seen[10:20] for i in row["data"][:, 0]] == plain


def test_a_plain_dataloader_is_adopted_and_resumes_exactly(tmp_path):
    def plain(session):  # the script's own data code, untouched
        return torch.utils.data.DataLoader(DATA, batch_size=4, sampler=_distributed(DATA), collate_fn=noisy_collate,
                                           num_workers=1, drop_last=True)

    reference, resumed = interrupted(tmp_path, plain, max_steps=25, stop_at=13)
    assert_same_steps(resumed, reference)
    sampler = _distributed(DATA)
    sampler.set_epoch(0)
    assert [int(i) for row in reference[:10] for i in row["data"][:, 0]] == [int(i) for i in sampler][:40]


@pytest.mark.parametrize("option, error", [
    (dict(in_order=False), "in_order=False"), (dict(generator=torch.Generator()), "generator="),
    (dict(worker_count=2), "worker_count"), (dict(shuffle=True, sampler=_distributed(DATA)), "shuffle=True")])
def test_an_option_that_cannot_be_kept_is_refused_by_name(tmp_path, option, error):
    cfg = validate({"checkpoint": {"dir": str(tmp_path)}})
    with Session(cfg, env=SINGLE) as session:
        with pytest.raises((TypeError, ValueError), match=error):
            session.loader(DATA, batch_size=4, **option)


def _workers_changing(tmp_path: Path, seed_collate: bool) -> tuple[list, list]:
    """An uninterrupted run with 2 workers, and one stopped twice: 2 -> 0 -> 1 workers."""
    def loader(workers):
        return lambda s: s.loader(DATA, batch_size=4, num_workers=workers, collate_fn=noisy_collate,
                                  seed_collate=seed_collate)

    reference = run(tmp_path / "reference", loader(2), max_steps=24)
    legs: list[dict] = []
    for workers, stop_at in ((2, 7), (0, 15)):
        with pytest.raises(Preempted):
            run(tmp_path / "run", loader(workers), max_steps=24, stop_at=stop_at, seen=legs)
    run(tmp_path / "run", loader(1), max_steps=24, seen=legs)
    return reference, legs


def test_collate_randomness_is_exact_when_num_workers_changes_across_resumes(tmp_path):
    reference, legs = _workers_changing(tmp_path, seed_collate=True)
    assert [row["step"] for row in legs] == list(range(24)), "each leg resumes where the last stopped"
    assert_same_steps(legs[1:], reference)  # (all but the first step: the helper wants a resumed tail)


def test_without_collate_seeds_a_change_of_num_workers_changes_the_batches(tmp_path):
    """The control for the test above: unseeded collate draws follow the worker processes."""
    reference, legs = _workers_changing(tmp_path, seed_collate=False)
    assert [row["step"] for row in legs] == list(range(24))
    assert all(torch.equal(mine["data"], theirs["data"]) for mine, theirs in zip(legs[:7], reference[:7]))
    assert not all(torch.equal(mine["data"], theirs["data"]) for mine, theirs in zip(legs[7:], reference[7:]))


class ReshufflingSampler(torch.utils.data.Sampler):
    """A stateful sampler whose order is NOT a function of the epoch: every ``iter()`` draws a new
    permutation from its own generator, which carries on from epoch to epoch (as RandomSampler with a
    generator does). Its state follows torchdata's protocol (``load_state_dict`` then ``iter()``
    continues where ``state_dict()`` was taken), so only that state can resume it."""

    def __init__(self, size: int, stateful: bool = True):
        self.size, self.generator = size, torch.Generator().manual_seed(1234)
        self.epoch_start, self.yielded, self.resume_at = self.generator.get_state(), 0, 0
        if not stateful:  # the control: the same sampler without the state protocol
            self.state_dict = self.load_state_dict = None

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_start"])
        self.resume_at = state["yielded"]

    def __iter__(self):
        self.epoch_start = self.generator.get_state()
        order = torch.randperm(self.size, generator=self.generator).tolist()
        self.yielded, self.resume_at = self.resume_at, 0
        for index in order[self.yielded:]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.size


def _generator_sampled(stateful: bool, workers: int):
    return lambda s: s.loader(DATA, batch_size=4, sampler=ReshufflingSampler(len(DATA), stateful),
                              num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [25, 30], ids=["mid_epoch_2", "epoch_boundary"])
def test_a_stateful_sampler_resumes_from_its_own_state(tmp_path, stop_at, workers):
    # 42 samples in batches of 4: 10 steps per epoch, so step 25 is mid-epoch 2 and step 30 ends it.
    reference, resumed = interrupted(tmp_path, _generator_sampled(True, workers), max_steps=37, stop_at=stop_at)
    assert_same_steps(resumed, reference)
    epochs = [list(int(i) for row in reference[e * 10:(e + 1) * 10] for i in row["data"][:, 0]) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2], "each epoch draws another order from the sampler's own state"


def test_without_its_state_a_stateful_sampler_does_not_resume_exactly(tmp_path):
    """The control for the test above: set_epoch and a skip cannot rebuild such a sampler's order."""
    reference, resumed = interrupted(tmp_path, _generator_sampled(False, 0), max_steps=37, stop_at=25)
    offset = len(reference) - len(resumed)
    assert not all(torch.equal(mine["data"], theirs["data"]) for mine, theirs in zip(resumed, reference[offset:]))


class OpaqueStateSampler(ReshufflingSampler):
    def state_dict(self) -> dict:
        return {"generator": self.generator}  # not plain data: weights_only loading would refuse it


def test_a_sampler_state_that_cannot_be_loaded_safely_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="OpaqueStateSampler.state_dict.*Generator"):
        run(tmp_path / "run", lambda s: s.loader(DATA, batch_size=4, sampler=OpaqueStateSampler(len(DATA))),
            max_steps=3)


def _torchdata_sampled(workers: int):
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    return lambda s: s.loader(DATA, batch_size=4, num_workers=workers, collate_fn=noisy_collate,
                              sampler=StatefulDistributedSampler(DATA, num_replicas=1, rank=0, seed=3))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [25, 30], ids=["mid_epoch_2", "epoch_boundary"])
def test_torchdatas_stateful_distributed_sampler_resumes_from_its_own_state(tmp_path, stop_at, workers):
    reference, resumed = interrupted(tmp_path, _torchdata_sampled(workers), max_steps=37, stop_at=stop_at)
    assert_same_steps(resumed, reference)
    from harness.checkpoint.format import read_payload

    saved = read_payload(str(tmp_path / "run" / "step_000000037" / "state.safetensors"))["samplers"]
    assert saved == [{"epoch": 3, "batch": 7, "state": {"yielded": 28}}], \
        "the sampler's own state at the trained position, not where the workers had drawn to"


def test_a_stateful_sampler_resumed_with_another_batch_size_continues_its_epoch_by_samples(tmp_path):
    """Batch 4 stopped mid-epoch 2 (20 samples in), resumed with batch 2: the saved state describes
    another batch position, so the epoch starts afresh and skips 20 samples; the samples then follow
    the sampler's epoch-2 order without a gap or a repeat (loading the state and skipping too would
    skip 20 more)."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    def loader(batch_size):
        return lambda s: s.loader(DATA, batch_size=batch_size,
                                  sampler=StatefulDistributedSampler(DATA, num_replicas=1, rank=0, seed=3))

    first: list[dict] = []
    with pytest.raises(Preempted):
        run(tmp_path / "run", loader(4), max_steps=40, stop_at=25, seen=first)
    resumed = run(tmp_path / "run", loader(2), max_steps=60)
    order = StatefulDistributedSampler(DATA, num_replicas=1, rank=0, seed=3)
    order.set_epoch(2)
    expected = list(order)  # all 42: with batch 2 the epoch has no partial batch to drop
    seen = [int(i) for row in first[20:] for i in row["data"][:, 0]]
    seen += [int(i) for row in resumed if row["epoch"] == 2 for i in row["data"][:, 0]]
    assert seen == expected
