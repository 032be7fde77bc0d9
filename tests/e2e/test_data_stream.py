"""The data stream across a resume on another world size: same samples, same augmentations."""

from __future__ import annotations

import math

from conftest import REPO, metrics, run_launch
from harness.config import PREEMPTED_EXIT_CODE

SCRIPT = REPO / "tests" / "scripts" / "sample_stream.py"
STEPS = 40  # 256 samples / 16 per step = 16 steps per epoch: the run crosses two epoch boundaries


def _run(ckpt_dir, ranks: int, *script_args: str):
    args = ",".join(f"'{arg}'" for arg in script_args)
    return run_launch(ckpt_dir, f"script={SCRIPT}", f"script_args=[{args}]", f"trainer.max_steps={STEPS}",
                      f"launcher.nproc_per_node={ranks}", "checkpoint.every_steps=1000",
                      "preempt.check_every=1")  # a stop requested at step N is agreed at N, whatever the speed


def test_two_ranks_to_one_with_the_same_global_batch_keep_the_sample_stream(tmp_path):
    reference = tmp_path / "reference"
    assert _run(reference, 2, "--batch=8").returncode == 0
    ckpt_dir = tmp_path / "ckpt"
    first = _run(ckpt_dir, 2, "--batch=8", "--stop-at=21")
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stdout + first.stderr
    second = _run(ckpt_dir, 1, "--batch=16")  # one rank, the same 16 samples per step
    assert second.returncode == 0, second.stdout + second.stderr
    assert "checkpoint was written by 2 ranks, this run has 1" in second.stdout
    assert "the sample stream and its augmentations continue exactly" in second.stdout
    ran, ref = metrics(ckpt_dir), metrics(reference)
    assert sorted(ran) == sorted(ref) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ran[step]["index_sum"] == ref[step]["index_sum"], step
        assert ran[step]["index_square_sum"] == ref[step]["index_square_sum"], step
        # float64 sums of the same per-sample draws, added in another order across ranks
        assert math.isclose(ran[step]["drawn_sum"], ref[step]["drawn_sum"], rel_tol=1e-12), step


def test_negative_control_another_global_batch_changes_the_stream_and_says_so(tmp_path):
    reference = tmp_path / "reference"
    assert _run(reference, 2, "--batch=8").returncode == 0
    ckpt_dir = tmp_path / "ckpt"
    assert _run(ckpt_dir, 2, "--batch=8", "--stop-at=21").returncode == PREEMPTED_EXIT_CODE
    second = _run(ckpt_dir, 1, "--batch=8")  # 8 samples per step instead of 16
    assert second.returncode == 0, second.stdout + second.stderr
    assert "samples per batch changed from 16 to 8" in second.stdout
    ran, ref = metrics(ckpt_dir), metrics(reference)
    assert any(ran[step]["index_sum"] != ref[step]["index_sum"] for step in range(22, STEPS + 1))


def test_a_users_sampler_on_another_world_size_says_its_stream_cannot_be_kept(tmp_path):
    """A DistributedSampler of the script's own deals the data out by rank itself: after 2 -> 1
    ranks the one resume warning must say that the harness cannot keep that sampler's stream (and not
    claim that it continues exactly), and name when it is the same stream anyway: a sampler that
    deals one order round-robin, with the same samples per step, as here (checked on the logs)."""
    reference = tmp_path / "reference"
    assert _run(reference, 2, "--batch=8", "--own-sampler").returncode == 0
    ckpt_dir = tmp_path / "ckpt"
    first = _run(ckpt_dir, 2, "--batch=8", "--own-sampler", "--stop-at=21")
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stdout + first.stderr
    second = _run(ckpt_dir, 1, "--batch=16", "--own-sampler")  # the same 16 samples per step
    assert second.returncode == 0, second.stdout + second.stderr
    warnings = [line for line in second.stdout.splitlines() if "checkpoint was written by 2 ranks" in line]
    assert len(warnings) == 1, second.stdout
    assert "your own sampler" in warnings[0] and "cannot keep its sample stream" in warnings[0], warnings[0]
    assert "round-robin" in warnings[0] and "continue exactly" not in warnings[0], warnings[0]
    ran, ref = metrics(ckpt_dir), metrics(reference)
    assert sorted(ran) == sorted(ref) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ran[step]["index_sum"] == ref[step]["index_sum"], step
        assert math.isclose(ran[step]["drawn_sum"], ref[step]["drawn_sum"], rel_tol=1e-12), step
