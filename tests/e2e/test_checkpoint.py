"""Checkpoints: exact resume, crash consistency, corrupt-file fallback, portability, safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (STEPS, assert_diverges_after, assert_resumed_from, assert_same_training, assert_tensors_equal,
                      kill_tree, metrics, newest_payload, payload_file, read_step, resumed_steps, rewrite_payload,
                      run_launch, skip_unless_required, start_launch, steps_with_saves, uninterrupted_run, wait_for,
                      worker_pids)
from harness.ckpt import main as ckpt_main
from harness.checkpoint.keys import match_state, rename_prefixes, unwrap_model
from harness.checkpoint.format import UnsafeCheckpoint, torch_load
from harness.checkpoint.payload import extract_model_state
from harness.checkpoint import checksum
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.layout import CheckpointRef
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.storage.local import LocalStorage


def _first_leg(ckpt_dir: Path, stop_step: int, *overrides: str) -> None:
    """Train the shared configuration but stop after ``stop_step`` (same LR schedule: T_max fixed)."""
    result = run_launch(ckpt_dir, f"trainer.max_steps={stop_step}", f"task.scheduler.T_max={STEPS}",
                        f"checkpoint.every_steps={stop_step}", *overrides)
    assert result.returncode == 0, result.stderr
    assert steps_with_saves(ckpt_dir)[-1] == stop_step


@pytest.mark.parametrize("stop_step, options", [
    (45, ()), (64, ()), (45, ("checkpoint.async_save=true", "task.meta_init=true"))],
    ids=["mid-epoch", "epoch-boundary", "mid-epoch-async-writer-meta-init"])
def test_resume_is_bit_exact(request, tmp_path, reference, stop_step, options):
    if stop_step == RESUME_STEP and not options:
        ckpt_dir, output = request.getfixturevalue("plain_resumed")  # also read by the inspect test
    else:
        ckpt_dir = tmp_path / "ckpt"
        _first_leg(ckpt_dir, stop_step, *options)
        output = _resume(ckpt_dir, *options)
    assert_resumed_from(output, ckpt_dir, stop_step)
    # The first leg ran with max_steps=stop_step: the resume says what that changes.
    assert f"WARNING: trainer.max_steps changed from {stop_step} to {STEPS}" in output
    assert_same_training(ckpt_dir, reference)


def _resume(ckpt_dir: Path, *options: str) -> str:
    """Resume a first leg to the end (exit 0); its output."""
    result = run_launch(ckpt_dir, f"task.scheduler.T_max={STEPS}", *options)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_checkpoint_in_the_torch_save_format_of_earlier_versions_still_resumes_bit_exact(tmp_path, reference,
                                                                                       plain_leg):
    """What harness wrote before the flat format: state.pt by torch.save, its sha256 in the manifest."""
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(plain_leg, ckpt_dir)
    step_dir = ckpt_dir / "step_000000045"
    torch.save(read_step(ckpt_dir, 45), step_dir / "state.pt")
    (step_dir / "state.safetensors").unlink()
    old = (step_dir / "state.pt").read_bytes()
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"] = {"state.pt": {"bytes": len(old), "sha256": hashlib.sha256(old).hexdigest()}}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt_main(["verify", str(ckpt_dir)]) == 0
    result = run_launch(ckpt_dir, f"task.scheduler.T_max={STEPS}")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {ckpt_dir}/step_000000045 at step 45" in result.stdout
    assert "skipping corrupt" not in result.stderr
    assert_same_training(ckpt_dir, reference)
    assert (ckpt_dir / "step_000000160" / "state.safetensors").exists()  # new saves use the flat format


# ----- negative controls: a resume that loses one piece of state must differ ------------------------
# Each control resumes from a copy of a first leg whose checkpoint lost one thing (as if it were not
# saved or not restored), and shows the losses equal the reference up to the resume and differ from a
# known step on: the comparisons above can see that thing. verify=false: the payload was rewritten.

# fp16 with a loss that overflows at GradScaler's initial scale (the scale then changes), an EMA, and
# draws from the main process's Python and numpy RNGs (tests/tasks.py).
CONTROLS = ("trainer.precision=fp16", "trainer.ema_decay=0.99", "task.loss=tests.tasks.loss_for_controls")
RESUME_STEP = 45


@pytest.fixture(scope="module")
def plain_leg(tmp_path_factory) -> Path:
    """The shared configuration stopped at RESUME_STEP (tests copy it before changing it)."""
    ckpt_dir = tmp_path_factory.mktemp("plain-leg") / "ckpt"
    _first_leg(ckpt_dir, RESUME_STEP)
    return ckpt_dir


@pytest.fixture(scope="module")
def plain_resumed(tmp_path_factory, plain_leg) -> tuple[Path, str]:
    """A copy of ``plain_leg`` resumed to the end: (its checkpoint folder, the resume's output)."""
    ckpt_dir = tmp_path_factory.mktemp("plain-resumed") / "ckpt"
    shutil.copytree(plain_leg, ckpt_dir)
    return ckpt_dir, _resume(ckpt_dir)


@pytest.fixture(scope="module")
def controls_leg(tmp_path_factory) -> Path:
    ckpt_dir = tmp_path_factory.mktemp("controls-leg") / "ckpt"
    _first_leg(ckpt_dir, RESUME_STEP, *CONTROLS)
    return ckpt_dir


@pytest.fixture(scope="module")
def controls_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, "controls-reference", *CONTROLS)


