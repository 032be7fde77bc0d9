"""Loops that must end: resumed positions inside an accumulation window, loaders that run out before
a step, and the metric a stop's checkpoint records. In-process, one rank, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from harness import Preempted, Session, validate
from harness.checkpoint.layout import LOCK_NAME
from harness.env import DistEnv
from unit.test_stream import NumberStream

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                 master_port=0, source="single")


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body spins for longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still looping after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _config(ckpt_dir: Path, max_steps: int, **checkpoint) -> object:
    return validate({"trainer": {"max_steps": max_steps, "seed": 3, "num_threads": 1},
                     "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1000, **checkpoint}})


def _train_accumulating(ckpt_dir: Path, max_steps: int, batch_size: int, accumulate: int = 4) -> Session:
    data = TensorDataset(torch.randn(2048, 4))
    with Session(_config(ckpt_dir, max_steps), env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session.register(optimizer=optimizer)
        loader = session.loader(data, batch_size=batch_size)
        for micro in session.batches(loader, accumulate=accumulate):
            for (inputs,) in micro:
                model(inputs).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return session


def test_a_resume_inside_an_accumulation_window_restarts_the_window_and_runs_to_the_end(tmp_path, capsys):
    # 3 steps x 4 micro-batches x 32 samples = 384 samples; with 64 per micro-batch that is 6
    # micro-batches: half-way into the second window of 4. The old loop reloaded batch 30 forever.
    _train_accumulating(tmp_path, max_steps=3, batch_size=32)
    with deadline(60):
        session = _train_accumulating(tmp_path, max_steps=20, batch_size=64)
    assert session.step == 20
    said = capsys.readouterr().out
    assert "falls 2 micro-batch(es) into an accumulation window of 4: continuing from batch 4 of epoch 0" in said
    # An epoch is 32 micro-batches of 64 = 8 steps: steps 4-10 finish epoch 0 from batch 4, steps
    # 11-18 are epoch 1, steps 19-20 start epoch 2.
    assert (session.progress.epoch, session.progress.batch_in_epoch) == (2, 8)


def test_a_stream_with_fewer_batches_than_one_step_raises_instead_of_spinning(tmp_path):
    cfg = _config(tmp_path, max_steps=10)
    with deadline(60), pytest.raises(ValueError, match="fewer than accumulate=3 batches, so not one step"):
        with Session(cfg, env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            loader = session.loader(NumberStream(length=6), batch_size=4)  # 2 batches per pass
            for _ in session.batches(loader, accumulate=3):
                model.zero_grad()


def test_a_stream_that_ends_mid_window_starts_the_next_epoch(tmp_path):
    cfg = _config(tmp_path, max_steps=6)
    with deadline(60), Session(cfg, env=SINGLE) as session:
        session.prepare(torch.nn.Linear(2, 1))
        loader = session.loader(NumberStream(length=20), batch_size=4)  # 5 batches: 2 steps of 2
        epochs = [session.progress.epoch for _ in session.batches(loader, accumulate=2)]
    assert epochs == [0, 0, 1, 1, 2, 2]


def test_a_stops_checkpoint_records_the_best_metric_logged_in_its_step(tmp_path):
    cfg = _config(tmp_path, max_steps=50, best_metric="loss", keep_best=1, keep_last=1)
    with pytest.raises(Preempted) as stopped:
        with Session(cfg, env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            loader = session.loader(NumberStream(length=200), batch_size=4)
            for batch in session.batches(loader):
                loss = model(batch).pow(2).mean()
                session.log(loss=loss)
                if session.step == 6:
                    session.request_stop()
    step = stopped.value.step
    manifest = json.loads((tmp_path / f"step_{step:09d}" / "manifest.json").read_text())
    assert manifest["metric"] is not None and manifest["metric"] > 0, manifest


def _train_with_values(ckpt_dir: Path, max_steps: int, kept) -> Session:
    with Session(_config(ckpt_dir, max_steps), env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        session.register(kept=kept)
        for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)):
            model(batch).sum().backward()
            kept.best_acc1 = max(kept.best_acc1, float(session.step))
            kept.history.append(session.step)
    return session


def test_plain_values_in_harness_values_come_back_on_a_resume(tmp_path):
    """A loop's plain values (best_acc1, a hand-annealed lr, best_val_loss starting at inf) resume
    with the run; one added to the script since the checkpoint keeps its new default."""
    import harness

    kept = harness.Values(best_acc1=0.0, lr=20.0, best_val_loss=float("inf"), history=[])
    _train_with_values(tmp_path, 3, kept)
    kept.lr = 5.0  # annealed by the loop after the last save: not in the checkpoint
    resumed = harness.Values(best_acc1=0.0, lr=20.0, best_val_loss=0.0, history=[], added_later="default")
    session = _train_with_values(tmp_path, 5, resumed)
    assert session.resumed_from.step == 3
    assert resumed.lr == 20.0 and resumed.best_val_loss == float("inf") and resumed.added_later == "default"
    assert resumed.history == [0, 1, 2, 3, 4] and resumed.best_acc1 == 4.0
    assert "Values" in dir(harness)


def test_registering_a_plain_value_says_how_to_keep_it(tmp_path):
    with Session(_config(tmp_path, 1), env=SINGLE) as session:
        session.prepare(torch.nn.Linear(2, 1))
        with pytest.raises(TypeError, match=r"'best_acc1' \(float\) has no state_dict\(\)/load_state_dict\(\)\. "
                                            r"HINT: keep plain values in harness\.Values\(best_acc1=\.\.\.\)"):
            session.register(best_acc1=0.0)
        with pytest.raises(ValueError, match="session.prepare registers the model it prepares as 'model'"):
            session.register(model=torch.nn.Linear(2, 1))


def test_a_folder_holding_another_models_run_is_a_clear_error(tmp_path):
    """Another script (another model) pointed at a run's folder: a CheckpointError naming the misfit
    and what to do (the worker prints it in one line), not load_state_dict's traceback."""
    from harness import CheckpointError

    _train_with_values(tmp_path, 2, __import__("harness").Values(best_acc1=0.0, history=[]))
    with Session(_config(tmp_path, 4), env=SINGLE) as session:
        session.prepare(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)))
        loader = session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)
        with pytest.raises(CheckpointError, match=r"the checkpoint's 'model' does not fit this run's Sequential: "
                                                  r"Error\(s\) in loading state_dict.*HINT: the folder holds a run "
                                                  r"of another model or script"):
            next(iter(session.batches(loader)))


