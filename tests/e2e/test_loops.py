"""Real training loops: the config loop's accumulation, precision, clipping, evaluation and EMA, and a
user's own script under the launcher — each interrupted and resumed bit for bit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import (REPO, STEPS, assert_resumed_from, assert_same_training, assert_tensors_equal, kill_tree, metrics,
                      newest_payload, read_step, run_launch, start_launch, steps_with_saves, wait_for, worker_pids)
from harness.config import PREEMPTED_EXIT_CODE

EVAL_DATA = "task.eval_data={_target_:harness.example.SyntheticClassification,num_samples:96,seed:5}"
REAL_LOOP = ["trainer.accumulate=2", "trainer.clip_grad_norm=0.5", "trainer.ema_decay=0.9",
             "trainer.eval_every=10", EVAL_DATA, "checkpoint.best_metric=val_loss", "checkpoint.keep_best=1",
             "checkpoint.every_steps=25"]
SCRIPT = REPO / "tests" / "scripts" / "user_loop.py"
SCRIPT_STEPS = 20


def _sigterm_rank1_then_resume(tmp_path: Path, *overrides: str, after_step: int = 40) -> Path:
    ckpt_dir = tmp_path / "ckpt"
    launcher = start_launch(ckpt_dir, *overrides, log_path=tmp_path / "job.log")
    try:
        pids = worker_pids(launcher)
        wait_for(lambda: max(metrics(ckpt_dir), default=0) >= after_step, 120, f"step {after_step}")
        os.kill(pids[1], signal.SIGTERM)
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    assert code == PREEMPTED_EXIT_CODE, (tmp_path / "job.log").read_text()
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    assert after_step <= stopped_at < STEPS
    result = run_launch(ckpt_dir, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_resumed_from(result.stdout, ckpt_dir, stopped_at)
    return ckpt_dir


# fp16: autocast + a saved GradScaler; bf16: autocast alone.
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_config_loop_with_accumulation_precision_clipping_eval_and_ema_resumes_bit_exactly(tmp_path, precision):
    overrides = [*REAL_LOOP, f"trainer.precision={precision}"]
    reference = tmp_path / "reference"
    result = run_launch(reference, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    ckpt_dir = _sigterm_rank1_then_resume(tmp_path, *overrides)
    assert_same_training(ckpt_dir, reference)  # model, optimizer, scheduler, EMA, scaler; every loss
    run_val = {step: row["val_loss"] for step, row in metrics(ckpt_dir).items() if "val_loss" in row}
    ref_val = {step: row["val_loss"] for step, row in metrics(reference).items() if "val_loss" in row}
    assert sorted(ref_val) == list(range(10, STEPS + 1, 10))
    # A stop agreed during a step's evaluation saves that step without its val_loss (by design): one
    # step may lack it; every value logged is the reference's.
    assert set(run_val) <= set(ref_val) and len(set(ref_val) - set(run_val)) <= 1, (run_val, ref_val)
    assert run_val == {step: ref_val[step] for step in run_val}
    state = newest_payload(ckpt_dir)["state"]
    assert "ema" in state and ("scaler" in state) == (precision == "fp16")
    assert not torch.equal(state["ema"]["shadow"]["net.0.weight"], state["model"]["net.0.weight"])


def test_values_belong_to_their_step_and_best_checkpoint_is_ranked_by_its_own_eval(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    result = run_launch(ckpt_dir, *REAL_LOOP, "trainer.max_steps=110", "checkpoint.keep_last=1",
                        "trainer.precision=bf16")
    assert result.returncode == 0, result.stderr
    rows = metrics(ckpt_dir)
    assert all(("val_loss" in row) == (step % 10 == 0) for step, row in rows.items()), "stale val_loss"
    # Saves at 25, 50, 75, 100, 110: 25 and 75 have no evaluation of their own, so they are not ranked.
    ranked = (50, 100, 110)
    assert steps_with_saves(ckpt_dir)[-1] == 110
    manifest = json.loads((ckpt_dir / "step_000000110" / "manifest.json").read_text())
    assert manifest["metric"] == rows[110]["val_loss"]
    kept_best = min(ranked, key=lambda step: rows[step]["val_loss"])
    # keep_last=1 keeps 110, keep_best=1 the best ranked one; the unranked and at least one ranked
    # loser that keep_last does not protect are pruned.
    assert steps_with_saves(ckpt_dir) == sorted({110, kept_best})


def _script(ckpt_dir: Path, *script_args: str, **kw):
    args = ",".join(f"'{arg}'" for arg in script_args)  # quoted: Hydra's grammar reserves "="
    return run_launch(ckpt_dir, f"script={SCRIPT}", f"script_args=[{args}]", f"trainer.max_steps={SCRIPT_STEPS}",
                      "checkpoint.every_steps=1000", **kw)


@pytest.fixture(scope="module")
def script_reference(tmp_path_factory) -> Path:
    ckpt_dir = tmp_path_factory.mktemp("script-reference") / "ckpt"
    result = _script(ckpt_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps_with_saves(ckpt_dir) == [SCRIPT_STEPS]
    return ckpt_dir


def _adam_steps(ckpt_dir: Path, step: int) -> set[int]:
    payload = read_step(ckpt_dir, step)
    return {int(state["step"]) for state in payload["state"]["optimizer"]["state"].values()}


@pytest.mark.parametrize("where", ["before_forward", "after_backward", "after_step", "in_eval"])
def test_a_stop_agreed_anywhere_in_a_users_step_saves_that_whole_step(tmp_path, script_reference, where):
    ckpt_dir = tmp_path / "ckpt"
    at = 10  # a multiple of 5: the script evaluates in that step
    result = _script(ckpt_dir, f"--where={where}", f"--at={at}")
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stdout + result.stderr
    assert steps_with_saves(ckpt_dir) == [at]
    assert _adam_steps(ckpt_dir, at) == {at}, "the checkpoint must hold exactly `at` optimizer steps"
    resumed = _script(ckpt_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_resumed_from(resumed.stdout, ckpt_dir, at)
    # The script's check_stop() said True inside the step: the resume says what it cannot redo.
    assert f"note: the stop was agreed inside step {at} (session.check_stop() returned True there)" \
        in resumed.stdout, resumed.stdout
    assert_tensors_equal(newest_payload(ckpt_dir)["state"], newest_payload(script_reference)["state"])
    if where == "in_eval":  # the control: the final save is a whole step, so resuming it says nothing
        again = _script(ckpt_dir)
        assert_resumed_from(again.stdout, ckpt_dir, SCRIPT_STEPS)
        assert "agreed inside step" not in again.stdout, again.stdout


@pytest.mark.parametrize("where", ["before_forward", "after_step"])
def test_save_called_inside_a_step_saves_that_step_at_its_end(tmp_path, where):
    ckpt_dir = tmp_path / "ckpt"
    result = _script(ckpt_dir, f"--where={where}", "--at=7", "--save")
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps_with_saves(ckpt_dir) == [7, SCRIPT_STEPS]
    assert _adam_steps(ckpt_dir, 7) == {7}


def test_a_users_script_is_refused_clearly_when_missing(tmp_path):
    result = run_launch(tmp_path / "ckpt", f"script={tmp_path / 'nope.py'}", "trainer.max_steps=2")
    assert result.returncode == 2
    assert "nope.py: no such file" in result.stderr


@pytest.mark.parametrize("shared", [False, True], ids=["per-rank", "shared-control"])
def test_state_registered_per_rank_resumes_each_ranks_own(tmp_path, script_reference, shared):
    """A state carried across batches that differs per rank (an RNN's hidden state) and feeds the
    loss: registered with register_per_rank, each rank gets its own back and the run resumes bit for
    bit; registered as shared (rank 0's state saved, every rank restores it), the first save warns
    that it differs between ranks, rank 1 resumes with rank 0's and the model differs: the control
    that shows the test can fail."""
    ckpt_dir = tmp_path / "ckpt"
    carry = ["--carry-shared"] if shared else []
    stopped = _script(ckpt_dir, "--where=before_forward", "--at=10", *carry)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout + stopped.stderr
    # The first save compares what only rank 0 saves across ranks, and names what differs.
    warned = "WARNING: the registered 'carry' differs between ranks at step 10 (rank 1 differs from rank 0)"
    assert (warned in stopped.stdout) == shared, stopped.stdout
    resumed = _script(ckpt_dir, *carry)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_resumed_from(resumed.stdout, ckpt_dir, 10)
    final, reference = newest_payload(ckpt_dir), newest_payload(script_reference)
    if shared:
        assert not torch.equal(final["state"]["model"]["net.0.weight"], reference["state"]["model"]["net.0.weight"])
        return
    assert_tensors_equal(final["state"], reference["state"])
    assert_tensors_equal(final["per_rank"], reference["per_rank"])
    hidden = [states["carry"]["hidden"] for states in final["per_rank"]]
    assert len(hidden) == 2 and not torch.equal(hidden[0], hidden[1]), "the ranks' carries must differ"
