"""TensorBoard and W&B across real interruptions: one run each, every step once, the values of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import numpy as np

from conftest import (STEPS, kill_tree, metrics, run_launch, signal_job, start_launch, steps_with_saves,
                      tensorboard_points, wait_for, worker_pids)
from harness.config import PREEMPTED_EXIT_CODE


def _metrics_file_steps(ckpt_dir: Path) -> list[int]:
    """The step of every row of metrics.jsonl, in file order (repeats included)."""
    return [json.loads(line)["step"] for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_last_step(folder: Path) -> int:
    """The last step TensorBoard finds in ``folder`` (every point, purged or not); 0 before any."""
    try:
        return max((step for step, _ in tensorboard_points(folder, purge=False)), default=0)
    except KeyError:  # no "loss" point written yet
        return 0


def test_metrics_file_and_tensorboard_after_a_kill_between_checkpoints_hold_each_step_once(
        tmp_path, reference):
    ckpt_dir = tmp_path / "ckpt"
    # TensorBoard's reader takes seconds to import on its first use: import it before the run starts,
    # or the run (~1 s from step 60 to its end) can finish before the wait below sees step 60.
    assert _tensorboard_last_step(tmp_path) == 0
    launcher = start_launch(ckpt_dir, "log.tensorboard=true", log_path=tmp_path / "job.log")
    try:
        pids = worker_pids(launcher)
        # Step 60 written (log_every=20) to both files: past the checkpoint at 40, before the one at 80.
        # The reporter writes the metrics file, then TensorBoard: wait for the second too.
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 60
                 and _tensorboard_last_step(ckpt_dir / "tensorboard") >= 60, 90, "step 60")
        for pid in pids.values():  # frozen at once: a quiet machine trains 20 steps in ~0.2 s
            os.kill(pid, signal.SIGSTOP)
    finally:
        kill_tree(launcher)  # SIGKILL to everything: no save, no close
    killed_at, resumed_at = max(metrics(ckpt_dir)), steps_with_saves(ckpt_dir)[-1]
    assert resumed_at < killed_at, "the run must have logged steps past its newest checkpoint"
    # Negative control: the killed launch's file holds steps that the next launch trains again.
    assert _metrics_file_steps(ckpt_dir) == list(range(1, killed_at + 1))
    result = run_launch(ckpt_dir, "log.tensorboard=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{resumed_at:09d}" in result.stdout

    # The metrics file was purged past the resumed step when the second launch opened it.
    assert _metrics_file_steps(ckpt_dir) == list(range(1, STEPS + 1))
    assert metrics(ckpt_dir) == metrics(reference)

    folder = ckpt_dir / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2, "one run folder for both launches"
    uninterrupted = metrics(reference)
    for tag in ("loss", "lr"):
        points = tensorboard_points(folder, tag)
        assert [step for step, _ in points] == list(range(1, STEPS + 1)), tag
        # TensorBoard stores scalars as float32.
        assert dict(points) == {step: float(np.float32(row[tag])) for step, row in uninterrupted.items()}, tag
    # Negative control: the files do hold the steps the killed launch logged after its checkpoint
    # twice; TensorBoard's purge (purge_step = resumed step + 1) is what shows them once.
    raw = [step for step, _ in tensorboard_points(folder, purge=False)]
    repeated = {step for step in raw if raw.count(step) > 1}
    assert repeated and repeated <= set(range(resumed_at + 1, killed_at + 1)), sorted(repeated)


def _wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file (its LevelDB-style log: a 7-byte header, 32 KiB blocks of
    checksum-length-type chunks), read here because wandb ships no reader of its own."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            yield pending


def _wandb_history(run_file: Path) -> dict[int, float]:
    """{step: loss} logged in one offline run file; asserts no step is there twice."""
    from wandb.proto import wandb_internal_pb2

    steps: dict[int, float] = {}
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            assert record.history.step.num not in steps, f"step {record.history.step.num} twice in {run_file}"
            steps[record.history.step.num] = items["loss"]
    return steps


def test_wandb_offline_keeps_one_run_id_across_a_preemption_and_its_resume(tmp_path):
    overrides = ("log.wandb=true", "log.wandb_mode=offline", "trainer.max_steps=80")
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[1], signal.SIGTERM),
                                        *overrides)
    assert code == PREEMPTED_EXIT_CODE, output  # W&B left the stop handlers alone
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    run_id = (ckpt_dir / "wandb_run_id").read_text().strip()
    result = run_launch(ckpt_dir, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{stopped_at:09d}" in result.stdout
    assert (ckpt_dir / "wandb_run_id").read_text().strip() == run_id

    # One offline run folder per launch, both of the same run; sorted by their start time.
    runs = sorted((ckpt_dir / "wandb").glob("offline-run-*"))
    assert [run.name.rsplit("-", 1)[1] for run in runs] == [run_id, run_id], runs
    first, second = (_wandb_history(run / f"run-{run_id}.wandb") for run in runs)
    assert sorted(first) == list(range(1, stopped_at + 1))
    assert sorted(second) == list(range(stopped_at + 1, 81))
    assert {**first, **second} == {step: row["loss"] for step, row in metrics(ckpt_dir).items()}
