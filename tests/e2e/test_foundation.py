"""The launcher, configuration and environment: a user's first contact with the harness."""

from __future__ import annotations

import pytest

from conftest import STEPS, kill_tree, metrics, proc_env, run_launch, start_launch, steps_with_saves, worker_pids
from harness.config import ConfigError, validate
from harness.env import first_host, read_env, slurm_port


def test_example_trains_with_two_gloo_ranks_and_writes_checkpoints(reference):
    rows = metrics(reference)
    assert sorted(rows) == list(range(1, STEPS + 1))
    first, last = sum(rows[s]["loss"] for s in range(1, 11)), sum(rows[s]["loss"] for s in range(STEPS - 9, STEPS + 1))
    assert last < 0.5 * first, "loss did not go down"
    assert steps_with_saves(reference) == [40, 80, 120, 160]


def test_workers_carry_torchrun_variables(tmp_path):
    launcher = start_launch(tmp_path / "ckpt", "trainer.max_steps=100000")
    try:
        pids = worker_pids(launcher)
        for rank, pid in pids.items():
            env = proc_env(pid)
            assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
            assert env["WORLD_SIZE"] == "2"
            assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    finally:
        kill_tree(launcher)


def test_worker_crash_stops_the_job_and_names_the_rank(tmp_path):
    result = run_launch(tmp_path / "ckpt", "task.loss=tests.tasks.loss_that_fails_on_rank1")
    assert result.returncode == 1
    assert "rank 1" in result.stderr and "deliberate failure in rank 1" in result.stderr


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps"),
    ("checkpoint.best_mode=median", "checkpoint.best_mode"),
    ("preempt.signals=[SIGTERM,SIGNOPE]", "preempt.signals"),
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node"),
])
def test_invalid_config_fails_at_start_naming_the_key(tmp_path, override, key):
    result = run_launch(tmp_path / "ckpt", override, timeout=60)
    assert result.returncode != 0
    assert key in result.stderr
    assert "starting" not in result.stderr, "workers were launched despite the bad config"
    assert not (tmp_path / "ckpt").exists()


def test_wrong_type_is_rejected_by_the_schema(tmp_path):
    result = run_launch(tmp_path / "ckpt", "trainer.seed=abc", timeout=60)
    assert result.returncode != 0 and "seed" in result.stderr


def test_keep_best_needs_a_metric():
    data = {"name": "x", "launcher": {"backend": "local"}, "task": _example_task(),
            "checkpoint": {"keep_best": 2}}
    with pytest.raises(ConfigError, match="checkpoint.best_metric"):
        validate(data)


def test_checkpoint_dir_defaults_to_the_run_name_not_a_timestamp():
    cfg = validate({"name": "exp7", "launcher": {"backend": "local"}, "task": _example_task()})
    assert cfg.checkpoint.dir == "checkpoints/exp7"


def _example_task() -> dict:
    return {"model": {"_target_": "harness.example.MLP"},
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "data": {"_target_": "harness.example.SyntheticClassification"},
            "loss": "harness.example.classification_loss"}


def test_env_from_torchrun_slurm_and_single():
    env = read_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port, env.source) == (1, 4, 1, 1234, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_RESTART_COUNT": "2"}
    env = read_env(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.master_addr == "gpu07" and env.restart_count == 2
    assert env.master_port == read_env(slurm).master_port == slurm_port("4242_0")
    single = read_env({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")
    assert single.backend == "gloo" and str(single.device) == "cpu"


def test_env_errors_name_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        read_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="outside"):
        read_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("n[03-05,07]", "n03"),
                                              ("a[1],b[2-3]", "a1"), ("127.0.0.1", "127.0.0.1")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first
