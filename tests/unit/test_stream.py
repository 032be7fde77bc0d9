"""Iterable (streaming) datasets through session.loader: resumed at their exact position, with or
without DataLoader workers; one without a position is refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset, get_worker_info

from harness import Preempted, Session, validate
from harness.env import DistEnv

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                 master_port=0, source="single")


class NumberStream(IterableDataset):
    """0, 1, 2, ... up to ``length`` with a little random noise per item, like an augmentation; its
    position is saved. With workers, worker w yields the items i with i % workers == w
    (StatefulDataLoader saves each worker's position).

    ``noise="global"`` draws from torch's global RNG: exact without workers (the main process's RNG
    is restored on resume). In workers a stream's randomness must come from its own state, e.g. a
    generator seeded from the item's position (``noise="per_item"``): workers' global RNGs restart
    from a new base seed after a resume.
    """

    def __init__(self, length: int = 200, noise: str = "global"):
        self.length = length
        self.noise = noise
        self.position = 0  # next item index (per worker, for a worker's copy)

    def _noise(self, index: int) -> float:
        if self.noise == "global":
            return torch.rand(()).item()
        return torch.rand((), generator=torch.Generator().manual_seed(index)).item()

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        while self.position < self.length:
            index = self.position
            self.position += 1
            if index % workers == worker:
                yield torch.tensor([float(index), self._noise(index)])
        self.position = 0  # the next epoch starts again from the beginning

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class PositionlessStream(IterableDataset):
    def __iter__(self):
        yield from (torch.tensor([float(i)]) for i in range(10))


class ForgetfulStream(NumberStream):
    """The negative control: a stream that ignores the position it is given back."""

    def load_state_dict(self, state: dict) -> None:
        pass


def _train(ckpt_dir: Path, num_workers: int, stop_at: int = 0, stream_type: type = NumberStream) -> list[torch.Tensor]:
    """Steps of 4 items over 30 steps (200 items: the stream ends and restarts at step 50); returns
    the batches seen. ``stop_at``: request a stop in that step (the run then raises Preempted)."""
    cfg = validate({"trainer": {"max_steps": 60, "seed": 3, "num_threads": 1},
                    "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1000}})
    seen = []
    with Session(cfg, env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session.register(optimizer=optimizer)
        stream = stream_type(noise="global" if num_workers == 0 else "per_item")
        loader = session.loader(stream, batch_size=4, num_workers=num_workers)
        for batch in session.batches(loader):
            seen.append(batch.clone())
            model(batch).pow(2).mean().backward()
            optimizer.step()
            if session.step + 1 == stop_at:
                session.request_stop()
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_resumes_at_its_exact_position(tmp_path, num_workers):
    reference = _train(tmp_path / "reference", num_workers)
    assert len(reference) == 60
    assert torch.equal(reference[50][:, 0], reference[0][:, 0]), "the stream restarts after 200 items"
    with pytest.raises(Preempted) as stop:
        _train(tmp_path / "run", num_workers, stop_at=23)
    assert stop.value.step >= 23
    resumed = _train(tmp_path / "run", num_workers)
    assert len(resumed) == 60 - stop.value.step
    for mine, theirs in zip(resumed, reference[stop.value.step:], strict=True):
        assert torch.equal(mine, theirs)


def test_a_stream_without_a_position_is_refused_at_start(tmp_path):
    cfg = validate({"checkpoint": {"dir": str(tmp_path)}})
    with Session(cfg, env=SINGLE) as session:
        with pytest.raises(TypeError, match="without state_dict\\(\\)/load_state_dict\\(\\): a resume would restart"):
            session.loader(PositionlessStream(), batch_size=2)


def test_a_stream_that_does_not_restore_its_position_is_seen_to_differ(tmp_path):
    """The comparison above can fail: the same interrupted run with a stream that forgets its
    position replays the stream's start, and its batches differ from the reference's."""
    reference = _train(tmp_path / "reference", 0)
    with pytest.raises(Preempted) as stop:
        _train(tmp_path / "run", 0, stop_at=23, stream_type=ForgetfulStream)
    resumed = _train(tmp_path / "run", 0, stream_type=ForgetfulStream)
    assert not torch.equal(resumed[0][:, 0], reference[stop.value.step][:, 0])
    assert torch.equal(resumed[0][:, 0], reference[0][:, 0]), "it starts the stream over"