def test_a_resume_with_changed_training_settings_names_them(tmp_path, capsys):
    """Resuming with another seed or script argument is allowed, and said: the run is no longer the
    one it would have been. The same settings say nothing."""
    def run(max_steps: int, seed: int, args: list[str]) -> str:
        cfg = validate({"trainer": {"max_steps": max_steps, "seed": seed, "num_threads": 1},
                        "checkpoint": {"dir": str(tmp_path), "every_steps": 1000}, "script_args": args})
        with Session(cfg, env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)):
                model(batch).sum().backward()
        return capsys.readouterr().out

    run(2, 3, ["--lr=3"])
    same = run(3, 3, ["--lr=3"])
    assert "resumed from" in same and "settings that differ" not in same
    changed = run(4, 4, ["--lr=10"])
    assert ("note: the run resumes with settings that differ from its checkpoint's: "
            "script_args ['--lr=3'] -> ['--lr=10']; trainer.seed 3 -> 4. It continues with them where "
            "the script reads them (state restored from the checkpoint, such as an optimizer's or a "
            "scheduler's learning rate, keeps its saved values)") in changed, changed
    # A long argument list: only what changed is named (a value with its flag), however long the list.
    run(5, 4, ["--model=resnet18", "--dist-bn=none", "--eval-generator", "--lr", "3e-3", "--warmup-epochs=5"])
    longer = run(6, 4, ["--model=resnet18", "--dist-bn=none", "--eval-generator", "--lr", "5e-3", "--warmup-epochs=0"])
    assert ("script_args ['--lr', '3e-3'] -> ['--lr', '5e-3']; script_args ['--warmup-epochs=5'] -> "
            "['--warmup-epochs=0']. It continues") in longer, longer