def _resume_copy(tmp_path: Path, leg: Path, tamper: Callable[[dict], None], *overrides: str) -> Path:
    """Copy ``leg``, let ``tamper`` change its checkpoint's payload, resume it to the end."""
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(leg, ckpt_dir)
    step_dir = ckpt_dir / f"step_{RESUME_STEP:09d}"
    payload = read_step(ckpt_dir, RESUME_STEP)
    tamper(payload)
    rewrite_payload(step_dir, payload)
    result = run_launch(ckpt_dir, f"task.scheduler.T_max={STEPS}", "checkpoint.verify=false", *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_resumed_from(result.stdout, ckpt_dir, RESUME_STEP)
    return ckpt_dir


def _nothing(payload: dict) -> None:
    pass


def _swap_rank_rng(payload: dict) -> None:
    payload["rng"] = [payload["rng"][1], payload["rng"][0]]


def _skip_a_batch(payload: dict) -> None:
    payload["progress"]["batch_in_epoch"] += 1


def _fresh_scheduler(payload: dict) -> None:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.003)
    payload["state"]["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS).state_dict()


def _fresh_scaler(payload: dict) -> None:
    payload["state"]["scaler"] = torch.amp.GradScaler("cpu").state_dict()


def _ema_of_the_current_model(payload: dict) -> None:
    payload["state"]["ema"]["shadow"] = {key: value.clone() for key, value in payload["state"]["model"].items()}


def _other_python_rng(payload: dict) -> None:
    for rank, state in enumerate(payload["rng"]):
        state["python"] = random.Random(1000 + rank).getstate()


def _other_numpy_rng(payload: dict) -> None:
    for rank, state in enumerate(payload["rng"]):
        kind, keys, pos, has_gauss, gauss = np.random.RandomState(1000 + rank).get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))


@pytest.mark.parametrize("tamper, key", [
    (_swap_rank_rng, "loss"),  # dropout masks of the first resumed step
    (_skip_a_batch, "loss"),  # the first resumed step trains on the next batch
    (_fresh_scheduler, "lr"),  # the learning rate the first resumed step's scheduler step sets
], ids=["rng-swapped-between-ranks", "data-position-one-batch-on", "scheduler-not-restored"])
def test_resume_that_loses_a_piece_of_state_differs_from_the_first_step_it_affects(
        tmp_path, reference, plain_leg, tamper, key):
    ckpt_dir = _resume_copy(tmp_path, plain_leg, tamper)
    assert_diverges_after(ckpt_dir, reference, RESUME_STEP, RESUME_STEP + 1, key)


