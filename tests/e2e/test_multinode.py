"""Two SLURM nodes (network namespaces n1, n2 from ``slurm/local-cluster.sh start --nodes 2``).

One rank per node, so every collective crosses the bridge. Each way of stopping the job (the warning
signal, ``scontrol requeue``, preemption, the loss of a node) must requeue the whole allocation and
end bit-identical to an uninterrupted local run of the same world size (2).

Skipped unless the two-node cluster is up; ``HARNESS_REQUIRE_MULTINODE=1`` (CI's second pytest run)
makes that a failure. It is a separate variable from HARNESS_REQUIRE_SLURM because the one-node
tests (test_slurm.py) and these need different clusters, and only one runs at a time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (BASE_OVERRIDES, REPO, assert_resumed_where_the_first_launch_stopped, assert_tensors_equal,
                      metrics, newest_payload, require_cluster, resumed_steps, run_launch, slurm_nodes,
                      steps_with_saves, uninterrupted_run, wait_for)
from harness.env import free_port
from harness.launch.slurm import job_info

# Queue waits, requeues and a reference run add up past the suite's 600 s default timeout.
pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.timeout(1800)]

MAX_STEPS = 300
# Slow enough steps that a signal lands while the job trains, a checkpoint every 50 steps.
OVERRIDES = ("task.model.hidden=768", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_steps=50")
NODES = ("n1", "n2")
CLUSTER = ["bash", str(REPO / "slurm" / "local-cluster.sh")]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    listed = slurm_nodes()
    require_cluster(all(node in listed for node in NODES),
                    "the two-node SLURM cluster is not running (bash slurm/local-cluster.sh start --nodes 2)",
                    "HARNESS_REQUIRE_MULTINODE")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Uninterrupted, on this machine, 2 local ranks: the same world size as 2 nodes x 1 rank."""
    return uninterrupted_run(tmp_path_factory, "multinode-reference", *OVERRIDES)


def _submit(ckpt_dir: Path) -> str:
    result = run_launch(ckpt_dir, "launcher=slurm", "launcher.nodes=2", "launcher.nproc_per_node=1",
                        "launcher.timeout_min=60", "launcher.partition=debug", *OVERRIDES, timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+", job_id), result.stdout
    return job_id


def _sbatch_template(ckpt_dir: Path) -> str:
    """slurm/sbatch-template.sh (srun, launcher=direct) with one task on each of two nodes."""
    (ckpt_dir / "slurm").mkdir(parents=True)
    overrides = [o for o in BASE_OVERRIDES if not o.startswith("launcher.")]
    result = subprocess.run(
        ["sbatch", "--parsable", "-p", "debug", "--nodes=2", "--ntasks-per-node=1",
         "-o", str(ckpt_dir / "slurm" / "%j_0_log.out"), "slurm/sbatch-template.sh", "name=template",
         f"checkpoint.dir={ckpt_dir}", *overrides, *OVERRIDES],
        cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.strip().split(";")[0]


def _wait_state(job_id: str, states: set[str], timeout: float = 240) -> dict:
    return wait_for(lambda: (lambda info: info if info.get("JobState") in states else None)(job_info(job_id)),
                    timeout=timeout, what=f"job {job_id} in {states}")


def _logs(ckpt_dir: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted((ckpt_dir / "slurm").glob(f"{job_id}_*_log.*")))


def _assert_resumed_exactly(ckpt_dir: Path, job_id: str, reference: Path, newest_before: int | None = None) -> str:
    """The job completed after a requeue, bit-identical to ``reference``, having resumed where its first
    run stopped; or, for a run that was killed (``newest_before``: its newest checkpoint), from that."""
    info = _wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300)
    logs = _logs(ckpt_dir, job_id)
    assert info["JobState"] == "COMPLETED", logs
    assert int(info["Restarts"]) >= 1, f"the job was not requeued: {info}"
    # Both ranks ran on their own node, before and after the requeue.
    for rank, node in enumerate(NODES):
        assert f"rank {rank}/2 on {node}, job {job_id}, SLURM_RESTART_COUNT=1" in logs, logs
    if newest_before is None:
        assert_resumed_where_the_first_launch_stopped(ckpt_dir, logs)
    else:
        assert resumed_steps(logs, ckpt_dir)[:1] == [newest_before], logs
    payload, expected = newest_payload(ckpt_dir), newest_payload(reference)
    assert payload["progress"]["step"] == MAX_STEPS
    assert_tensors_equal(payload["state"], expected["state"], "state")
    ref_losses = {step: row["loss"] for step, row in metrics(reference).items()}
    assert {step: row["loss"] for step, row in metrics(ckpt_dir).items()} == ref_losses
    return logs


def _interrupt_and_check(tmp_path: Path, reference: Path, interrupt, submit=_submit) -> None:
    ckpt_dir = tmp_path / "ckpt"
    job_id = submit(ckpt_dir)
    try:
        _wait_state(job_id, {"RUNNING"})
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 10, timeout=120, what="training progress")
        interrupt(job_id)
        _assert_resumed_exactly(ckpt_dir, job_id, reference)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_warning_signal_on_both_nodes_requeues_the_allocation_and_resumes_exactly(tmp_path, reference):
    _interrupt_and_check(tmp_path, reference,
                         lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))


