"""trainer.strategy=fsdp: FSDP2 on 2 CPU ranks over gloo, sharded checkpoints through DCP.

Every rank writes its own shards of the model and optimizer; rank 0 writes the rest (progress, RNG,
scheduler) and the manifest last, listing every file. A stop signal to one rank, SIGKILL at random
instants and a resume on another world size must all end where an uninterrupted run ends, tensor by
tensor, with a negative control showing the comparison can fail.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (REPO, assert_tensors_equal, kill_tree, launch_cmd, metrics, payload_file, read_step, run_launch,
                      signal_job, start_launch, steps_with_saves, uninterrupted_run, wait_for, worker_pids)
from harness.checkpoint import checksum
from harness.ckpt import digest, main as ckpt_main
from harness.strategy.fsdp import read_full_state

FSDP_STEPS = 48  # 32 steps per epoch (2048 samples / 2 ranks / 32): the runs cross an epoch boundary
FSDP = ("trainer.strategy=fsdp", "task.model._target_=tests.tasks.BlockMLP", f"trainer.max_steps={FSDP_STEPS}",
        "checkpoint.every_steps=8", "trainer.log_every=8",
        "preempt.check_every=1")  # a stop is agreed at the next step end, however fast the machine trains


def _step_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:09d}"


def _final_state(ckpt_dir: Path) -> tuple[dict, dict]:
    """(full model + optimizer state from the shards, rank 0's payload) of the newest checkpoint."""
    step_dir = _step_dir(ckpt_dir, steps_with_saves(ckpt_dir)[-1])
    return read_full_state(str(step_dir / "shards")), read_step(ckpt_dir, steps_with_saves(ckpt_dir)[-1])


def _assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """Model and optimizer (every shard, unsharded), scheduler, progress and every loss equal."""
    (run_shards, run_payload), (ref_shards, ref_payload) = _final_state(run_dir), _final_state(reference_dir)
    assert run_payload["progress"]["step"] == ref_payload["progress"]["step"] == FSDP_STEPS
    assert_tensors_equal(run_shards, ref_shards, "shards")
    assert_tensors_equal(run_payload["state"], ref_payload["state"], "state")
    assert {s: r["loss"] for s, r in metrics(run_dir).items()} == \
        {s: r["loss"] for s, r in metrics(reference_dir).items()}


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, "fsdp-reference", *FSDP)


def test_fsdp_checkpoint_lists_every_rank_shard_in_its_manifest(fsdp_reference, capsys):
    step_dir = _step_dir(fsdp_reference, FSDP_STEPS)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    on_disk = {str(path.relative_to(step_dir)) for path in step_dir.rglob("*") if path.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp", "state.safetensors"} <= on_disk
    assert manifest["strategy"] == "fsdp" and manifest["world_size"] == 2
    payload = read_step(fsdp_reference, FSDP_STEPS)
    assert set(payload["state"]) == {"scheduler"}  # model and optimizer live in the shards only
    full, _ = _final_state(fsdp_reference)
    assert set(full) == {"model", "optimizer"} and "blocks.1.1.weight" in full["model"]
    assert ckpt_main(["verify", str(fsdp_reference)]) == 0


def test_ckpt_inspect_and_export_read_the_full_tensors_of_the_shards(fsdp_reference, tmp_path, capsys):
    full, _ = _final_state(fsdp_reference)
    capsys.readouterr()
    assert ckpt_main(["inspect", "--json", str(_step_dir(fsdp_reference, FSDP_STEPS))]) == 0
    report = json.loads(capsys.readouterr().out)
    shapes = {t["key"]: t["shape"] for t in report["groups"]["model"]["tensors"]}
    assert shapes["blocks.1.1.weight"] == [128, 128] and shapes["embed.weight"] == [128, 32]
    assert report["digests"]["model"] == digest(full["model"]) and report["world_size"] == 2
    out = tmp_path / "weights.pt"
    assert ckpt_main(["export", str(fsdp_reference), str(out)]) == 0
    assert_tensors_equal(torch.load(out, weights_only=True), full["model"], "exported")


@pytest.mark.parametrize("fmt, dtype", [("torch", "bf16"), ("safetensors", None), ("safetensors", "fp16")])
def test_streamed_export_of_the_shards_writes_the_full_weights(fsdp_reference, tmp_path, fmt, dtype):
    """``export`` of a sharded checkpoint streams one full tensor at a time into the file (torch or
    safetensors, cast or not); what it writes equals the full tensors read at once, and the
    ``.sha256`` line matches the file."""
    import hashlib

    full = {key: tensor.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])) if dtype else tensor
            for key, tensor in _final_state(fsdp_reference)[0]["model"].items()}
    out = tmp_path / f"weights.{fmt}"
    assert ckpt_main(["export", str(fsdp_reference), str(out), "--format", fmt,
                      *(["--dtype", dtype] if dtype else [])]) == 0
    if fmt == "torch":
        exported = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file
        exported = load_file(str(out))
    assert_tensors_equal(exported, full, "exported")
    assert (tmp_path / f"weights.{fmt}.sha256").read_text().split()[0] == hashlib.sha256(out.read_bytes()).hexdigest()