def test_a_scripts_run_compares_no_task_settings():
    """task.* configures the built-in loop only: a script's run that changed it changed nothing."""
    from harness.checkpoint.manager import _training_settings

    config = {"script": "train.py", "script_args": [], "task": {"scheduler": {"T_max": 20}}, "trainer": {"seed": 1}}
    assert _training_settings(config) == {"script": "train.py", "script_args": [], "trainer.seed": 1}
    assert "task.scheduler.T_max" in _training_settings(config | {"script": None})


def test_changed_script_arguments_are_named_as_added_removed_or_changed():
    from harness.checkpoint.manager import _change

    assert _change("script_args", ["--out=x"], ["--out=x", "--lr=1e-3"]) == "script_args added ['--lr=1e-3']"
    assert _change("script_args", ["--out=x", "--fast"], ["--out=x"]) == "script_args removed ['--fast']"
    assert _change("script_args", ["--lr", "3", "--out=x"], ["--lr", "5", "--out=x"]) == \
        "script_args ['--lr', '3'] -> ['--lr', '5']"


def test_a_resume_over_a_dataset_of_another_size_warns_that_the_epoch_order_changed(tmp_path, capsys):
    """Samples added to (or removed from) the dataset between launches: the saved position counts
    batches of the old order, so the resumed epoch repeats some samples and skips others. Said once;
    the same size says nothing, and the next resume compares with the new size."""
    def run(max_steps: int, samples: int) -> str:
        with Session(_config(tmp_path, max_steps), env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(samples, 2)), batch_size=4)):
                model(batch).sum().backward()
        return capsys.readouterr().out

    run(3, 40)
    grown = run(5, 44)
    assert ("WARNING: the dataset held 40 samples at the checkpoint and holds 44 now: epoch 0 continues "
            "at batch 3 of an order drawn over the new dataset") in grown, grown
    assert "WARNING: the dataset" not in run(6, 44)
    assert "WARNING: the dataset held 44 samples at the checkpoint and holds 40 now" in run(7, 40)


def test_registering_after_the_run_started_is_an_error_not_a_state_that_is_never_restored(tmp_path):
    """The resume runs at the first batch: an object registered later would be saved at every
    checkpoint but never restored, so its state would silently restart on every resume."""
    with Session(_config(tmp_path, 2), env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(8, 2)), batch_size=4)):
            with pytest.raises(RuntimeError, match=r"session.register\(optimizer=...\) after the run started.*"
                                                   r"HINT: register every object before the training loop"):
                session.register(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _train_per_rank(ckpt_dir: Path, max_steps: int, carry=None) -> Session:
    with Session(_config(ckpt_dir, max_steps), env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        if carry is not None:
            session.register_per_rank(carry=carry)
        for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)):
            model(batch).sum().backward()
            if carry is not None:
                carry.seen.append(session.step)
    return session


def test_per_rank_state_comes_back_and_a_checkpoint_without_it_is_a_clear_error(tmp_path, capsys):
    import harness
    from harness import CheckpointError
    from harness.ckpt import describe

    _train_per_rank(tmp_path / "with", 3, harness.Values(seen=[]))
    resumed = harness.Values(seen=[])
    session = _train_per_rank(tmp_path / "with", 5, resumed)
    assert resumed.seen == [0, 1, 2, 3, 4]
    assert "carry@rank0" in describe(str(tmp_path / "with"))["groups"]  # inspect and diff see it
    # Saved by 2 ranks, resumed by 1: the state cannot be dealt out, so it is kept and the resume says so.
    capsys.readouterr()
    session.checkpoints._load_per_rank([{"carry": {"seen": [0]}}, {"carry": {"seen": [1]}}])
    assert resumed.seen == [0, 1, 2, 3, 4]
    assert ("WARNING: the per-rank state of ['carry'] was saved by 2 ranks, this run has 1: each rank keeps "
            "the state it starts with") in capsys.readouterr().out
    _train_per_rank(tmp_path / "without", 3)
    with pytest.raises(CheckpointError, match=r"the checkpoint has no state for \['carry'\]"):
        _train_per_rank(tmp_path / "without", 5, harness.Values(seen=[]))


