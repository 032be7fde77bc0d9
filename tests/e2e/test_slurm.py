"""SLURM through submitit on the real one-node cluster started by slurm/local-cluster.sh.

Each path (time-limit warning signal, scontrol requeue, partition preemption) must end with the job
requeued by SLURM's own accounting and bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import (REPO, assert_resumed_where_the_first_launch_stopped, assert_tensors_equal, logged, metrics,
                      newest_payload, require_cluster, run_launch, slurm_nodes, uninterrupted_run, wait_for)
from harness.launch.slurm import is_time_out, job_info

# Queue waits, requeues and a reference run add up past the suite's 600 s default timeout.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]

# Slower steps than the shared configuration, so signals land while the job trains.
SLURM_OVERRIDES = ("task.model.hidden=768", "trainer.max_steps=200", "checkpoint.every_steps=100")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # The one-node cluster: with the two-node one (test_multinode.py) these requests do not fit.
    require_cluster(len(set(slurm_nodes())) == 1,
                    "the one-node SLURM cluster is not running (bash slurm/local-cluster.sh start)",
                    "HARNESS_REQUIRE_SLURM")


@pytest.fixture(scope="module")
def slurm_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, "slurm-reference", *SLURM_OVERRIDES)


def _submit(ckpt_dir: Path, *overrides: str) -> str:
    result = run_launch(ckpt_dir, "launcher=slurm", "launcher.nproc_per_node=2", "launcher.timeout_min=60",
                        "launcher.partition=debug", *SLURM_OVERRIDES, *overrides, timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+", job_id), result.stdout
    assert f"submitted job {job_id}" in result.stderr
    return job_id


def _wait_state(job_id: str, states: set[str], timeout: float = 240) -> dict:
    return wait_for(lambda: (lambda info: info if info.get("JobState") in states else None)(job_info(job_id)),
                    timeout=timeout, what=f"job {job_id} in {states}")


def _sbatch_template(ckpt_dir: Path) -> str:
    """Submit slurm/sbatch-template.sh (plain sbatch + srun, no submitit)."""
    (ckpt_dir / "slurm").mkdir(parents=True)
    from conftest import BASE_OVERRIDES

    overrides = [o for o in BASE_OVERRIDES if not o.startswith("launcher.")]
    result = subprocess.run(
        ["sbatch", "--parsable", "-p", "debug", "-o", str(ckpt_dir / "slurm" / "%j_0_log.out"),
         "slurm/sbatch-template.sh", "name=template", f"checkpoint.dir={ckpt_dir}", *overrides,
         *SLURM_OVERRIDES], cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.strip().split(";")[0]


def _run_path(tmp_path: Path, slurm_reference: Path, interrupt, submit=_submit) -> dict:
    ckpt_dir = tmp_path / "ckpt"
    job_id = submit(ckpt_dir)
    try:
        _wait_state(job_id, {"RUNNING"})
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 10, timeout=120, what="training progress")
        interrupt(job_id)
        info = _wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    logs = "".join(p.read_text() for p in (ckpt_dir / "slurm").glob(f"{job_id}_*_log.*"))
    assert info["JobState"] == "COMPLETED", logs
    assert int(info["Restarts"]) >= 1, f"the job was not requeued: {info}"
    assert "SLURM_RESTART_COUNT=1" in logs
    # Tied to the step the first run stopped (and saved) at, read from the metrics file.
    assert_resumed_where_the_first_launch_stopped(ckpt_dir, logs)
    payload = newest_payload(ckpt_dir)
    assert payload["progress"]["step"] == 200
    assert_tensors_equal(payload["state"], newest_payload(slurm_reference)["state"])
    assert logged(ckpt_dir) == logged(slurm_reference) and sorted(logged(slurm_reference)) == list(range(1, 201))
    return info


def test_time_limit_warning_signal_requeues_and_resumes_exactly(tmp_path, slurm_reference):
    _run_path(tmp_path, slurm_reference,
              lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))


def test_scontrol_requeue_sigterm_saves_and_resumes_exactly(tmp_path, slurm_reference):
    _run_path(tmp_path, slurm_reference, lambda job: subprocess.run(["scontrol", "requeue", job], check=True))


def test_preemption_by_a_higher_priority_job_requeues_and_resumes_exactly(tmp_path, slurm_reference):
    def preempt(job_id):
        subprocess.run(["sbatch", "-p", "urgent", "-n", "2", "-J", "urgent", "-o", "/dev/null",
                        "--wrap", "sleep 3"], check=True, capture_output=True)
    _run_path(tmp_path, slurm_reference, preempt)


def test_sbatch_template_with_srun_requeues_and_resumes_exactly(tmp_path, slurm_reference):
    _run_path(tmp_path, slurm_reference, lambda job: subprocess.run(["scontrol", "requeue", job], check=True),
              submit=_sbatch_template)


def test_unknown_partition_is_a_clear_error_at_submission(tmp_path):
    result = run_launch(tmp_path / "ckpt", "launcher=slurm", "launcher.partition=nope", timeout=60)
    assert result.returncode == 2
    assert "SLURM rejected the job" in result.stderr and "partition" in result.stderr.lower()


def test_too_many_cpus_is_a_clear_error_at_submission(tmp_path):
    result = run_launch(tmp_path / "ckpt", "launcher=slurm", "launcher.cpus_per_task=64", timeout=60)
    assert result.returncode == 2
    assert "SLURM rejected the job" in result.stderr


def test_time_out_is_told_apart_from_preemption():
    assert is_time_out(elapsed_s=3400, timeout_min=60, signal_delay_s=120)
    assert not is_time_out(elapsed_s=600, timeout_min=60, signal_delay_s=120)


def test_follow_waits_for_the_job_and_reports_its_end(tmp_path):
    result = run_launch(tmp_path / "ckpt", "launcher=slurm", "launcher.nproc_per_node=2", "launcher.timeout_min=60",
                        "launcher.follow=true", "trainer.max_steps=5", timeout=240)
    assert result.returncode == 0, result.stderr
    assert "COMPLETED" in result.stderr
    assert newest_payload(tmp_path / "ckpt")["progress"]["step"] == 5


def test_requeue_id_of_array_jobs_and_missing_scontrol(monkeypatch):
    from harness.launch.slurm import SlurmError, scontrol
    from harness.env import read_env

    task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "57"}
    assert read_env(task | {"SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "7"}).slurm_job == "50_7"
    assert read_env(task).slurm_job == "57"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SlurmError, match="scontrol is not on PATH"):
        scontrol("requeue", "57")