def _sigterm_one_rank_then_resume(tmp_path: Path, args: tuple, rank: int, nproc: int = 2) -> Path:
    """SIGTERM to ``rank`` alone after step 12: the job exits 75 with a checkpoint, and the relaunch
    resumes from it and finishes. Returns the checkpoint folder."""
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[rank], signal.SIGTERM),
                                        *args, after_step=12, nproc=nproc)
    assert code == 75, output
    stopped = steps_with_saves(ckpt_dir)[-1]
    assert 12 <= stopped < FSDP_STEPS, output
    result = run_launch(ckpt_dir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{stopped:09d} at step {stopped}" in result.stdout
    return ckpt_dir


def test_sigterm_to_one_rank_exits_75_and_resumes_bit_exact(tmp_path, fsdp_reference):
    _assert_same_training(_sigterm_one_rank_then_resume(tmp_path, FSDP, rank=1), fsdp_reference)


THREE_RANKS = (*FSDP, "launcher.nproc_per_node=3", "task.batch_size=16")


@pytest.fixture(scope="module")
def fsdp_3_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, "fsdp-3-reference", *THREE_RANKS)


def test_three_ranks_sigterm_to_the_last_rank_resumes_bit_exact(fsdp_3_reference, tmp_path):
    """Uneven shards (128 rows over 3 ranks: 43, 43, 42) and 3 RNG streams, stopped by SIGTERM to
    rank 2 alone, end where an uninterrupted 3-rank run ends (the control pair above shows the
    comparison can fail)."""
    reference = fsdp_3_reference
    ckpt_dir = _sigterm_one_rank_then_resume(tmp_path, THREE_RANKS, rank=2, nproc=3)
    assert len(_final_state(ckpt_dir)[1]["rng"]) == 3
    _assert_same_training(ckpt_dir, reference)


FOUR_RANKS = (*FSDP, "launcher.nproc_per_node=4", "task.batch_size=16")


@pytest.mark.slow
def test_four_ranks_sigterm_to_the_last_rank_resumes_bit_exact(tmp_path_factory, tmp_path):
    """4 ranks on this 2-core machine (slow): SIGTERM to rank 3 alone, then the relaunch ends where an
    uninterrupted 4-rank run ends, with 4 RNG streams saved."""
    reference = uninterrupted_run(tmp_path_factory, "fsdp-4-reference", *FOUR_RANKS)
    ckpt_dir = _sigterm_one_rank_then_resume(tmp_path, FOUR_RANKS, rank=3, nproc=4)
    assert len(_final_state(ckpt_dir)[1]["rng"]) == 4
    _assert_same_training(ckpt_dir, reference)