def test_a_folder_whose_every_checkpoint_is_damaged_is_refused_not_trained_over(tmp_path):
    """Every complete checkpoint fails verification: starting fresh would write step 1, 2, ... over
    the evidence and throw the run's progress away unseen, so the resume stops with an error and
    touches nothing. A folder whose only checkpoint has no manifest (a crash during the first save)
    still starts fresh: that is the normal way a first save dies."""
    from harness import CheckpointError

    def run(max_steps: int) -> Session:
        with Session(_config(tmp_path, max_steps, every_steps=1), env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)):
                model(batch).sum().backward()
        return session

    run(2)
    payloads = sorted(tmp_path.glob("step_*/state.safetensors"))
    assert len(payloads) == 2
    for payload in payloads:
        os.truncate(payload, 100)
    def files() -> dict:  # the run's files; the lock says who holds the folder now, and may change
        return {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != LOCK_NAME}

    before = files()
    with pytest.raises(CheckpointError, match=r"every complete checkpoint in .* failed verification "
                                              r"\(step_000000002, step_000000001;.*HINT: restore the folder"):
        run(3)
    assert files() == before
    for manifest in tmp_path.glob("step_*/manifest.json"):  # the control: saves that never committed
        manifest.unlink()
    assert run(3).resumed_from is None


def test_init_from_takes_a_run_folder_and_names_a_missing_or_damaged_source_in_one_error(tmp_path):
    """init_from accepts what the ckpt tools accept (a file, a checkpoint folder, a run's folder: its
    newest whole checkpoint) and refuses a missing path or a truncated checkpoint by name, before
    any tensor is read (was: FileNotFoundError, IsADirectoryError or a zip reader's traceback)."""
    from harness import CheckpointError

    def run(ckpt_dir: Path, max_steps: int, **checkpoint) -> torch.nn.Module:
        with Session(_config(ckpt_dir, max_steps, **checkpoint), env=SINGLE) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            for (batch,) in session.batches(session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)):
                model(batch).sum().backward()
                with torch.no_grad():
                    model.weight.add_(0.1)
        return model

    source = tmp_path / "source"
    trained = run(source, 3)
    started = run(tmp_path / "from-run-folder", 1, init_from=str(source))
    assert torch.equal(started.weight, trained.weight + 0.1)  # the source's step 3, then one step
    with pytest.raises(CheckpointError, match=r"checkpoint.init_from=.*/nowhere: no such file or folder"):
        run(tmp_path / "missing", 1, init_from=str(tmp_path / "nowhere"))
    step = source / "step_000000003"
    os.truncate(step / "state.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"step_000000003/state.safetensors: 100 bytes, manifest says"):
        run(tmp_path / "damaged", 1, init_from=str(step))


def test_an_epoch_loop_around_batches_is_an_error_after_the_first_pass(tmp_path):
    """batches() runs every epoch up to max_steps; a ported `for epoch in range(n):` around it ran
    once and then, silently, ran its per-epoch body n-1 more times after training (a scheduler
    stepped 5 times too many in a GAN port). The second call says so."""
    with Session(_config(tmp_path, 8), env=SINGLE) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        loader = session.loader(TensorDataset(torch.randn(16, 2)), batch_size=4)  # 4 steps per epoch
        steps = [session.step for _ in session.batches(loader)]
        assert steps == list(range(8)) and session.epoch == 1
        with pytest.raises(RuntimeError, match=r"called again after it ran to trainer.max_steps=8.*HINT: drop the "
                                               r"epoch loop"):
            next(iter(session.batches(loader)))
