"""What a run does with its folder: a fresh start never touches another run's checkpoints, and a
resumed run holds no deleted checkpoint open (its pruned files free their disk space)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import (assert_same_training, kill_tree, metrics, run_launch, start_launch, steps_with_saves,
                      wait_for, worker_pids)


def test_resume_false_refuses_a_folder_holding_another_runs_checkpoints(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    assert run_launch(ckpt_dir, "trainer.max_steps=80", "trainer.seed=5").returncode == 0
    def files():  # the lock file is rewritten by every job that takes the folder
        return {path: path.stat().st_mtime_ns for path in ckpt_dir.rglob("*") if path.name != ".harness.lock"}
    before = files()
    result = run_launch(ckpt_dir, "checkpoint.resume=false")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "holds 2 checkpoint folder(s), newest complete step 80 of an earlier run" in result.stderr
    assert "checkpoint.set_aside=true" in result.stderr
    assert "step 1/" not in result.stdout + result.stderr, "no step may run"
    assert files() == before, "nothing touched"


def test_a_fresh_run_that_sets_another_run_aside_restarts_from_its_own_checkpoints(tmp_path, reference):
    """The reliability issue's case: run A leaves later steps in the folder; run B starts fresh there,
    is preempted at once and restarted: it must resume B's checkpoint, not A's newer one."""
    ckpt_dir = tmp_path / "ckpt"
    assert run_launch(ckpt_dir, "trainer.max_steps=200", "trainer.seed=5").returncode == 0  # run A
    log = tmp_path / "job.log"
    launcher = start_launch(ckpt_dir, "checkpoint.resume=false", "checkpoint.set_aside=true",
                            "launcher.max_restarts=1", "preempt.check_every=1", log_path=log)
    try:
        pids = worker_pids(launcher)
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 2, 90, "run B's first steps")
        os.kill(pids[1], signal.SIGTERM)
        code = launcher.wait(timeout=180)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    output = log.read_text()
    assert code == 0, output
    aside = list((ckpt_dir / "set_aside").iterdir())
    assert len(aside) == 1 and steps_with_saves(aside[0])[-1] == 200, "run A's checkpoints kept, moved"
    assert (aside[0] / "metrics.jsonl").exists()
    stopped = int(output.split("stop requested")[1].split("at step ")[1].split(":")[0])
    assert stopped < 160 and f"step_{stopped:09d} at step {stopped} " in output, output
    assert "step_000000200" not in output.split("set aside")[1], output
    assert_same_training(ckpt_dir, reference)  # B, interrupted, equals an uninterrupted fresh run


@pytest.fixture
def small_disk(tmp_path):
    """A real 30 MB filesystem (tmpfs; needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_resumed_run_frees_the_space_of_the_checkpoint_it_resumed_from(small_disk):
    # hidden=1024: ~1.09M parameters + AdamW's two moments = 13 MB per checkpoint; two fit on 30 MB,
    # three do not. A run that kept its resumed checkpoint mapped holds it after pruning it.
    ckpt_dir = small_disk / "ckpt"
    common = ["task.model.hidden=1024", "checkpoint.every_steps=10", "checkpoint.keep_last=1",
              "launcher.nproc_per_node=1"]
    first = run_launch(ckpt_dir, *common, "trainer.max_steps=10")
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = run_launch(ckpt_dir, *common, "trainer.max_steps=50")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert steps_with_saves(ckpt_dir) == [50]
