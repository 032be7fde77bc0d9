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
        stop_at: Optional[int] = None, accumulate: int = 1) -> list[dict]:
    """Train a tiny model; return per step what the loop saw. ``stop_at``: request a stop in that
    step (the run then raises Preempted after saving it)."""
    cfg = validate({"trainer": {"max_steps": max_steps, "seed": 5, "num_threads": 1},
                    "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1000}})
    seen: list[dict] = []
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
                model(part).pow(2).mean().backward()
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
