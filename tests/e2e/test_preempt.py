"""Preemption: a signal on any rank stops every rank at the same step, saves once, exits 75."""

from __future__ import annotations

import http.server
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import (assert_same_training, kill_tree, metrics, run_launch, signal_job, start_launch, stop_lines,
                      steps_with_saves, wait_for, worker_pids)
from harness.config import PREEMPTED_EXIT_CODE, validate
from harness.stop.agreement import Preempted, auto_interval, grace_warning
from harness.stop.spot import notice_present
from harness.stop.flag import SAME_PRESS_S, StopFlag
from harness.session import Session

LONG = ("trainer.max_steps=160",)


def _wait_past(ckpt_dir: Path, step: int) -> None:
    wait_for(lambda: max(metrics(ckpt_dir), default=0) >= step, timeout=90, what=f"step {step}")


def _interrupt(tmp_path: Path, send, *overrides: str, after_step: int = 20) -> tuple[Path, str]:
    """signal_job, expecting exit 75."""
    ckpt_dir, output, code = signal_job(tmp_path, send, *overrides, after_step=after_step)
    assert code == PREEMPTED_EXIT_CODE, output
    return ckpt_dir, output


def _assert_stopped_together_and_saved_once(ckpt_dir: Path, output: str) -> int:
    stops = stop_lines(output)
    assert set(stops) == {0, 1}, output
    assert len(set(stops.values())) == 1, f"ranks stopped at different steps: {stops}"
    step = stops[0]
    assert 20 <= step < 160
    saves = steps_with_saves(ckpt_dir)
    assert saves[-1] == step, f"no checkpoint at the stop step {step}: {saves}"
    assert output.count("stop requested") == 1
    assert "exiting with code 75" in output
    return step


def _resume_and_compare(ckpt_dir: Path, reference: Path, stop_step: int) -> None:
    result = run_launch(ckpt_dir)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {ckpt_dir}/step_{stop_step:09d} at step {stop_step}" in result.stdout
    assert_same_training(ckpt_dir, reference)


@pytest.mark.parametrize("who, sig", [(1, signal.SIGTERM), (0, signal.SIGUSR1), (1, signal.SIGUSR2)],
                         ids=["SIGTERM-rank1", "SIGUSR1-rank0", "SIGUSR2-rank1"])
def test_signal_to_one_rank_stops_all_ranks_saves_once_and_resumes_exactly(tmp_path, reference, who, sig):
    ckpt_dir, output = _interrupt(tmp_path, lambda launcher, pids: os.kill(pids[who], sig))
    step = _assert_stopped_together_and_saved_once(ckpt_dir, output)
    assert signal.Signals(sig).name in output
    _resume_and_compare(ckpt_dir, reference, step)


