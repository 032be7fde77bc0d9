"""The examples of examples/ (a nanoGPT-style script, a Hugging Face model, a CNN with augmentation),
each interrupted and relaunched, end bit for bit where an uninterrupted run ends.

Each example runs with its own short configuration (not conftest's shared one): a reference run, then
a run whose rank 1 gets SIGTERM mid-run (exit 75) and its relaunch (exit 0). The CNN, whose dataset
augments at random in 2 DataLoader workers per rank, is also killed with SIGKILL at a random instant,
and relaunched with another ``task.num_workers``: the sample stream must not change. The vision
script (torchvision's reference in miniature: its own sampler, mixup/cutmix in the collate_fn, EMA)
goes through three legs with 2, 0 and 1 workers, stopped by a SIGTERM to one rank, then a SIGKILL.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import (REPO, assert_diverges_after, assert_resumed_from, assert_tensors_equal, kill_tree, metrics,
                      newest_payload, require_module, steps_with_saves, wait_for, worker_pids)
from harness.config import PREEMPTED_EXIT_CODE

# Every example: 2 gloo ranks, one thread each, a metrics row flushed every 2 steps (the tests poll it).
COMMON = ["launcher.nproc_per_node=2", "trainer.num_threads=1", "trainer.log_every=2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # examples/hf must not download


@dataclass(frozen=True)
class Example:
    name: str
    overrides: tuple[str, ...]
    steps: int
    stop_after: int  # SIGTERM once the metrics file shows this step
    config_dir: str = ""  # --config-dir of the example's task preset (Hydra wants it before overrides)

    def command(self, ckpt_dir: Path, *extra: str) -> list[str]:
        flags = ["--config-dir", self.config_dir] if self.config_dir else []
        return [sys.executable, "-m", "harness.launch", *flags, f"name={self.name}", f"checkpoint.dir={ckpt_dir}",
                *COMMON, f"trainer.max_steps={self.steps}", *self.overrides, *extra]


GPT = Example("gpt", (
    "script=examples/gpt/train.py", "script_args=['--eval-every=10','--warmup=10']",  # quoted: Hydra reserves =
    "checkpoint.every_steps=10", "checkpoint.keep_last=1", "checkpoint.best_metric=val_loss",
    "checkpoint.keep_best=1"), steps=50, stop_after=22)
HF = Example("hf", (
    "task=hf_gpt2", "trainer.accumulate=2", "trainer.precision=bf16",
    "trainer.clip_grad_norm=1.0", "trainer.eval_every=10", "checkpoint.every_steps=20",
    "checkpoint.keep_last=0"), steps=80, stop_after=24, config_dir="examples/hf/conf")
# The same model under trainer.strategy=fsdp: each GPT2Block sharded, then the root (embeddings, the
# tied LM head); bf16 is FSDP2's MixedPrecisionPolicy. The stop is agreed at the step it is sent.
HF_FSDP = Example("hf-fsdp", (*HF.overrides, "trainer.strategy=fsdp", "trainer.fsdp_shard=[GPT2Block]",
                              "preempt.check_every=1"), steps=HF.steps, stop_after=HF.stop_after,
                  config_dir=HF.config_dir)
# 1024 samples / (2 ranks * 16) = 32 steps per epoch: the stops land mid-epoch, with workers running.
CNN = Example("cnn", (
    "task=cnn_aug", "trainer.eval_every=16", "checkpoint.every_steps=16",
    "checkpoint.keep_last=0"), steps=96, stop_after=20, config_dir="examples/cnn/conf")


def run(example: Example, ckpt_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(example.command(ckpt_dir, *extra), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def start(example: Example, ckpt_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(example.command(ckpt_dir, *extra), cwd=REPO, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def last_step(ckpt_dir: Path) -> int:
    return max(metrics(ckpt_dir), default=0)


def reference_run(example: Example, tmp_path_factory) -> Path:
    ckpt_dir = tmp_path_factory.mktemp(f"{example.name}-reference") / "ckpt"
    result = run(example, ckpt_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return ckpt_dir


@pytest.fixture(scope="module")
def gpt_reference(tmp_path_factory) -> Path:
    return reference_run(GPT, tmp_path_factory)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory) -> Path:
    require_module("transformers", "the Hugging Face example needs transformers (pip install -e .[dev])")
    return reference_run(HF, tmp_path_factory)


@pytest.fixture(scope="module")
def cnn_reference(tmp_path_factory) -> Path:
    return reference_run(CNN, tmp_path_factory)


def sigterm_rank1(example: Example, ckpt_dir: Path, log: Path, *extra: str) -> int:
    """Start ``example``, SIGTERM rank 1 once ``example.stop_after`` is done; every rank stops at one
    step, saved, exit 75. Returns that step."""
    launcher = start(example, ckpt_dir, log, *extra)
    try:
        pids = worker_pids(launcher, timeout=120)
        wait_for(lambda: last_step(ckpt_dir) >= example.stop_after, 180, f"step {example.stop_after}")
        os.kill(pids[1], signal.SIGTERM)
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    assert code == PREEMPTED_EXIT_CODE, log.read_text()
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    assert example.stop_after <= stopped_at < example.steps, "the stop must land mid-run"
    return stopped_at


def sigterm_rank1_then_relaunch(example: Example, tmp_path: Path, *relaunch_extra: str) -> Path:
    """SIGTERM to rank 1 once ``example.stop_after`` is done; expect 75, then relaunch to the end."""
    ckpt_dir = tmp_path / "ckpt"
    stopped_at = sigterm_rank1(example, ckpt_dir, tmp_path / "job.log")
    result = run(example, ckpt_dir, *relaunch_extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{stopped_at:09d}" in result.stdout
    return ckpt_dir


def assert_same_run(ckpt_dir: Path, reference: Path, steps: int, evaluated: tuple[str, ...] = ("val_loss",)) -> None:
    """Final state (model, optimizer, scheduler, ...) bit for bit; every logged number of every step.
    ``evaluated``: the keys an evaluation logs, which a stop agreed during it may leave out."""
    run_payload, ref_payload = newest_payload(ckpt_dir), newest_payload(reference)
    assert run_payload["progress"]["step"] == ref_payload["progress"]["step"] == steps
    assert_tensors_equal(run_payload["state"], ref_payload["state"], "state")
    assert_tensors_equal(run_payload.get("per_rank", []), ref_payload.get("per_rank", []), "per_rank")
    run_rows, ref_rows = metrics(ckpt_dir), metrics(reference)
    assert sorted(ref_rows) == list(range(1, steps + 1))
    # By design, a stop agreed during a step's evaluation saves that step without its val_loss (the
    # step is complete, its evaluation is not): allowed at one step (the stop's, whose checkpoint
    # retention may since have pruned), nowhere else.
    cut = [step for step in ref_rows
           if any(key in ref_rows[step] and key not in run_rows.get(step, {}) for key in evaluated)]
    assert len(cut) <= 1, cut
    for step in cut:
        ref_rows[step] = {key: value for key, value in ref_rows[step].items()
                          if key not in evaluated or key in run_rows[step]}
    assert run_rows == ref_rows  # loss, lr, grad_norm, val_loss where logged


# ----- examples/gpt: the user's own nanoGPT-style script ------------------------------------------
def test_gpt_script_resumes_bit_exactly_after_sigterm(tmp_path, gpt_reference):
    ckpt_dir = sigterm_rank1_then_relaunch(GPT, tmp_path)
    assert_same_run(ckpt_dir, gpt_reference, GPT.steps)
    rows = metrics(gpt_reference)
    val = {step: row["val_loss"] for step, row in rows.items() if "val_loss" in row}
    assert sorted(val) == list(range(10, GPT.steps + 1, 10))
    # The LR is set by hand from session.step: warm-up then cosine, continued across the resume.
    from examples.gpt.train import learning_rate
    assert {step: row["lr"] for step, row in metrics(ckpt_dir).items()} == {
        step: learning_rate(step - 1, 3e-3, 10, GPT.steps) for step in range(1, GPT.steps + 1)}
    # keep_last=1 and keep_best=1: the newest and the lowest val_loss among the saves survive.
    best = min(val, key=val.get)
    assert steps_with_saves(ckpt_dir) == sorted({best, GPT.steps})


# ----- examples/hf: a transformers model built from a config ----------------------------------------
def test_hf_model_from_config_resumes_bit_exactly_after_sigterm(tmp_path, hf_reference):
    ckpt_dir = sigterm_rank1_then_relaunch(HF, tmp_path)
    assert_same_run(ckpt_dir, hf_reference, HF.steps)
    state = newest_payload(ckpt_dir)["state"]
    assert "transformer.h.0.attn.c_attn.weight" in state["model"], "the GPT2LMHeadModel's own keys"


@pytest.mark.slow
def test_hf_model_under_fsdp_resumes_bit_exactly_after_sigterm(tmp_path_factory, tmp_path):
    """The Hugging Face example sharded with FSDP2, stopped by SIGTERM to rank 1 and relaunched: its
    shards (model with the tied embedding/LM head, AdamW state; unsharded) and the payload (scheduler,
    progress) equal an uninterrupted fsdp run's, and so does every logged loss."""
    from harness.strategy.fsdp import read_full_state

    require_module("transformers", "the Hugging Face example needs transformers (pip install -e .[dev])")
    reference = reference_run(HF_FSDP, tmp_path_factory)
    ckpt_dir = sigterm_rank1_then_relaunch(HF_FSDP, tmp_path)
    assert_same_run(ckpt_dir, reference, HF_FSDP.steps)
    shards = [folder / f"step_{HF_FSDP.steps:09d}" / "shards" for folder in (ckpt_dir, reference)]
    run_state, ref_state = (read_full_state(str(folder)) for folder in shards)
    assert_tensors_equal(run_state, ref_state, "shards")
    assert set(newest_payload(ckpt_dir)["state"]) == {"scheduler"}  # model and optimizer are in the shards
    model = run_state["model"]
    assert "transformer.h.0.attn.c_attn.weight" in model, "the GPT2LMHeadModel's own keys"
    assert torch.equal(model["lm_head.weight"], model["transformer.wte.weight"])  # still tied