def test_resume_restores_the_scaler_ema_and_python_and_numpy_rng_bit_exactly(tmp_path, controls_reference,
                                                                           controls_leg):
    saved = read_step(controls_leg, RESUME_STEP)["state"]
    assert saved["scaler"]["scale"] < torch.amp.GradScaler("cpu").get_scale(), "the scale never changed"
    ckpt_dir = _resume_copy(tmp_path, controls_leg, _nothing, *CONTROLS)
    assert_same_training(ckpt_dir, controls_reference)


@pytest.mark.parametrize("tamper, first_difference", [
    # The initial scale overflows: the first resumed step is skipped, so the next loss differs.
    (_fresh_scaler, RESUME_STEP + 2),
    (_other_python_rng, RESUME_STEP + 1),  # the loss of the first resumed step draws from it
    (_other_numpy_rng, RESUME_STEP + 1),
], ids=["scaler-not-restored", "python-rng-not-restored", "numpy-rng-not-restored"])
def test_resume_that_loses_the_scaler_or_the_main_process_rng_differs(tmp_path, controls_reference, controls_leg,
                                                                      tamper, first_difference):
    ckpt_dir = _resume_copy(tmp_path, controls_leg, tamper, *CONTROLS)
    assert_diverges_after(ckpt_dir, controls_reference, RESUME_STEP, first_difference)


def test_resume_that_loses_the_ema_ends_with_another_ema_and_the_same_model(tmp_path, controls_reference,
                                                                            controls_leg):
    """The EMA never feeds back into training: only the final EMA can show that it was lost."""
    ckpt_dir = _resume_copy(tmp_path, controls_leg, _ema_of_the_current_model, *CONTROLS)
    run, ref = newest_payload(ckpt_dir)["state"], newest_payload(controls_reference)["state"]
    assert_tensors_equal(run["model"], ref["model"], "model")
    assert all(not torch.equal(run["ema"]["shadow"][key], ref["ema"]["shadow"][key])
               for key, value in ref["ema"]["shadow"].items() if value.is_floating_point())


def _save_phase(ckpt_dir: Path) -> str:
    """Where in the save cycle a kill -9 landed, read from what it left on disk."""
    temps = sorted(str(path.relative_to(ckpt_dir)) for path in ckpt_dir.glob("step_*/*.tmp-*"))
    if temps:
        return f"writing {temps[0]}"
    partial = sorted(path.name for path in ckpt_dir.glob("step_*") if not (path / "manifest.json").exists())
    if partial:
        return f"{partial[0]} without its manifest"
    return "between saves"