def test_scontrol_requeue_of_a_two_node_job_resumes_exactly(tmp_path, reference):
    _interrupt_and_check(tmp_path, reference,
                         lambda job: subprocess.run(["scontrol", "requeue", job], check=True))


def test_preemption_of_both_nodes_by_an_urgent_job_resumes_exactly(tmp_path, reference):
    def preempt(job_id):
        subprocess.run(["sbatch", "-p", "urgent", "-N", "2", "-n", "2", "-J", "urgent", "-o", "/dev/null",
                        "--wrap", "sleep 3"], check=True, capture_output=True)
    _interrupt_and_check(tmp_path, reference, preempt)


def test_sbatch_template_with_srun_on_two_nodes_resumes_exactly(tmp_path, reference):
    _interrupt_and_check(tmp_path, reference,
                         lambda job: subprocess.run(["scontrol", "requeue", job], check=True),
                         submit=_sbatch_template)


def _node_pids(node: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True)
    return [int(pid) for pid in result.stdout.split()]


def test_a_lost_node_fails_naming_it_and_the_requeued_job_resumes_exactly(tmp_path, reference):
    """SIGKILL every process in n2 (slurmd, slurmstepd, the rank): rank 0's log names rank 1 on n2;
    SLURM marks n2 down and requeues the job, which resumes from the last committed checkpoint
    once n2 is back (local-cluster.sh start repairs the missing slurmd)."""
    ckpt_dir = tmp_path / "ckpt"
    job_id = _submit(ckpt_dir)
    try:
        _wait_state(job_id, {"RUNNING"})
        wait_for(lambda: steps_with_saves(ckpt_dir), timeout=120, what="a committed checkpoint")
        assert max(metrics(ckpt_dir)) < MAX_STEPS, "the job finished before the node could be lost"
        pids = _node_pids("n2")
        assert pids, "no process in node n2"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "lost contact with rank 1 on node n2" in _logs(ckpt_dir, job_id), timeout=60,
                 what="rank 0 naming the lost node")
        # SLURM notices the silent node after SlurmdTimeout (30 s) and requeues the job.
        _wait_state(job_id, {"PENDING"}, timeout=120)
        newest = steps_with_saves(ckpt_dir)[-1]  # the requeued job cannot start before n2 is back
        subprocess.run([*CLUSTER, "start", "--nodes", "2"], check=True, capture_output=True, timeout=120)
        logs = _assert_resumed_exactly(ckpt_dir, job_id, reference, newest_before=newest)
        assert "Node failure on n2" in logs
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def _torchrun_agent(node: str, ckpt_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """torchrun's agent on ``node`` (its namespaces via local-cluster.sh exec; the pid is the agent's:
    every step of the chain execs). One rank per node, rendezvous at n1."""
    overrides = [o for o in BASE_OVERRIDES if not o.startswith("launcher.")]
    command = [*CLUSTER, "exec", node, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"10.77.0.11:{port}",
               "--rdzv-id", "multinode", "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1,SIGUSR2",
               "-m", "harness.launch", "launcher=direct", "name=test", f"checkpoint.dir={ckpt_dir}",
               *overrides, *OVERRIDES]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_torchrun_across_two_nodes_stops_on_a_signal_to_one_agent_and_resumes_exactly(tmp_path, reference):
    """SIGTERM to n2's agent: it forwards it to its rank, the ranks agree, rank 0 saves, both ranks
    exit 75 and both agents exit 1 (torchrun reports 75 as a ChildFailedError). Relaunching both
    agents resumes and ends bit-identical."""
    ckpt_dir = tmp_path / "ckpt"
    logs = {node: tmp_path / f"{node}.log" for node in NODES}
    port = free_port()
    agents = {node: _torchrun_agent(node, ckpt_dir, port, logs[node]) for node in NODES}
    try:
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= 10, timeout=120, what="training progress")
        agents["n2"].send_signal(signal.SIGTERM)
        codes = {node: agent.wait(timeout=90) for node, agent in agents.items()}
    finally:
        for agent in agents.values():
            if agent.poll() is None:
                agent.kill()
    text = {node: log.read_text() for node, log in logs.items()}
    assert codes == {"n1": 1, "n2": 1}, text
    assert "exitcode  : 75" in text["n1"], text["n1"]
    stopped = re.search(r"\[rank 1\] stopped at step (\d+) \(SIGTERM\)", text["n2"])
    assert stopped and f"[rank 0] stopped at step {stopped.group(1)}" in text["n1"], text
    assert steps_with_saves(ckpt_dir)[-1] == int(stopped.group(1))

    agents = {node: _torchrun_agent(node, ckpt_dir, port, tmp_path / f"{node}-resumed.log") for node in NODES}
    codes = {node: agent.wait(timeout=180) for node, agent in agents.items()}
    resumed = (tmp_path / "n1-resumed.log").read_text()
    assert codes == {"n1": 0, "n2": 0}, resumed
    assert f"resumed from {ckpt_dir}/step_{int(stopped.group(1)):09d}" in resumed
    payload, expected = newest_payload(ckpt_dir), newest_payload(reference)
    assert payload["progress"]["step"] == MAX_STEPS
    assert_tensors_equal(payload["state"], expected["state"], "state")
