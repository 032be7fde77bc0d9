"""Faults injected into real runs: a killed launcher, a signal into a crowded start-up, two jobs on one
folder, a full disk under the metrics file, restarts of a run begun with resume=false."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


from conftest import (STEPS, assert_same_training, children, kill_tree, metrics, run_launch, signal_job,
                      skip_unless_required, start_launch, steps_with_saves, wait_for, worker_pids)
from harness.config import PREEMPTED_EXIT_CODE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def test_sigkill_of_the_launcher_stops_its_ranks_with_a_save_and_the_relaunch_resumes(tmp_path, reference):
    ckpt_dir = tmp_path / "ckpt"
    launcher = start_launch(ckpt_dir, log_path=tmp_path / "job.log")
    try:
        pids = worker_pids(launcher)
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 50, 90, "step 50")
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        # The ranks get SIGTERM from the kernel (PR_SET_PDEATHSIG): they agree, save once, exit.
        wait_for(lambda: not any(_alive(pid) for pid in pids.values()), 60, "the orphaned ranks to exit")
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    assert 50 <= stopped_at < STEPS, "the ranks should have saved the step they were at"
    result = run_launch(ckpt_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{stopped_at:09d}" in result.stdout
    assert_same_training(ckpt_dir, reference)


def test_a_second_job_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = start_launch(ckpt_dir, "trainer.max_steps=100000", log_path=tmp_path / "first.log")
    try:
        worker_pids(first)
        wait_for(lambda: (ckpt_dir / "metrics.jsonl").exists(), 90, "the first job to train")
        second = run_launch(ckpt_dir, "trainer.max_steps=100000", timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"{ckpt_dir} is in use by another job (host " in second.stderr
        assert f"pid {first.pid}" not in second.stderr  # the holder is rank 0, not the launcher
        assert first.poll() is None, "the first job must be untouched"
    finally:
        kill_tree(first)
    # SIGKILL released the lock with the process: a relaunch is not refused.
    third = run_launch(ckpt_dir, "trainer.max_steps=2", "checkpoint.resume=false", "checkpoint.set_aside=true")
    assert third.returncode == 0, third.stdout + third.stderr


def test_sigterm_during_the_start_up_of_8_ranks_stops_every_rank_without_a_hang(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    launcher = start_launch(ckpt_dir, "launcher.nproc_per_node=8", "trainer.num_threads=1",
                            log_path=tmp_path / "job.log")
    try:
        # As soon as the ranks exist, long before all of them have imported torch and installed
        # their handlers (~2-10 s on this machine with 8 ranks).
        wait_for(lambda: len(children(launcher.pid)) == 8, 60, "8 ranks")
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=240)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    output = (tmp_path / "job.log").read_text()
    assert code == PREEMPTED_EXIT_CODE, output
    assert "failed" not in output, output


def test_resume_false_applies_to_the_first_launch_only(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    assert run_launch(ckpt_dir, "trainer.max_steps=40").returncode == 0  # an older run in the folder
    launcher = start_launch(ckpt_dir, "checkpoint.resume=false", "checkpoint.set_aside=true",
                            "launcher.max_restarts=1", log_path=tmp_path / "job.log")
    try:
        pids = worker_pids(launcher)
        # The fresh run passes step 60 (beyond the old run's 40), then a rank is preempted.
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 60
                 and "starting fresh" in (tmp_path / "job.log").read_text(), 90, "step 60 of the fresh run")
        os.kill(pids[1], signal.SIGTERM)
        code = launcher.wait(timeout=180)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    output = (tmp_path / "job.log").read_text()
    assert code == 0, output
    assert output.count("starting fresh") == 1, output
    assert "restarting it (1/1 restarts)" in output and "resumed from" in output, output


def test_a_full_disk_under_the_metrics_file_does_not_stop_training(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        skip_unless_required(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        ckpt_dir = tmp_path / "ckpt"
        result = run_launch(ckpt_dir, f"trainer.metrics_file={disk}/metrics.jsonl", "trainer.max_steps=400",
                            "trainer.log_every=10")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "could not write the metrics file" in result.stderr
        assert steps_with_saves(ckpt_dir)[-1] == 400
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_stop_that_does_not_fit_the_grace_window_is_reported_with_async_writes(tmp_path):
    _, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[0], signal.SIGTERM),
                                 "checkpoint.async_save=true", "preempt.grace_s=0.001")
    assert code == PREEMPTED_EXIT_CODE, output
    assert "WARNING: the signal -> durable checkpoint (uploads included) took" in output, output


def test_a_periodic_save_that_does_not_fit_the_grace_window_is_reported(tmp_path):
    warning = "WARNING: the last checkpoint save took"
    tight = run_launch(tmp_path / "tight", "trainer.max_steps=40", "checkpoint.every_steps=20", "preempt.grace_s=1e-6")
    assert tight.returncode == 0, tight.stdout + tight.stderr
    assert tight.stdout.count(warning) == 2, tight.stdout  # the saves of steps 20 and 40
    roomy = run_launch(tmp_path / "roomy", "trainer.max_steps=40", "checkpoint.every_steps=20")  # grace_s=30
    assert roomy.returncode == 0, roomy.stdout + roomy.stderr
    assert warning not in roomy.stdout, roomy.stdout