def _rewrite_shards(step_dir: Path, change) -> None:
    """Replace a checkpoint's shards by ``change(full state)`` written by one process (so the resume
    also reshards 1 -> 2 files), and record the new files in the manifest, as a tampering user would."""
    import torch.distributed.checkpoint as dcp

    state = read_full_state(str(step_dir / "shards"))
    change(state)
    shutil.rmtree(step_dir / "shards")
    dcp.save(state, checkpoint_id=str(step_dir / "shards"), no_dist=True)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if not name.startswith("shards/")}
    for path in (step_dir / "shards").iterdir():
        manifest["files"][f"shards/{path.name}"] = checksum.file_entry(path.stat().st_size, checksum.of_file(str(path)))
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", ["none", "optimizer-moments-lost"])
def test_resume_from_rewritten_shards_matches_only_when_the_optimizer_state_is_kept(tmp_path, fsdp_reference, change):
    """The control pair: the same shards rewritten by one process resume bit-exact (resharding
    1 -> 2 included); with AdamW's moments zeroed the run must differ, so the comparison can fail."""
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(fsdp_reference, ckpt_dir)
    for step in steps_with_saves(ckpt_dir):
        if step > 24:
            shutil.rmtree(_step_dir(ckpt_dir, step))

    def lose_moments(state: dict) -> None:
        for slots in state["optimizer"]["state"].values():
            slots["exp_avg"].zero_()
            slots["exp_avg_sq"].zero_()

    _rewrite_shards(_step_dir(ckpt_dir, 24), lose_moments if change != "none" else lambda state: None)
    result = run_launch(ckpt_dir, *FSDP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_000000024 at step 24" in result.stdout
    if change == "none":
        _assert_same_training(ckpt_dir, fsdp_reference)
    else:
        with pytest.raises(AssertionError):
            _assert_same_training(ckpt_dir, fsdp_reference)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sigkill_at_random_instants_resumes_from_the_newest_valid_checkpoint(tmp_path, request, capsys, ranks):
    """SIGKILL of the whole job twice at random instants (inside saves too), then a relaunch: the
    newest valid checkpoint is chosen by all ranks and the run ends bit for bit; on 3 ranks the
    shards are uneven and 3 ranks must agree on which checkpoint is valid."""
    reference = request.getfixturevalue("fsdp_reference" if ranks == 2 else "fsdp_3_reference")
    ckpt_dir = tmp_path / "ckpt"
    rng = random.Random(22)
    overrides = (*(FSDP if ranks == 2 else THREE_RANKS), "checkpoint.every_steps=3")  # kills land inside saves too
    for attempt in range(2):
        launcher = start_launch(ckpt_dir, *overrides)
        worker_pids(launcher, ranks)
        done_before = max(metrics(ckpt_dir), default=0)
        wait_for(lambda: max(metrics(ckpt_dir), default=0) > done_before + 3, what="progress")
        time.sleep(rng.uniform(0.0, 0.25))
        kill_tree(launcher)
    capsys.readouterr()
    code = ckpt_main(["verify", str(ckpt_dir)])
    states = {line.rsplit(": ", 1)[-1] for line in capsys.readouterr().out.splitlines()}
    assert "OK" in states and states <= {"OK", "INCOMPLETE"} and code == (states != {"OK"}), states
    result = run_launch(ckpt_dir, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout
    _assert_same_training(ckpt_dir, reference)


def test_a_corrupt_shard_fails_verify_and_resume_falls_back(tmp_path, fsdp_reference, capsys):
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(fsdp_reference, ckpt_dir)
    shard = _step_dir(ckpt_dir, FSDP_STEPS) / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert ckpt_main(["verify", str(ckpt_dir)]) == 1
    captured = capsys.readouterr()
    assert f"step_{FSDP_STEPS:09d}: CORRUPT" in captured.out and "shards/__1_0.distcp" in captured.err
    result = run_launch(ckpt_dir, *FSDP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"skipping corrupt checkpoint {ckpt_dir}/step_{FSDP_STEPS:09d}" in result.stderr
    assert f"resumed from {ckpt_dir}/step_000000040 at step 40" in result.stdout
    _assert_same_training(ckpt_dir, fsdp_reference)


@pytest.mark.parametrize("owner", [0, 1])
def test_each_rank_verifies_its_own_shard_and_all_fall_back_together(tmp_path, fsdp_reference, owner):
    """At resume the shard file of rank r is verified by rank r (not all by rank 0): a flipped byte in
    the newest checkpoint's file of either rank is reported by that rank, and both ranks skip the
    checkpoint together and end bit for bit where the reference ends."""
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(fsdp_reference, ckpt_dir)
    shard = _step_dir(ckpt_dir, FSDP_STEPS) / "shards" / f"__{owner}_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_launch(ckpt_dir, *FSDP)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = [line for line in result.stderr.splitlines()
               if f"skipping corrupt checkpoint {ckpt_dir}/step_{FSDP_STEPS:09d}" in line]
    assert len(skipped) == 1, result.stderr  # rank 0 warns once, for both ranks
    assert f"rank {owner}: step_{FSDP_STEPS:09d}/shards/__{owner}_0.distcp" in skipped[0], skipped[0]
    assert f"resumed from {ckpt_dir}/step_000000040 at step 40" in result.stdout
    _assert_same_training(ckpt_dir, fsdp_reference)


def test_two_ranks_to_one_reshards_exactly_and_continues_the_data_stream(tmp_path):
    """Stop a 2-rank run, load it on 1 rank: the weights and optimizer right after the load equal the
    checkpoint's exactly (DCP reshards), and the run then continues to the end on 1 rank, keeping
    the data position by samples (global batch 2 x 32 = 1 x 64)."""
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[0], signal.SIGTERM),
                                        *FSDP, after_step=12)
    assert code == 75, output
    stopped = steps_with_saves(ckpt_dir)[-1]
    one_rank = (*FSDP, "launcher.nproc_per_node=1", "task.batch_size=64")
    dump = tmp_path / "loaded.pt"
    loaded = subprocess.run([*launch_cmd(ckpt_dir, *one_rank), "script=tests/scripts/fsdp_dump.py",
                             f"script_args=[{dump}]"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "checkpoint was written by 2 ranks, this run has 1" in loaded.stdout
    state = torch.load(dump, weights_only=True)
    saved = read_full_state(str(_step_dir(ckpt_dir, stopped) / "shards"))
    assert state["step"] == stopped
    earlier = read_full_state(str(_step_dir(ckpt_dir, 8) / "shards"))["model"]
    assert not torch.equal(earlier["head.weight"], saved["model"]["head.weight"])  # the control: weights moved
    assert_tensors_equal(state["model"], saved["model"], "model")
    assert_tensors_equal(state["optimizer"]["state"], saved["optimizer"]["state"], "optimizer")
    resumed = run_launch(ckpt_dir, *one_rank)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "continue exactly" in out, out
    assert steps_with_saves(ckpt_dir)[-1] == FSDP_STEPS
    assert json.loads((_step_dir(ckpt_dir, FSDP_STEPS) / "manifest.json").read_text())["world_size"] == 1


EVAL_DATA = "task.eval_data={_target_:harness.example.SyntheticClassification,num_samples:96,seed:5}"
BF16_LOOP = (*FSDP, "trainer.precision=bf16", "trainer.accumulate=2", "trainer.clip_grad_norm=0.5",
             "trainer.eval_every=8", EVAL_DATA)


@pytest.mark.slow
def test_bf16_accumulation_clipping_and_eval_resume_bit_exact(tmp_path_factory, tmp_path):
    """FSDP2's bf16 MixedPrecisionPolicy, no reduce-scatter on the first of 2 micro-batches, clipping
    of sharded gradients and evaluation, stopped by SIGTERM to rank 0 and resumed."""
    reference = uninterrupted_run(tmp_path_factory, "fsdp-bf16-reference", *BF16_LOOP)
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[0], signal.SIGTERM),
                                        *BF16_LOOP, after_step=10)
    assert code == 75, output
    result = run_launch(ckpt_dir, *BF16_LOOP)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_same_training(ckpt_dir, reference)
    val = {step: row["val_loss"] for step, row in metrics(ckpt_dir).items() if "val_loss" in row}
    assert val == {step: row["val_loss"] for step, row in metrics(reference).items() if "val_loss" in row}
    assert sorted(val) == list(range(8, FSDP_STEPS + 1, 8))
    full, _ = _final_state(reference)
    assert full["model"]["head.weight"].dtype == torch.float32  # bf16 for compute, fp32 kept and saved