@pytest.mark.parametrize("writer", ["sync", "async"])
def test_kill_9_at_random_instants_always_resumes_to_the_same_result(tmp_path, reference, writer, capsys,
                                                                        record_property):
    ckpt_dir = tmp_path / "ckpt"
    rng = random.Random(1234)
    # Saves are frequent, so kills land inside them too.
    overrides = ("checkpoint.every_steps=7", f"checkpoint.async_save={writer == 'async'}")
    phases = []
    for attempt in range(2):
        newest = max(steps_with_saves(ckpt_dir), default=None)
        log = tmp_path / f"attempt-{attempt}.log"
        launcher = start_launch(ckpt_dir, *overrides, log_path=log)
        worker_pids(launcher)
        done_before = max(metrics(ckpt_dir), default=0)
        wait_for(lambda: max(metrics(ckpt_dir), default=0) > done_before + 3, what="progress")
        time.sleep(rng.uniform(0.0, 0.25))
        kill_tree(launcher)
        phases.append(_save_phase(ckpt_dir))
        assert not (ckpt_dir / f"step_{STEPS:09d}" / "manifest.json").exists(), "the run ended before the kill"
        # Every relaunch continued from the newest complete checkpoint its predecessor left.
        output = log.read_text()
        if newest is None:
            assert "starting fresh" in output and not resumed_steps(output, ckpt_dir), output
        else:
            assert_resumed_from(output, ckpt_dir, newest)
    record_property("kill_phases", phases)
    print(f"kill -9 landed: {phases}")
    # Whatever was on disk, every complete checkpoint verifies (a save the kill interrupted is listed
    # INCOMPLETE, which fails verify) and the run finishes identically.
    capsys.readouterr()
    code = ckpt_main(["verify", str(ckpt_dir)])
    states = {line.rsplit(": ", 1)[-1] for line in capsys.readouterr().out.splitlines()}
    assert "OK" in states and states <= {"OK", "INCOMPLETE"} and code == (states != {"OK"}), states
    newest = steps_with_saves(ckpt_dir)[-1]
    result = run_launch(ckpt_dir, *overrides)
    assert result.returncode == 0, result.stderr
    assert_resumed_from(result.stdout, ckpt_dir, newest)
    assert "max_steps changed" not in result.stdout  # nothing changed: no warning
    assert_same_training(ckpt_dir, reference)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "no-manifest"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, damage):
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(reference, ckpt_dir)
    (ckpt_dir / "metrics.jsonl").unlink()
    newest = ckpt_dir / "step_000000160"
    payload = payload_file(newest)
    if damage == "truncate":
        os.truncate(payload, payload.stat().st_size // 2)
    elif damage == "flip-byte":
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    if damage != "no-manifest":
        assert ckpt_main(["verify", str(ckpt_dir)]) == 1
    result = run_launch(ckpt_dir)
    assert result.returncode == 0, result.stderr
    if damage != "no-manifest":
        assert f"skipping corrupt checkpoint {ckpt_dir}/step_000000160" in result.stderr
    assert f"resumed from {ckpt_dir}/step_000000120 at step 120" in result.stdout
    assert_tensors_equal(newest_payload(ckpt_dir)["state"], newest_payload(reference)["state"])


def test_store_commit_marks_complete_only_with_manifest(tmp_path):
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    store.commit(10, lambda f: torch.save({"x": torch.ones(3)}, f), {}, payload_name="state.pt")
    (tmp_path / "step_000000020").mkdir()
    (tmp_path / "step_000000020" / "state.pt").write_bytes(b"partial")
    assert [ref.step for ref in store.list_complete()] == [10]
    assert store.latest_valid().step == 10
    store.commit(30, lambda f: torch.save({"x": torch.ones(3)}, f), {}, payload_name="state.pt")
    store.prune(Retention(keep_last=5))
    assert not (tmp_path / "step_000000020").exists(), "a crashed partial save was not cleaned up"
    assert not list(tmp_path.rglob("*.tmp-*"))


def _ref(step: int, metric=None) -> CheckpointRef:
    return CheckpointRef(step=step, name=f"step_{step:09d}", manifest={"metric": metric})


def test_retention_keeps_last_every_nth_and_best():
    refs = [_ref(s, metric=m) for s, m in [(10, 0.9), (20, 0.2), (30, 0.5), (40, 0.1), (50, 0.7), (60, 0.8)]]
    delete = lambda policy: [r.step for r in policy.to_delete(refs)]
    assert delete(Retention(keep_last=2)) == [10, 20, 30, 40]
    assert delete(Retention(keep_last=2, keep_every=20)) == [10, 30]
    assert delete(Retention(keep_last=1, keep_best=2, best_mode="min")) == [10, 30, 50]
    assert delete(Retention(keep_last=1, keep_best=1, best_mode="max")) == [20, 30, 40, 50]
    assert delete(Retention(keep_last=0)) == []


def test_retention_never_deletes_the_checkpoint_just_written():
    # Later steps on disk (another run in the folder, or a corrupt newest one that resume skipped)
    # must not push the new checkpoint out.
    refs = [_ref(s) for s in (1000, 1100, 1200, 100, 90, 80)]
    assert [r.step for r in Retention(keep_last=3).to_delete(refs, current=100)] == []
    assert [r.step for r in Retention(keep_last=1).to_delete(refs, current=100)] == [80, 90]


def test_retention_is_computed_from_disk_across_restarts(tmp_path, reference):
    ckpt_dir = tmp_path / "ckpt"
    _first_leg(ckpt_dir, 40)  # writes step 40 with keep_last=0 (keep all)
    result = run_launch(ckpt_dir, "checkpoint.keep_last=2", "checkpoint.every_steps=20")
    assert result.returncode == 0, result.stderr
    assert steps_with_saves(ckpt_dir) == [140, 160]


def _mount_small_disk(path: Path, kind: str) -> None:
    """A real 1-2 MB filesystem: tmpfs or loop-mounted ext4."""
    path.mkdir()
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(path)]
    else:
        image = path.parent / "disk.img"
        subprocess.run(["truncate", "-s", "2M", str(image)], check=True)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
        if made.returncode != 0:
            skip_unless_required(f"mkfs.ext4 unavailable: {made.stderr.decode().strip()}")
        command = ["mount", "-o", "loop", str(image), str(path)]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        skip_unless_required(f"cannot mount a small {kind} here (needs root): {result.stderr.decode().strip()}")


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"], ids=["buffered-tmpfs", "odirect-ext4"])
@pytest.mark.parametrize("failure", ["disk-full", "read-only"])
def test_write_failure_is_clear_and_keeps_the_previous_checkpoint(tmp_path, failure, kind):
    mount = tmp_path / "disk"
    _mount_small_disk(mount, kind)
    try:
        # tmpfs takes the buffered path by choice: Linux 6.6+ supports O_DIRECT on tmpfs too.
        store = CheckpointStore(LocalStorage(str(mount), direct=kind == "ext4"))
        store.commit(1, lambda f: torch.save({"w": torch.zeros(1000)}, f), {}, payload_name="state.pt")
        # The ring of aligned buffers exists only once a write went through O_DIRECT.
        assert (store.storage._ring is not None) == (kind == "ext4"), "not the write path this case names"
        if failure == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        big = {"w": torch.zeros(1_000_000)}  # 4 MB: does not fit on the small disk
        with pytest.raises(CheckpointError, match=r"step 2 .*previous checkpoint \(step 1\) is intact"):
            store.commit(2, lambda f: torch.save(big, f), {}, payload_name="state.pt")
        assert [ref.step for ref in store.list_complete()] == [1]
        assert store.problems(store.latest_listed()) == []
        assert not list(mount.rglob("*.tmp-*")), "a partial temp file was left behind"
    finally:
        subprocess.run(["umount", str(mount)])


