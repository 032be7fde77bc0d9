"""trainer.strategy=fsdp on another world size: a checkpoint written by N ranks resumes on M through
DCP's load-time resharding. The model and optimizer right after the load equal the checkpoint's,
tensor by tensor; the data position is kept by samples with the same global batch (48 = 2 x 24 =
3 x 16 = 4 x 12), so the run then follows an uninterrupted run to floating-point reduction order
(no dropout here: randomness drawn on the ranks cannot follow a resize, as for ddp)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (REPO, assert_tensors_equal, launch_cmd, metrics, run_launch, signal_job, steps_with_saves,
                      uninterrupted_run)
from harness.strategy.fsdp import read_full_state
from test_fsdp import FSDP, FSDP_STEPS, _step_dir

GLOBAL_BATCH = 48
NO_DROPOUT = "task.model.dropout=0.0"


def _on(ranks: int) -> tuple[str, ...]:
    return (*FSDP, NO_DROPOUT, f"launcher.nproc_per_node={ranks}", f"task.batch_size={GLOBAL_BATCH // ranks}")


def _relative_l2(run: dict, reference: dict) -> float:
    diff = sum(float((run[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    return (diff / sum(float(reference[k].double().pow(2).sum()) for k in reference)) ** 0.5


@pytest.fixture(scope="module")
def reference_48(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, "fsdp-reference-48", *_on(2))


@pytest.mark.parametrize("saved, resumed", [(2, 3), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_fsdp_resumes_on_another_world_size_resharded_exactly(tmp_path, reference_48, saved, resumed):
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[saved - 1], signal.SIGTERM),
                                        *_on(saved), after_step=12, nproc=saved)
    assert code == 75, output
    stopped = steps_with_saves(ckpt_dir)[-1]
    dump = tmp_path / "loaded.pt"
    loaded = subprocess.run([*launch_cmd(ckpt_dir, *_on(resumed)), "script=tests/scripts/fsdp_dump.py",
                             f"script_args=[{dump}]"], cwd=REPO, capture_output=True, text=True, timeout=180)
    out = loaded.stdout + loaded.stderr
    assert loaded.returncode == 0, out
    assert f"checkpoint was written by {saved} ranks, this run has {resumed}" in out, out
    state = torch.load(dump, weights_only=True)
    checkpoint = read_full_state(str(_step_dir(ckpt_dir, stopped) / "shards"))
    earlier = read_full_state(str(_step_dir(ckpt_dir, 8) / "shards"))
    assert state["step"] == stopped and stopped > 8
    assert not torch.equal(earlier["model"]["head.weight"], checkpoint["model"]["head.weight"])  # the control
    assert_tensors_equal(state["model"], checkpoint["model"], "model")
    assert_tensors_equal(state["optimizer"]["state"], checkpoint["optimizer"]["state"], "optimizer")

    result = run_launch(ckpt_dir, *_on(resumed))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"checkpoint was written by {saved} ranks, this run has {resumed}" in out, out
    assert f"the data position is kept by samples consumed ({stopped * GLOBAL_BATCH} this epoch)" in out, out
    assert "the sample stream and its augmentations continue exactly" in out, out
    assert steps_with_saves(ckpt_dir)[-1] == FSDP_STEPS
    assert json.loads((_step_dir(ckpt_dir, FSDP_STEPS) / "manifest.json").read_text())["world_size"] == resumed
    final = read_full_state(str(_step_dir(ckpt_dir, FSDP_STEPS) / "shards"))["model"]
    reference = read_full_state(str(_step_dir(reference_48, FSDP_STEPS) / "shards"))["model"]
    distance = _relative_l2(final, reference)
    print(f"fsdp {saved} -> {resumed} ranks: relative L2 to the uninterrupted 2-rank run {distance:.2e}")
    assert distance < 1e-4
    assert sorted(metrics(ckpt_dir)) == sorted(metrics(reference_48))  # (the logged loss is rank 0's own)