# ----- examples/cnn: random augmentation in DataLoader workers --------------------------------------
def test_cnn_dataset_augments_at_random():
    """A control: without the harness's per-sample seeding, the same item differs on every access,
    so the exactness below depends on that seeding."""
    from examples.cnn.cnn_task import AugmentedShapes

    dataset = AugmentedShapes(num_samples=8)
    first, again = dataset[3][0], dataset[3][0]
    assert not torch.equal(first, again)


def test_cnn_with_worker_augmentation_resumes_bit_exactly_after_sigterm(tmp_path, cnn_reference):
    ckpt_dir = sigterm_rank1_then_relaunch(CNN, tmp_path)
    assert_same_run(ckpt_dir, cnn_reference, CNN.steps)


@pytest.mark.parametrize("workers", [0, 1])
def test_cnn_resumed_with_another_num_workers_draws_the_same_stream(tmp_path, cnn_reference, workers):
    ckpt_dir = sigterm_rank1_then_relaunch(CNN, tmp_path, f"task.num_workers={workers}")
    assert_same_run(ckpt_dir, cnn_reference, CNN.steps)


def test_cnn_killed_at_a_random_instant_resumes_bit_exactly(tmp_path, cnn_reference):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    target = rng.randint(CNN.stop_after, CNN.steps // 2 + 8)
    ckpt_dir, log = tmp_path / "ckpt", tmp_path / "job.log"
    launcher = start(CNN, ckpt_dir, log)
    try:
        worker_pids(launcher, timeout=120)
        wait_for(lambda: last_step(ckpt_dir) >= target, 180, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.3))
        kill_tree(launcher)  # SIGKILL to the launcher, its ranks and their DataLoader workers
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    saved = steps_with_saves(ckpt_dir)
    assert saved and saved[-1] < CNN.steps, f"seed {seed}: the kill must land after a save, before the end"
    result = run(CNN, ckpt_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{saved[-1]:09d}" in result.stdout, f"seed {seed}"
    assert_same_run(ckpt_dir, cnn_reference, CNN.steps)


# ----- examples/vision: torchvision's classification reference in miniature ----------------------------
# 384 images / 2 ranks / 16 = 12 steps per epoch (6 epochs); saves every 10 steps land mid-epoch.
VISION = Example("vision", ("script=examples/vision/train.py", "checkpoint.every_steps=10", "checkpoint.keep_last=0"),
                 steps=72, stop_after=16)
EVALUATED = ("acc1", "ema_acc1")  # logged by the evaluation at each epoch's end


def vision_args(workers: int, *flags: str) -> str:
    return "script_args=[" + ",".join(f"'{arg}'" for arg in (f"--workers={workers}", *flags)) + "]"


@pytest.fixture(scope="module")
def vision_reference(tmp_path_factory) -> Path:
    ckpt_dir = tmp_path_factory.mktemp("vision-reference") / "ckpt"
    result = run(VISION, ckpt_dir, vision_args(2))
    assert result.returncode == 0, result.stdout + result.stderr
    return ckpt_dir


@pytest.fixture(scope="module")
def vision_stopped(tmp_path_factory) -> Path:
    """The first leg, shared by the tests below (each works on its own copy): 2 workers per rank,
    SIGTERM to rank 1 alone mid-run; every rank stops at one step, saved, exit 75."""
    folder = tmp_path_factory.mktemp("vision-stopped")
    ckpt_dir = folder / "ckpt"
    sigterm_rank1(VISION, ckpt_dir, folder / "job.log", vision_args(2))
    return ckpt_dir


def copy_of(stopped: Path, tmp_path: Path) -> Path:
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(stopped, ckpt_dir)
    return ckpt_dir


def test_vision_example_resumes_bit_exactly_across_sigterm_sigkill_and_changed_workers(
        tmp_path, vision_reference, vision_stopped):
    ckpt_dir = copy_of(vision_stopped, tmp_path)
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    # Second leg, with no workers (sampling, augmentation and mixup now run in the main process):
    # SIGKILL to the launcher, both ranks and any worker, between two saves after the resume.
    log = tmp_path / "second.log"
    launcher = start(VISION, ckpt_dir, log, vision_args(0))
    try:
        pids = worker_pids(launcher, timeout=120)
        saved_later = lambda: max(steps_with_saves(ckpt_dir)) > stopped_at and max(steps_with_saves(ckpt_dir))
        wait_for(saved_later, 180, f"a save after step {stopped_at}")
        # Freeze both ranks at once (a quiet machine trains ~70 steps/s: the run could otherwise end
        # before the kill), then SIGKILL everything: a kill a step or two after that save.
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        kill_tree(launcher)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    assert_resumed_from(log.read_text(), ckpt_dir, stopped_at)
    saved = steps_with_saves(ckpt_dir)[-1]
    assert stopped_at < saved < VISION.steps, "the SIGKILL must land after a save, before the end"
    # Third leg, one worker, to the end.
    result = run(VISION, ckpt_dir, vision_args(1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_resumed_from(result.stdout, ckpt_dir, saved)
    assert_same_run(ckpt_dir, vision_reference, VISION.steps, evaluated=EVALUATED)
    run_payload, ref_payload = newest_payload(ckpt_dir), newest_payload(vision_reference)
    assert set(ref_payload["state"]) >= {"model", "optimizer", "scheduler"}
    emas = [states["model_ema"] for states in ref_payload["per_rank"]]  # compared by assert_same_run
    assert len(emas) == 2 and not torch.equal(emas[0]["module.stem.1.running_mean"], emas[1]["module.stem.1.running_mean"])
    assert "differs between ranks" not in result.stdout, result.stdout  # nothing shared differs per rank
    assert run_payload["progress"] == ref_payload["progress"]
    assert len(run_payload["rng"]) == 2
    assert_tensors_equal(run_payload["rng"], ref_payload["rng"], "rng")  # every rank's torch, python, numpy
    rows = metrics(vision_reference)
    assert sorted(step for step, row in rows.items() if "ema_acc1" in row) == list(range(12, VISION.steps + 1, 12))


def test_vision_example_without_collate_seeds_differs_after_the_resume(tmp_path, vision_reference, vision_stopped):
    """The control for the test above: resumed in the main process (no workers) with the harness's
    collate seeding off, mixup/cutmix draw from the training RNG, and the first resumed step differs."""
    ckpt_dir = copy_of(vision_stopped, tmp_path)
    stopped_at = steps_with_saves(ckpt_dir)[-1]
    result = run(VISION, ckpt_dir, vision_args(0, "--unseeded-collate"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_resumed_from(result.stdout, ckpt_dir, stopped_at)
    assert_diverges_after(ckpt_dir, vision_reference, stopped_at, first_difference=stopped_at + 1)