def test_odirect_and_buffered_writes_produce_the_same_file(odirect_dir):
    tmp_path = odirect_dir
    payload = {"w": torch.randn(3_000_001), "n": torch.arange(7)}  # not a multiple of the alignment
    digests = []
    for direct in (True, False):
        storage = LocalStorage(str(tmp_path / str(direct)), direct=direct)
        size, digest = storage.write("state.pt", lambda f: torch.save(payload, f))
        # The ring of aligned buffers exists only once a write went through O_DIRECT.
        assert (storage._ring is not None) == direct, "O_DIRECT was not used where the filesystem has it"
        written = (tmp_path / str(direct) / "state.pt").read_bytes()
        assert size == len(written) and digest == checksum.of_bytes(written)
        assert_tensors_equal(torch.load(tmp_path / str(direct) / "state.pt", weights_only=True), payload)
        digests.append(digest)
    assert digests[0] == digests[1]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)


def test_prefixes_never_reach_a_file_and_old_prefixed_files_still_load(tmp_path):
    torch.manual_seed(0)
    source = _Net()
    wrapped = torch.compile(nn.DataParallel(torch.compile(source)))  # nesting of both prefixes
    prefixed = wrapped.state_dict()
    assert all(key.startswith("_orig_mod.module._orig_mod.") for key in prefixed)
    assert set(unwrap_model(wrapped).state_dict()) == set(source.state_dict())
    torch.save(prefixed, tmp_path / "old.pt")
    fresh = _Net()
    assert not torch.equal(fresh.encoder.weight, source.encoder.weight)  # negative control
    loaded = extract_model_state(torch_load(str(tmp_path / "old.pt")), "old.pt")
    fresh.load_state_dict(loaded)
    assert_tensors_equal(fresh.state_dict(), source.state_dict())


