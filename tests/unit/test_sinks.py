"""Sinks (harness.sinks): one TensorBoard run and one W&B run across restarts, no step twice, a
failing sink never stops training, the optional packages stay optional."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import tensorboard_points
from harness.config import ConfigError, validate
from harness.progress import ProgressReporter
from harness.sinks import MetricsFile, TensorBoardSink, purge_rows_after, wandb_run_id

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **log) -> dict:
    return {"name": "sinks", "launcher": {"backend": "direct"},
            "checkpoint": {"dir": str(tmp_path / "ckpt")}, "log": log}


def _rows(first: int, last: int, offset: float) -> list[tuple[int, dict[str, float]]]:
    return [(step, {"loss": step + offset}) for step in range(first, last + 1)]


def test_tensorboard_purge_keeps_each_step_once_with_the_resumed_launchs_values(tmp_path):
    folder = tmp_path / "tb"
    first = TensorBoardSink(str(folder), resumed_step=0)
    first.write(_rows(1, 8, offset=0.5))  # then "killed" after step 8, its last checkpoint at step 5
    first.close()
    resumed = TensorBoardSink(str(folder), resumed_step=5)
    resumed.write(_rows(6, 12, offset=0.25))
    resumed.close()
    # The steps both launches logged (6, 7, 8) are there once, with the resumed launch's values.
    assert tensorboard_points(folder) == [(step, step + (0.5 if step <= 5 else 0.25)) for step in range(1, 13)]
    # Negative control: the raw files do hold 6, 7 and 8 twice; the purge is what hides them.
    raw = [step for step, _ in tensorboard_points(folder, purge=False)]
    assert sorted(raw) == sorted(list(range(1, 13)) + [6, 7, 8])


def test_without_purge_step_tensorboard_shows_the_repeated_steps_twice(tmp_path):
    """The control for the test above: the same two launches written without purge_step."""
    folder = tmp_path / "tb"
    for rows in (_rows(1, 8, offset=0.5), _rows(6, 12, offset=0.25)):
        writer = SummaryWriter(log_dir=str(folder))
        for step, values in rows:
            writer.add_scalar("loss", values["loss"], global_step=step)
        writer.close()
    steps = [step for step, _ in tensorboard_points(folder)]
    assert sorted(steps) == sorted(list(range(1, 13)) + [6, 7, 8])


def test_a_fresh_start_hides_what_earlier_launches_logged_in_the_folder(tmp_path):
    folder = tmp_path / "tb"
    old = TensorBoardSink(str(folder), resumed_step=0)
    old.write(_rows(1, 4, offset=0.5))
    old.close()
    fresh = TensorBoardSink(str(folder), resumed_step=0)
    fresh.write(_rows(1, 2, offset=0.25))
    fresh.close()
    assert tensorboard_points(folder) == [(1, 1.25), (2, 2.25)]


class _BrokenSink:
    """A sink whose writes fail like a full disk."""

    name = "a broken sink"

    def __init__(self):
        self.writes = 0
        self.closed = False

    def write(self, rows):
        self.writes += 1
        raise OSError(28, "No space left on device")

    def close(self):
        self.closed = True


def _metric_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_the_metrics_file_opened_at_a_resumed_step_drops_the_rows_logged_past_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsFile(str(path), resumed_step=0)
    first.write(_rows(1, 8, offset=0.5))  # then "killed" after step 8, its last checkpoint at step 5
    first.close()
    with open(path, "a") as torn:
        torn.write('{"step": 9, "lo')  # a write cut short by the kill
    resumed = MetricsFile(str(path), resumed_step=5)
    resumed.write(_rows(6, 12, offset=0.25))
    resumed.close()
    assert _metric_steps(path) == list(range(1, 13))
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == \
        [step + (0.5 if step <= 5 else 0.25) for step in range(1, 13)]


def test_a_metrics_file_opened_to_append_repeats_the_replayed_steps(tmp_path):
    """The control for the test above: without the resumed step the replayed rows are there twice."""
    path = tmp_path / "metrics.jsonl"
    for rows in (_rows(1, 8, offset=0.5), _rows(6, 12, offset=0.25)):
        sink = MetricsFile(str(path))
        sink.write(rows)
        sink.close()
    assert _metric_steps(path) == list(range(1, 9)) + list(range(6, 13))


def test_purging_the_metrics_file_keeps_foreign_lines_and_a_fresh_start_empties_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n# a note\n{"step": 2, "loss": 2.0}\n')
    assert purge_rows_after(str(path), 1) == 1
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n# a note\n'
    assert purge_rows_after(str(path), 1) == 0  # nothing past it: the file is not rewritten
    MetricsFile(str(path), resumed_step=0).close()
    assert path.read_text() == "# a note\n"
    assert purge_rows_after(str(tmp_path / "missing.jsonl"), 3) == 0


def test_a_failing_sink_warns_once_and_the_other_sinks_keep_every_step(tmp_path, caplog):
    broken = _BrokenSink()
    metrics = MetricsFile(str(tmp_path / "metrics.jsonl"))
    reporter = ProgressReporter(total_steps=10, start_step=0, log_every=2, enabled=True,
                                sinks=[broken, metrics], stream=open(tmp_path / "out.txt", "w"))
    with caplog.at_level(logging.WARNING, logger="harness"):
        for step in range(1, 11):
            reporter.update(step, {"loss": float(step)})
        reporter.close()
    warnings = [record.getMessage() for record in caplog.records if "a broken sink" in record.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert broken.writes == 1 and broken.closed
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10


def test_the_wandb_run_id_is_stored_once_per_checkpoint_folder(tmp_path):
    first = wandb_run_id(str(tmp_path / "a"))
    assert (tmp_path / "a" / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(str(tmp_path / "a")) == first  # a requeue, a restart: the same run
    assert wandb_run_id(str(tmp_path / "b")) != first  # another folder: another run
    renewed = wandb_run_id(str(tmp_path / "a"), renew=True)  # checkpoint.resume=false: starts over
    assert renewed != first and wandb_run_id(str(tmp_path / "a")) == renewed


@pytest.mark.parametrize("key, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_enabling_a_sink_whose_package_is_missing_names_the_extra(tmp_path, monkeypatch, key, extra):
    validate(_config(tmp_path, **{key: True}))  # installed here (the dev extra)
    monkeypatch.setitem(sys.modules, extra, None)  # what an uninstalled package looks like to find_spec
    with pytest.raises(ConfigError, match=rf"log\.{key}=true .* pip install 'harness\[{extra}\]'"):
        validate(_config(tmp_path, **{key: True}))


def test_sink_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="log.wandb_mode='sometimes'"):
        validate(_config(tmp_path, wandb_mode="sometimes"))
    remote = {**_config(tmp_path, tensorboard=True), "checkpoint": {"dir": "s3://bucket/run"}}
    with pytest.raises(ConfigError, match="log.tensorboard_dir=null .* set log.tensorboard_dir to a local folder"):
        validate(remote)
    remote["log"]["tensorboard_dir"] = str(tmp_path / "tb")
    assert validate(remote).log.tensorboard_dir == str(tmp_path / "tb")


def test_a_run_without_sinks_imports_neither_tensorboard_nor_wandb():
    code = ("import sys, harness, harness.session, harness.sinks, harness.task; "
            "from harness import Session; "
            "assert not {'tensorboard', 'wandb'} & set(sys.modules), {'tensorboard', 'wandb'} & set(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_metrics_file_that_cannot_be_opened_is_left_out_with_one_warning(tmp_path, caplog):
    from harness.sinks import open_metrics_file

    (tmp_path / "taken").write_text("a file where the metrics file's folder should be")
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert open_metrics_file(str(tmp_path / "taken" / "metrics.jsonl")) == []
    assert len(caplog.records) == 1 and "could not open the metrics file" in caplog.text
    assert len(open_metrics_file(str(tmp_path / "ok" / "metrics.jsonl"))) == 1
    assert open_metrics_file(None) == []