# fp16 as FSDP2's MixedPrecisionPolicy with torch's GradScaler on sharded gradients, a loss that
# overflows at the initial scale (so the scale changes, and a skipped step must be skipped on every
# rank), and an EMA whose shadow is sharded like the model and evaluated every 8 steps.
FP16_EMA = (*FSDP, "trainer.precision=fp16", "task.loss=tests.tasks.loss_for_controls", "trainer.ema_decay=0.9",
            "trainer.eval_every=8", "trainer.eval_ema=true", EVAL_DATA)


def _rchar() -> int:
    """Bytes this process has read so far (files, pipes), from /proc/self/io."""
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])


def test_fp16_scaler_and_sharded_ema_resume_bit_exact(tmp_path_factory, tmp_path, capsys):
    """SIGTERM to rank 1 of an fp16 + EMA run, resumed: the EMA lives in the shards (each rank wrote
    its part of it), the scaler in the payload, and model, optimizer, EMA, scaler and every logged
    loss (the EMA's evaluation included) equal an uninterrupted run's."""
    reference = uninterrupted_run(tmp_path_factory, "fsdp-fp16-ema-reference", *FP16_EMA)
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[1], signal.SIGTERM),
                                        *FP16_EMA, after_step=12)
    assert code == 75, output
    stopped = steps_with_saves(ckpt_dir)[-1]
    result = run_launch(ckpt_dir, *FP16_EMA)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {ckpt_dir}/step_{stopped:09d} at step {stopped}" in result.stdout
    _assert_same_training(ckpt_dir, reference)
    full, payload = _final_state(ckpt_dir)
    assert set(full) == {"model", "optimizer", "ema"} and set(payload["state"]) == {"scheduler", "scaler"}
    assert set(full["ema"]["shadow"]) == set(full["model"])
    assert not torch.equal(full["ema"]["shadow"]["head.weight"], full["model"]["head.weight"])  # an average
    # `ckpt export --state ema` streams the sharded shadow, not the model; an optimizer has no weights.
    out = tmp_path / "ema.pt"
    assert ckpt_main(["export", str(ckpt_dir), str(out), "--state", "ema"]) == 0
    assert_tensors_equal(torch.load(out, weights_only=True), full["ema"]["shadow"], "exported ema")
    assert ckpt_main(["export", str(ckpt_dir), str(tmp_path / "x.pt"), "--state", "optimizer"]) == 1
    # A name nothing holds is refused with the names there are, without reading the shards.
    shard_bytes = sum(path.stat().st_size for path in (ckpt_dir / f"step_{FSDP_STEPS:09d}" / "shards").iterdir())
    read_before = _rchar()
    assert ckpt_main(["export", str(ckpt_dir), str(tmp_path / "x.pt"), "--state", "nope"]) == 1
    assert _rchar() - read_before < shard_bytes / 4
    assert "holds no state named 'nope'; it holds ['ema', 'model', 'optimizer', 'scaler', 'scheduler']" \
        in capsys.readouterr().err
    assert payload["state"]["scaler"]["scale"] < 65536.0  # the overflowing loss lowered the scale
    run_rows, ref_rows = metrics(ckpt_dir), metrics(reference)
    evaluated = {step: (row["val_loss"], row["val_loss_ema"]) for step, row in run_rows.items() if "val_loss_ema" in row}
    assert sorted(evaluated) == list(range(8, FSDP_STEPS + 1, 8))
    assert evaluated == {step: (row["val_loss"], row["val_loss_ema"]) for step, row in ref_rows.items()
                         if "val_loss_ema" in row}
    assert all(model != ema for model, ema in evaluated.values())  # the EMA's weights, not the model's