def test_ddp_prefix_is_stripped_and_layouts_are_recognised(tmp_path):
    import torch.distributed as dist
    from harness.env import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = _Net()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(key.startswith("module.") for key in ddp.state_dict())
        for layout in ({"model": ddp.state_dict()}, {"state_dict": ddp.state_dict()}, ddp.state_dict()):
            assert_tensors_equal(extract_model_state(layout, "x"), model.state_dict())
    finally:
        dist.destroy_process_group()


def test_rename_and_shape_mismatch_report():
    model = _Net()
    pretrained = {"backbone.weight": torch.zeros(3, 4), "backbone.bias": torch.zeros(3),
                  "head.weight": torch.zeros(5, 3), "extra": torch.zeros(1)}
    renamed = rename_prefixes(pretrained, {"backbone.": "encoder."})
    loadable, report = match_state(model.state_dict(), renamed)
    assert set(loadable) == {"encoder.weight", "encoder.bias"}
    assert report.missing == ["head.bias"]  # head.weight is in the file, with the wrong shape
    assert report.unexpected == ["extra"]
    assert report.mismatched == ["head.weight: file (5, 3) vs model (2, 3)"]
    assert "shape mismatch" in report.format()


def test_init_from_loads_weights_with_renames_and_strict_fails(tmp_path):
    src = tmp_path / "pretrained.pt"
    torch.manual_seed(3)
    from harness.example import MLP

    donor = MLP()
    torch.save({"model": {f"backbone.{k}": v for k, v in donor.state_dict().items()}}, src)
    ckpt_dir = tmp_path / "ckpt"
    result = run_launch(ckpt_dir, f"checkpoint.init_from={src}", "+checkpoint.init_rename={backbone.: ''}",
                        "trainer.max_steps=1", "checkpoint.init_strict=true")
    assert result.returncode == 0, result.stderr
    assert "initialised 6 tensors" in result.stdout and "all keys matched" in result.stdout
    strict = run_launch(tmp_path / "ckpt2", f"checkpoint.init_from={src}", "checkpoint.init_strict=true",
                        "trainer.max_steps=1")
    assert strict.returncode == 1
    assert "missing in file (6)" in strict.stderr and "unexpected in file (6)" in strict.stderr


class _Payload:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_only_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": _Payload(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match="checkpoint.unsafe_load=true"):
        torch_load(str(evil))
    assert not marker.exists(), "loading ran code from the file"
    assert ckpt_main(["inspect", str(evil)]) == 1
    assert not marker.exists()


