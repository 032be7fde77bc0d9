"""How a restart reads its checkpoint: the newest checkpoint is read into the page cache while the
script builds its model (real files, a real single-rank Session; residency measured with
util-linux's ``fincore``), and which files each rank of a larger job reads ahead."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from harness import Session, validate
from harness.checkpoint import manifest as manifests
from harness.checkpoint.layout import PAYLOAD_NAME
from harness.checkpoint.manager import CheckpointManager
from harness.checkpoint.payload import Progress, StateRegistry
from harness.env import DistEnv

WIDTH = 1024  # a 4 MB weight, 12 MB with AdamW's moments: a payload whose pages are easy to count


def _env(rank: int, local_rank: int, world_size: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=2,
                   master_addr="127.0.0.1", master_port=0, source="test")


def _cfg(ckpt_dir: Path, max_steps: int):
    return validate({"trainer": {"max_steps": max_steps, "seed": 1, "num_threads": 1},
                     "checkpoint": {"dir": str(ckpt_dir), "every_steps": 2}})


def _train(ckpt_dir: Path, max_steps: int, before_model=None) -> Session:
    with Session(_cfg(ckpt_dir, max_steps), env=_env(0, 0, 1)) as session:
        if before_model is not None:
            before_model(session)
        model = session.prepare(torch.nn.Linear(WIDTH, WIDTH))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        session.register(optimizer=optimizer)
        data = torch.utils.data.TensorDataset(torch.randn(16, WIDTH))
        for (batch,) in session.batches(session.loader(data, batch_size=4)):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return session


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux's fincore")
def test_a_restart_reads_its_checkpoint_into_memory_while_the_script_builds_its_model(tmp_path):
    _train(tmp_path, max_steps=2)
    payload = tmp_path / "step_000000002" / PAYLOAD_NAME
    fd = os.open(payload, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as after a reboot, or on another node
    os.close(fd)
    if _resident_bytes(payload) != 0:
        pytest.skip(f"{tmp_path}'s file system keeps the file in memory (tmpfs?)")
    seen = {}

    def before_model(session: Session) -> None:
        session.checkpoints.reading_ahead.thread.join(timeout=30)
        seen["resident"] = _resident_bytes(payload)

    session = _train(tmp_path, max_steps=4, before_model=before_model)
    pages = -(-payload.stat().st_size // os.sysconf("SC_PAGE_SIZE"))
    assert seen["resident"] == pages * os.sysconf("SC_PAGE_SIZE")  # all of it, before the resume asked for it
    assert session.resumed_from.step == 2 and session.step == 4


def test_each_rank_reads_ahead_the_files_it_verifies_and_a_node_s_first_rank_the_payload(tmp_path):
    folder = tmp_path / "step_000000008"
    shards = {f"shards/__{rank}_0.distcp": b"x" for rank in range(4)}
    files = {PAYLOAD_NAME: b"p", "shards/.metadata": b"m", **shards}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    entries = {rel: {"bytes": 1, "checksum": "xxh3_128:00"} for rel in files}
    (folder / "manifest.json").write_bytes(manifests.encode(manifests.build(8, entries, 0.1, {})))

    def read_by(rank: int, local_rank: int) -> set[str]:
        manager = CheckpointManager(_cfg(tmp_path, 10), _env(rank, local_rank, 4), StateRegistry(), Progress(),
                                    {}, print)
        return {os.path.relpath(path, folder) for path in manager.files_to_read_ahead()}

    assert read_by(0, 0) == {PAYLOAD_NAME, "shards/.metadata", "shards/__0_0.distcp"}
    assert read_by(1, 1) == {"shards/__1_0.distcp"}
    assert read_by(2, 0) == {PAYLOAD_NAME, "shards/__2_0.distcp"}  # the second node's first rank
    assert read_by(3, 1) == {"shards/__3_0.distcp"}


def test_the_read_ahead_ends_when_the_resume_starts(tmp_path):
    """The read-ahead thread is gone once the resume has chosen its checkpoint, before DataLoader
    forks any worker (a fork while another thread runs can leave the child holding its locks)."""
    _train(tmp_path, max_steps=2)
    seen = {}

    def before_model(session: Session) -> None:
        seen["reading"] = session.checkpoints.reading_ahead

    session = _train(tmp_path, max_steps=4, before_model=before_model)
    assert seen["reading"] is not None and seen["reading"].stopped.is_set()
    assert not seen["reading"].thread.is_alive()
    assert session.resumed_from.step == 2


def _rchar() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def test_a_stopped_read_ahead_reads_one_chunk_more_at_most(tmp_path):
    from harness.checkpoint import prefetch

    big = tmp_path / "big"
    big.write_bytes(b"\0" * (64 << 20))
    chunk = bytearray(1 << 20)
    stopped = threading.Event()
    before = _rchar()
    prefetch.read_file(str(big), chunk)
    whole = _rchar() - before
    stopped.set()
    before = _rchar()
    prefetch.read_file(str(big), chunk, stopped)
    assert whole >= 64 << 20 and _rchar() - before <= 2 * len(chunk)