@pytest.mark.parametrize("sig, seen_as", [
    (signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGUSR1, "SIGUSR1"),
    (signal.SIGUSR2, "SIGUSR2"), (signal.SIGHUP, "SIGTERM"),  # a closed terminal: passed on as SIGTERM
], ids=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"])
def test_a_stop_signal_to_the_launcher_is_forwarded_to_every_rank_and_exits_75(tmp_path, reference, sig, seen_as):
    ckpt_dir, output = _interrupt(tmp_path, lambda launcher, pids: launcher.send_signal(sig))
    step = _assert_stopped_together_and_saved_once(ckpt_dir, output)
    assert all(f"stopped at step {step} ({seen_as})" in line for line in output.splitlines()
               if "stopped at step" in line), output
    if sig == signal.SIGTERM:  # one resume is enough: the ranks stop the same way whatever the signal
        _resume_and_compare(ckpt_dir, reference, step)


def test_two_signals_in_a_row_still_save_once(tmp_path, reference):
    def send(launcher, pids):
        os.kill(pids[0], signal.SIGTERM)
        os.kill(pids[0], signal.SIGUSR2)
        os.kill(pids[1], signal.SIGTERM)
    ckpt_dir, output = _interrupt(tmp_path, send)
    step = _assert_stopped_together_and_saved_once(ckpt_dir, output)
    _resume_and_compare(ckpt_dir, reference, step)


def test_group_sigterm_with_dataloader_workers_saves(tmp_path):
    """SIGTERM to each rank's whole process group (as torchrun/SLURM do) also hits DataLoader workers;
    they must survive until the rank has saved."""
    def send(launcher, pids):
        for pid in pids.values():
            os.killpg(pid, signal.SIGTERM)
    ckpt_dir, output = _interrupt(tmp_path, send, "task.num_workers=2")
    _assert_stopped_together_and_saved_once(ckpt_dir, output)
    assert "DataLoader worker" not in output


def test_local_auto_restart_survives_several_preemptions(tmp_path, reference):
    ckpt_dir = tmp_path / "ckpt"
    log = tmp_path / "job.log"
    # check_every=1 stops one step after the signal (the agreement interval never changes training).
    launcher = start_launch(ckpt_dir, "launcher.max_restarts=3", "preempt.check_every=1", log_path=log)
    try:
        seen: set[int] = set()
        for attempt, target in enumerate((20, 60, 100)):
            pids = wait_for(lambda: (lambda p: p if set(p.values()) - seen else None)(worker_pids(launcher)),
                            what="a new set of workers")
            seen |= set(pids.values())
            wait_for(lambda: log.read_text().count("resumed from") >= attempt, what=f"resume #{attempt}")
            _wait_past(ckpt_dir, max(target, max(metrics(ckpt_dir), default=0) + 5))
            os.kill(pids[1], signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, log.read_text()
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    output = log.read_text()
    assert output.count("job preempted: restarting it") == 3, output
    assert_same_training(ckpt_dir, reference)


class _Notice(http.server.BaseHTTPRequestHandler):
    armed = threading.Event()

    def do_GET(self):
        if self.armed.is_set():
            body = b'{"action": "terminate", "time": "2026-11-23T05:00:00Z"}'
            self.send_response(200)
        else:
            body = b"Not Found"
            self.send_response(404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_spot_notice_from_a_local_metadata_server_stops_the_job(tmp_path, reference):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Notice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data/spot/instance-action"
    try:
        _Notice.armed.clear()
        ckpt_dir, output = _interrupt(
            tmp_path, lambda launcher, pids: _Notice.armed.set(),
            "preempt.spot=aws", f"preempt.spot_url={url}", "preempt.spot_poll_s=0.2")
    finally:
        server.shutdown()
    step = _assert_stopped_together_and_saved_once(ckpt_dir, output)
    assert "spot termination notice" in output
    _resume_and_compare(ckpt_dir, reference, step)


def test_auto_agreement_interval_keeps_the_check_under_one_percent():
    assert auto_interval(step_s=0.5, agree_s=0.0003) == 1  # big steps: every step
    assert auto_interval(step_s=0.008, agree_s=0.0004) == 5  # tiny steps: 0.4 ms per 5 x 8 ms = 1%
    assert auto_interval(step_s=0.001, agree_s=0.1) == 250  # capped: a stop waits at most ~0.25 s
    assert auto_interval(step_s=0.0, agree_s=0.001) == 1


def test_the_grace_warning_names_where_the_time_went():
    assert grace_warning(20.0, 30.0) is None  # fits, with 20% headroom
    slow_save = grace_warning(29.0, 30.0, waited_s=1.0)
    assert "took 29.0s" in slow_save and "checkpoint.async_save" in slow_save
    slow_loop = grace_warning(29.0, 30.0, waited_s=27.0)
    assert "27.0s of it passed before the ranks agreed to stop" in slow_loop
    assert "preempt.check_every=1" in slow_loop and "async_save" not in slow_loop


def test_notice_parsing():
    assert notice_present("aws", b'{"action": "terminate"}', 200)
    assert not notice_present("aws", b"", 404)
    assert notice_present("gcp", b"TRUE", 200) and not notice_present("gcp", b"FALSE", 200)


# ----- in-process sessions: deterministic timing with real signals ------------------------------

def _session(tmp_path: Path, **trainer) -> Session:
    cfg = validate({
        "name": "inproc", "launcher": {"backend": "direct"},
        "task": {"model": {"_target_": "harness.example.MLP"},
                 "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
                 "data": {"_target_": "harness.example.SyntheticClassification", "num_samples": 256},
                 "loss": "harness.example.classification_loss"},
        "trainer": {"max_steps": 30, "num_threads": 1, **trainer},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 5, "keep_last": 0},
        "preempt": {"signals": ["SIGTERM", "SIGUSR1", "SIGINT"], "check_every": 1},
    })
    return Session(cfg)


class _SignalDuringSave:
    """A registered Stateful whose state_dict() sends a real SIGTERM to this process mid-save."""

    def __init__(self, at_step_of: Session, step: int):
        self.session, self.step = at_step_of, step

    def state_dict(self):
        if self.session.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"n": self.session.step}

    def load_state_dict(self, state):
        pass


def _train(session: Session, on_start=None) -> None:
    from harness.example import MLP, SyntheticClassification, classification_loss

    model = session.prepare(MLP())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session.register(optimizer=optimizer)
    loader = session.loader(SyntheticClassification(num_samples=256), batch_size=16)
    for batch in session.batches(loader):
        if on_start is not None:
            on_start()
            on_start = None
        loss = classification_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.log(loss=loss)


def test_signal_during_a_save_lets_it_finish_then_stops_without_a_second_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    session = _session(tmp_path)
    session.register(probe=_SignalDuringSave(session, 10))
    with pytest.raises(Preempted) as stopped:
        with session:
            _train(session)
    assert stopped.value.code == PREEMPTED_EXIT_CODE and stopped.value.step == 10
    assert steps_with_saves(tmp_path / "ckpt") == [5, 10]
    assert session.store.problems(session.store.latest_listed()) == []
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler was not restored"


def test_signal_in_the_first_step_after_resume_saves_that_step(tmp_path):
    with _session(tmp_path, max_steps=12) as first:
        _train(first)
    assert steps_with_saves(tmp_path / "ckpt") == [5, 10, 12]
    session = _session(tmp_path, max_steps=30)
    with pytest.raises(Preempted) as stopped:
        with session:
            _train(session, on_start=lambda: os.kill(os.getpid(), signal.SIGUSR1))
    assert session.resumed_from.step == 12
    assert stopped.value.step == 13 and stopped.value.reason == "SIGUSR1"
    assert steps_with_saves(tmp_path / "ckpt") == [5, 10, 12, 13]


def test_check_stop_in_an_evaluation_loop_saves_the_last_training_step(tmp_path):
    session = _session(tmp_path, max_steps=8)
    with session:
        _train(session)
    assert steps_with_saves(tmp_path / "ckpt") == [5, 8]
    session = _session(tmp_path, max_steps=8)
    (tmp_path / "ckpt" / "step_000000008" / "manifest.json").unlink()  # newest is gone: resume at 5
    with pytest.raises(Preempted) as stopped:
        with session:
            from harness.example import MLP

            session.prepare(MLP())
            session.start()
            for _ in range(3):  # an evaluation loop of the user's
                session.check_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            session.check_stop()
    # The newest checkpoint already holds step 5: the stop writes nothing new.
    assert stopped.value.step == 5 and steps_with_saves(tmp_path / "ckpt") == [5]
    assert session.resumed_from.step == 5


def test_second_ctrl_c_stops_at_once_and_one_delivered_twice_is_one():
    """A second press stops at once (no save); the same press delivered twice within SAME_PRESS_S
    (to the terminal's group and again by `timeout` or torchrun forwarding it) is one request."""
    flag = StopFlag()
    flag.install(["SIGINT"])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded
        assert flag.requested and flag.interrupts == 1
        time.sleep(SAME_PRESS_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()


def test_previous_python_handler_is_chained_and_restored():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        flag = StopFlag()
        flag.install(["SIGUSR1"])
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and calls == [signal.SIGUSR1]
        flag.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


PAUSE_HOOK = Path(__file__).resolve().parents[1] / "scripts" / "pause_at"
HELD_AFTER_SIGNAL_S = 1.0


@pytest.mark.parametrize("phase", ["import_torch", "rendezvous"])
@pytest.mark.parametrize("target", ["rank1", "launcher"])
def test_a_stop_signal_at_each_start_up_phase_is_a_stop_request(tmp_path, monkeypatch, phase, target):
    """Each rank is held at the phase (tests/scripts/pause_at) until the signal has been sent: while
    it imports torch (no Session yet, only the worker's early handlers) or before the rendezvous.
    Whoever gets it (a rank, or the launcher that forwards it), the job stops, saves once, exits 75."""
    pause = tmp_path / "pause"
    pause.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PAUSE_HOOK), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HARNESS_TEST_PAUSE", phase)
    monkeypatch.setenv("HARNESS_TEST_PAUSE_DIR", str(pause))

    def send(launcher, pids):
        wait_for(lambda: all((pause / f"{rank}.{phase}").exists() for rank in (0, 1)), 90, f"both ranks at {phase}")
        if target == "launcher":
            launcher.send_signal(signal.SIGTERM)
        else:
            os.kill(pids[1], signal.SIGTERM)
        # A moment for the launcher to forward it while the ranks are held (were it late, the
        # ranks would see it later in start-up: the assertions below hold either way).
        time.sleep(HELD_AFTER_SIGNAL_S)
        (pause / "go").touch()

    ckpt_dir, output = _interrupt(tmp_path, send, after_step=0)
    assert "failed with" not in output
    stops = stop_lines(output)
    assert set(stops) == {0, 1} and len(set(stops.values())) == 1, output
    assert steps_with_saves(ckpt_dir) == [stops[0]]
    # Rank 0 prints the stop line; it times it from the signal wherever it arrived (rank 1 alone
    # too), so it counts the time the ranks were held after it.
    since_signal = float(re.search(r"\(([0-9.]+)s after the signal\)", output).group(1))
    assert since_signal >= HELD_AFTER_SIGNAL_S, output
