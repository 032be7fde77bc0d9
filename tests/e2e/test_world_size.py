"""What a resume on another world size keeps, measured on the same model with and without dropout:
weights, optimizer, step and the sample stream carry over; randomness drawn on the ranks does not."""

from __future__ import annotations

import os
import signal


from conftest import STEPS, newest_payload, run_launch, signal_job, uninterrupted_run

NO_DROPOUT = "task.model.dropout=0.0"


def _relative_l2(run: dict, reference: dict) -> float:
    """||run - reference|| / ||reference|| over every model tensor."""
    diff = sum(float((run[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    norm = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    return (diff / norm) ** 0.5


def _stopped_on_2_resumed_on_1(tmp_path, *overrides: str) -> dict:
    """Preempt a 2-rank run (SIGTERM to rank 0 after step 30), resume it on 1 rank with the same
    global batch (2 x 32 = 1 x 64) to the end; the final model state."""
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[0], signal.SIGTERM),
                                        *overrides, after_step=30)
    assert code == 75, output
    resumed = run_launch(ckpt_dir, *overrides, "launcher.nproc_per_node=1", "task.batch_size=64")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "checkpoint was written by 2 ranks, this run has 1" in out
    assert "continue exactly" in out and "statistically equivalent run, not the same one" in out, out
    payload = newest_payload(ckpt_dir)
    assert payload["progress"]["step"] == STEPS
    return payload["state"]["model"]


def test_another_world_size_follows_the_reference_to_reduction_order_without_dropout(tmp_path_factory, tmp_path):
    reference = newest_payload(uninterrupted_run(tmp_path_factory, "reference-no-dropout", NO_DROPOUT))
    model = _stopped_on_2_resumed_on_1(tmp_path, NO_DROPOUT)
    distance = _relative_l2(model, reference["state"]["model"])
    print(f"no dropout: relative L2 to the uninterrupted run {distance:.2e}")
    assert distance < 1e-4


def test_another_world_size_with_dropout_is_a_different_run(tmp_path, reference):
    """The negative control that keeps the docs honest: with dropout the masks of every later step
    differ, and the weights move far beyond reduction order."""
    model = _stopped_on_2_resumed_on_1(tmp_path)
    distance = _relative_l2(model, newest_payload(reference)["state"]["model"])
    print(f"dropout 0.1: relative L2 to the uninterrupted run {distance:.2e}")
    assert distance > 1e-3