# ----- ddp <-> fsdp ---------------------------------------------------------------------------------
# On 2 CPU ranks over gloo, ddp and fsdp training of this model are bit-identical (a two-term sum
# does not depend on reduction order, and halving is exact): measured, and what makes the exact
# comparisons below possible. On more ranks the strategies may differ by reduction order; what is
# guaranteed everywhere is that the state is carried over exactly (see the init_from tests).
DDP = tuple(o for o in FSDP if not o.startswith("trainer.strategy"))


def _full_training_state(ckpt_dir: Path) -> dict:
    """The newest checkpoint's whole training state in one strategy-blind form: full model and
    optimizer keyed by parameter name (from the shards, or converted from a ddp payload, where the
    optimizer keys parameters by their position), everything else of the payload, progress, RNG."""
    step = steps_with_saves(ckpt_dir)[-1]
    payload = read_step(ckpt_dir, step)
    state = dict(payload["state"])
    shards = _step_dir(ckpt_dir, step) / "shards"
    if shards.exists():
        state |= read_full_state(str(shards))
    else:
        names = list(state["model"])  # BlockMLP: every entry is a parameter, in parameters() order
        optimizer = state["optimizer"]
        state["optimizer"] = {
            "state": {names[index]: slots for index, slots in optimizer["state"].items()},
            "param_groups": [group | {"params": [names[index] for index in group["params"]]}
                             for group in optimizer["param_groups"]]}
    return {"state": state, "progress": payload["progress"], "rng": payload["rng"]}