def _restore_in_process(ckpt_dir: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The example's model and optimizer restored from ``ckpt_dir`` by a one-rank Session in this
    process (it has nothing left to train: max_steps is the checkpoint's step)."""
    from harness import Session
    from harness.config import validate
    from harness.env import DistEnv
    from harness.example import MLP, SyntheticClassification

    single = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, source="single")
    cfg = validate({"trainer": {"max_steps": steps_with_saves(ckpt_dir)[-1], "num_threads": 1},
                    "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1000}})
    with Session(cfg, env=single) as session:
        model = session.prepare(MLP())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
        session.register(optimizer=optimizer, scheduler=scheduler)
        assert not list(session.batches(session.loader(SyntheticClassification(), batch_size=32)))
        assert session.resumed_from is not None and session.resumed_from.step == session.step
    return model, optimizer


def test_other_world_size_resumes_with_a_warning(tmp_path, plain_leg):
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(plain_leg, ckpt_dir)
    # One rank restores exactly the weights and optimizer state that two ranks saved.
    saved = read_step(ckpt_dir, 45)["state"]
    copy = tmp_path / "copy"
    shutil.copytree(ckpt_dir, copy)
    model, optimizer = _restore_in_process(copy)
    assert_tensors_equal(model.state_dict(), saved["model"], "model")
    assert_tensors_equal(optimizer.state_dict(), saved["optimizer"], "optimizer")
    result = run_launch(ckpt_dir, "launcher.nproc_per_node=1", "trainer.max_steps=50", f"task.scheduler.T_max={STEPS}")
    assert result.returncode == 0, result.stderr
    assert "checkpoint was written by 2 ranks, this run has 1" in result.stdout
    assert_resumed_from(result.stdout, ckpt_dir, 45)
    payload = newest_payload(ckpt_dir)
    assert payload["progress"]["step"] == 50 and len(payload["rng"]) == 1
    assert payload["progress"]["batch_in_epoch"] == 13 * 2 + 5  # 13 batches x 2 ranks remapped, +5 steps


def test_other_world_size_with_the_same_samples_per_step_matches_the_reference_to_rounding(tmp_path,
                                                                                         tmp_path_factory):
    """2 ranks x 32 samples, then 1 rank x 64: the same samples per step, so without dropout (the only
    per-rank randomness) the run differs from an uninterrupted one by reduction order alone."""
    no_dropout = "task.model.dropout=0.0"  # as tests/e2e/test_world_size.py: one reference serves both
    reference = uninterrupted_run(tmp_path_factory, "no-dropout-reference", no_dropout)
    ckpt_dir = tmp_path / "ckpt"
    _first_leg(ckpt_dir, 45, no_dropout)
    result = run_launch(ckpt_dir, "launcher.nproc_per_node=1", "task.batch_size=64", no_dropout,
                        f"task.scheduler.T_max={STEPS}")
    assert result.returncode == 0, result.stderr
    assert "the sample stream and its augmentations continue exactly" in result.stdout
    assert_resumed_from(result.stdout, ckpt_dir, 45)
    run, ref = newest_payload(ckpt_dir), newest_payload(reference)
    assert run["progress"]["step"] == ref["progress"]["step"] == STEPS
    assert run["progress"]["epoch"] == ref["progress"]["epoch"]
    differs = False
    for name in ("model", "optimizer"):
        for key, ours, theirs in _tensor_leaves(run["state"][name], ref["state"][name]):
            assert torch.allclose(ours.double(), theirs.double(), rtol=1e-4, atol=1e-6), f"{name}{key} differs"
            differs |= not torch.equal(ours, theirs)
    assert differs, "bit-identical: the resize did not change the reduction order, so this proves nothing"


def _tensor_leaves(a, b, path: str = ""):
    """(path, a's tensor, b's tensor) for every tensor of two nested states with the same structure."""
    if isinstance(a, torch.Tensor):
        yield path, a, b
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for key in a:
            yield from _tensor_leaves(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _tensor_leaves(x, y, f"{path}/{index}")


def test_ckpt_inspect_json_reports_step_and_identical_digests_for_identical_training(plain_resumed, reference,
                                                                                    capsys):
    ckpt_dir, _ = plain_resumed
    reports = []
    for path in (ckpt_dir, reference / "step_000000160"):
        assert ckpt_main(["inspect", str(path), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["step"] == reports[1]["step"] == STEPS
    assert reports[0]["digests"] == reports[1]["digests"]
    assert reports[0]["digests"]["model"] != json.loads(_inspect(ckpt_dir / "step_000000045", capsys))["digests"]["model"]


def _inspect(path, capsys) -> str:
    assert ckpt_main(["inspect", str(path), "--json"]) == 0
    return capsys.readouterr().out


def test_ckpt_tools_give_clear_errors(tmp_path, capsys):
    assert ckpt_main(["inspect", str(tmp_path / "missing.pt")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert ckpt_main(["inspect", str(tmp_path / "notes.txt")]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert ckpt_main(["inspect", str(tmp_path)]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