def _assert_same_full_training(run_dir: Path, reference_dir: Path) -> None:
    run, ref = _full_training_state(run_dir), _full_training_state(reference_dir)
    assert run["progress"]["step"] == ref["progress"]["step"] == FSDP_STEPS
    assert_tensors_equal(run, ref, "checkpoint")
    assert {s: r["loss"] for s, r in metrics(run_dir).items()} == \
        {s: r["loss"] for s, r in metrics(reference_dir).items()}


@pytest.mark.parametrize("first, then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_run_resumed_under_the_other_strategy_continues_exactly(tmp_path, fsdp_reference, first, then):
    """A leg stopped by SIGTERM, resumed after changing trainer.strategy: model, optimizer,
    scheduler, data position and every rank's RNG carry over, and the run ends where an
    uninterrupted fsdp run ends, bit for bit."""
    legs = {"ddp": DDP, "fsdp": FSDP}
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[1], signal.SIGTERM),
                                        *legs[first], after_step=12)
    assert code == 75, output
    stopped = steps_with_saves(ckpt_dir)[-1]
    result = run_launch(ckpt_dir, *legs[then], "trainer.strategy=" + then)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"resumed from {ckpt_dir}/step_{stopped:09d} at step {stopped}" in out
    assert f"written with trainer.strategy={first}, this run uses trainer.strategy={then}" in out, out
    _assert_same_full_training(ckpt_dir, fsdp_reference)


@pytest.mark.parametrize("first, then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_an_ema_resumed_under_the_other_strategy_continues_exactly(tmp_path_factory, tmp_path, first, then):
    """The EMA crosses strategies too: a ddp payload's full shadow is cut into each rank's shards,
    a sharded shadow is read whole into a ddp run, and the run ends where an uninterrupted fsdp run
    with the same EMA ends, bit for bit (EMA included)."""
    ema = ("trainer.ema_decay=0.9",)
    reference = uninterrupted_run(tmp_path_factory, "fsdp-ema-reference", *FSDP, *ema)
    legs = {"ddp": (*DDP, *ema), "fsdp": (*FSDP, *ema)}
    ckpt_dir, output, code = signal_job(tmp_path, lambda launcher, pids: os.kill(pids[1], signal.SIGTERM),
                                        *legs[first], after_step=12)
    assert code == 75, output
    result = run_launch(ckpt_dir, *legs[then], "trainer.strategy=" + then)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"this run uses trainer.strategy={then}" in result.stdout + result.stderr
    _assert_same_full_training(ckpt_dir, reference)
    assert "ema" in _full_training_state(ckpt_dir)["state"]


@pytest.mark.parametrize("source, target", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_init_from_a_checkpoint_of_the_other_strategy_loads_its_weights_exactly(tmp_path, fsdp_reference,
                                                                               source, target):
    """init_from a ddp payload into an fsdp run, and a sharded checkpoint folder into a ddp run: the
    model right after the load equals the file's weights (the control: they differ from an earlier
    checkpoint's); the optimizer starts fresh."""
    if source == "fsdp":
        origin = _step_dir(fsdp_reference, 24)
        weights = read_full_state(str(origin / "shards"))["model"]
        earlier = read_full_state(str(_step_dir(fsdp_reference, 8) / "shards"))["model"]
    else:
        result = run_launch(tmp_path / "ddp", *DDP, "trainer.max_steps=24")
        assert result.returncode == 0, result.stdout + result.stderr
        origin = payload_file(_step_dir(tmp_path / "ddp", 24))
        weights, earlier = (read_step(tmp_path / "ddp", step)["state"]["model"] for step in (24, 8))
    assert not torch.equal(weights["head.weight"], earlier["head.weight"])
    dump = tmp_path / "loaded.pt"
    legs = {"ddp": DDP, "fsdp": FSDP}
    loaded = subprocess.run([*launch_cmd(tmp_path / "fresh", *legs[target], f"checkpoint.init_from={origin}"),
                             "script=tests/scripts/fsdp_dump.py", f"script_args=[{dump}]"],
                            cwd=REPO, capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert f"initialised 12 tensors from {origin}" in loaded.stdout, loaded.stdout
    state = torch.load(dump, weights_only=True)
    assert state["step"] == 0
    assert_tensors_equal(state["model"], weights, "model")


def test_init_from_a_sharded_checkpoint_reads_each_ranks_own_shards_only(tmp_path):
    """init_from a sharded checkpoint into an fsdp run: every tensor whose shape matches equals the
    file's, one whose shape differs is reported and left out, and each of the 2 ranks reads about
    half of the model from the files, never all of it (what lets a model larger than one host's
    memory start from another run). The control: a ddp run, which needs full tensors, reads it all."""
    wide = ("task.model.hidden=1024", "+task.model.depth=4")  # 4.2M params, 17 MB: far above the noise
    source = run_launch(tmp_path / "source", *FSDP, *wide, "trainer.max_steps=1", "checkpoint.every_steps=1")
    assert source.returncode == 0, source.stdout + source.stderr
    origin = _step_dir(tmp_path / "source", 1)
    weights = read_full_state(str(origin / "shards"))["model"]
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    for target, legs in (("fsdp", FSDP), ("ddp", DDP)):
        dump = tmp_path / f"{target}.pt"
        loaded = subprocess.run([*launch_cmd(tmp_path / target, *legs, *wide, "task.model.num_classes=10",
                                             f"checkpoint.init_from={origin}"),
                                 "script=tests/scripts/fsdp_dump.py", f"script_args=[{dump}]"],
                                cwd=REPO, capture_output=True, text=True, timeout=180)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert f"initialised 18 tensors from {origin}" in loaded.stdout, loaded.stdout
        assert "head.weight: file (8, 1024) vs model (10, 1024)" in loaded.stdout, loaded.stdout
        state = torch.load(dump, weights_only=True)
        matching = {key: value for key, value in weights.items() if not key.startswith("head.")}
        assert_tensors_equal({key: state["model"][key] for key in matching}, matching, target)
        read = state["read_bytes"]
        assert len(read) == 2, read
        if target == "fsdp":
            assert all(0.4 * model_bytes < each < 0.6 * model_bytes for each in read), (read, model_bytes)
        else:
            assert all(each > model_bytes for each in read), (read, model_bytes)


# ----- a user's FSDP2 script: a model built on the meta device, or sharded by the script itself -------
LOOP = REPO / "tests" / "scripts" / "fsdp_loop.py"
LOOP_STEPS = 24


def _loop(ckpt_dir: Path, *script_args: str, strategy: str = "fsdp"):
    args = ",".join(f"'{arg}'" for arg in script_args)
    return run_launch(ckpt_dir, f"script={LOOP}", f"script_args=[{args}]", f"trainer.strategy={strategy}",
                      f"trainer.max_steps={LOOP_STEPS}", "checkpoint.every_steps=1000", "preempt.check_every=1")


@pytest.mark.parametrize("build", ["meta", "own"])
def test_a_script_built_on_meta_or_sharded_by_itself_resumes_bit_exactly(tmp_path, build):
    """meta: no rank ever holds the whole model; prepare shards it, materialises each rank's shards
    and runs the script's init (which must also set the buffer computed in __init__, absent from any
    checkpoint). own: the script's fully_shard(reshard_after_forward=False) is kept. Either way a stop
    requested by rank 1 and the relaunch end where an uninterrupted run ends."""
    reference, ckpt_dir = tmp_path / "reference", tmp_path / "ckpt"
    done = _loop(reference, f"--build={build}", f"--dump={tmp_path / 'reference.pt'}")
    assert done.returncode == 0, done.stdout + done.stderr
    stopped = _loop(ckpt_dir, f"--build={build}", "--stop-at=9")
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    resumed = _loop(ckpt_dir, f"--build={build}", f"--dump={tmp_path / 'resumed.pt'}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt_dir}/step_000000009" in resumed.stdout, resumed.stdout
    final, expected = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "reference.pt")
    assert_tensors_equal(final, expected)
    assert torch.equal(final["scale"], torch.linspace(0.5, 1.5, 16)), "init must set the buffer too"
    assert all(torch.isfinite(tensor).all() for tensor in final["model"].values())


def test_a_meta_model_without_init_and_a_sharded_model_under_ddp_are_clear_errors(tmp_path):
    """Each would train on nothing or save a fraction of the model: each is refused in one message."""
    without_init = _loop(tmp_path / "a", "--build=meta", "--no-init")
    assert without_init.returncode == 1
    assert ("session.prepare: the model is on the meta device, so its memory holds nothing once materialised "
            "on cpu. HINT: pass init=") in without_init.stderr, without_init.stderr
    sharded = _loop(tmp_path / "b", "--build=own", strategy="ddp")
    assert sharded.returncode == 1
    assert ("the model's parameters are DTensors (sharded by fully_shard): trainer.strategy=ddp keeps whole "
            "models, and would save rank 0's shards only. HINT: run with trainer.strategy=fsdp") in sharded.stderr
    assert not list((tmp_path / "b").glob("step_*")), "nothing may be saved"
    # Registered without prepare() under ddp: the first save refuses it (torch.save of rank 0's shards
    # would be a checkpoint no resume can load).
    registered = _loop(tmp_path / "c", "--build=own", "--register-only", strategy="ddp")
    assert registered.returncode == 1
    assert "is a DTensor" in registered.stderr and "HINT: run with trainer.strategy=fsdp" in registered.stderr, \
        registered.stderr
    assert "Traceback" not in registered.stderr, registered.stderr
    assert not list((tmp_path / "c").glob("step_*/manifest.json")), "nothing may be committed"
