"""What a person reads when a run cannot go on: one line that says why and what to do, not a
traceback from every rank. Real launches, real folders (a file in the way, an immutable folder, a
read-only mount, a full disk), a real second job and a real double Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, kill_tree, launch_cmd, metrics, run_launch, start_launch, wait_for, worker_pids
from harness.stop.flag import SAME_PRESS_S

STEP_LINE = re.compile(r"step \d+/\d+")  # a progress line: training had started


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _harness_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("harness: ")]


def _assert_one_clear_line(output: str, *expected: str) -> str:
    """Exactly one ``harness: ...`` line, holding every ``expected`` piece; no traceback anywhere."""
    assert "Traceback" not in output, output
    reported = _harness_lines(output)
    assert len(reported) == 1, output
    for piece in expected:
        assert piece in reported[0], output
    return reported[0]


# ---- invalid configuration: exit 2, one line ---------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("trainer.max_step=10", "trainer.max_step is not a key: did you mean trainer.max_steps?"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc' is invalid: expected an integer"),
    ("task=nope", "task=nope: no such preset. Available: example"),
    ("+foo=1", "foo is not a key"),
    ("launcher.nodes=2", "launcher.nodes is a key of launcher=slurm"),
], ids=["typo", "wrong-type", "missing-preset", "unknown-appended-key", "another-launchers-key"])
def test_an_invalid_command_line_exits_2_with_one_line(tmp_path, override, expected):
    result = subprocess.run([sys.executable, "-m", "harness.launch", f"checkpoint.dir={tmp_path / 'ckpt'}",
                             override], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(_lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith("harness: invalid configuration: "), result.stderr
    _assert_one_clear_line(result.stderr, expected)
    assert "_schema" not in result.stderr
    assert not (tmp_path / "ckpt").exists(), "nothing may start"


# ---- the checkpoint folder is checked before the first step --------------------------------------------

def _mount(target: Path, *options: str) -> None:
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


def _file_in_the_way(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    path.write_text("not a folder")
    return path


def _immutable_folder(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    # We run as root: permissions (chmod) do not stop root, the immutable flag does.
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.decode().strip()}")
    return path


def _read_only_mount(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    _mount(path, "-o", "ro,size=1m")
    return path


def _release(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("make, expected", [
    (_file_in_the_way, ("is a file, not a folder", "HINT: move the file")),
    (_immutable_folder, ("cannot be written (Operation not permitted)", "HINT:", "immutable flag")),
    (_read_only_mount, ("cannot be written (Read-only file system)", "HINT: the filesystem is mounted read-only")),
], ids=["regular-file", "immutable-folder", "read-only-mount"])
def test_an_unusable_checkpoint_folder_is_refused_before_any_rank_starts(tmp_path, make, expected):
    path = make(tmp_path)
    try:
        result = run_launch(path, timeout=120)
    finally:
        _release(path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    _assert_one_clear_line(output, f"checkpoint.dir={path}", *expected)
    assert "starting 2 worker processes" not in output, "the launcher must refuse before starting ranks"
    assert not STEP_LINE.search(output), output


# Without the launcher (torchrun, srun, a plain `python train.py` per rank): rank 0 checks at start.
SCRIPT = textwrap.dedent("""
    import torch, harness
    def main():
        cfg = harness.load_config({"checkpoint": {"dir": %r}, "trainer": {"max_steps": 5, "num_threads": 1}})
        with harness.Session(cfg) as session:
            model = session.prepare(torch.nn.Linear(2, 1))
            for (batch,) in session.batches(session.loader(torch.utils.data.TensorDataset(torch.randn(64, 2)), 4)):
                model(batch).sum().backward()
    harness.entrypoint(main)
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_script_without_the_launcher_checks_the_folder_on_rank_0_and_every_rank_exits_cleanly(tmp_path):
    path = _file_in_the_way(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT % str(path))
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [1, 1], outputs
    _assert_one_clear_line(outputs[0], f"checkpoint.dir={path} is a file, not a folder")
    assert _lines(outputs[1]) == [], "rank 1 learns it from rank 0 and says nothing more"
    assert not STEP_LINE.search("".join(outputs))


# ---- known conditions while running: one line, no tracebacks --------------------------------------------

def test_every_checkpoint_damaged_is_one_line_for_the_job_and_nothing_is_written(tmp_path):
    """Both ranks refuse to start fresh over damaged checkpoints; the job prints the reason once
    (rank 0), not once per rank, and no checkpoint file changes."""
    ckpt_dir = tmp_path / "ckpt"
    assert run_launch(ckpt_dir, "trainer.max_steps=10", "checkpoint.every_steps=5").returncode == 0
    for payload in ckpt_dir.glob("step_*/state.*"):
        os.truncate(payload, 100)
    before = {path: path.read_bytes() for path in ckpt_dir.glob("step_*/*")}
    result = run_launch(ckpt_dir, "trainer.max_steps=20", "checkpoint.every_steps=5")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    _assert_one_clear_line(output, "every complete checkpoint in", "failed verification", "HINT:")
    assert {path: path.read_bytes() for path in ckpt_dir.glob("step_*/*")} == before


def test_a_second_job_on_the_same_folder_is_refused_in_one_line(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = start_launch(ckpt_dir, "trainer.max_steps=100000", log_path=tmp_path / "first.log")
    try:
        worker_pids(first)
        wait_for(lambda: metrics(ckpt_dir), 90, "the first job to train")
        second = run_launch(ckpt_dir, "trainer.max_steps=100000", timeout=120)
    finally:
        kill_tree(first)
    output = second.stdout + second.stderr
    assert second.returncode == 1, output
    _assert_one_clear_line(output, f"{ckpt_dir} is in use by another job (host ", "HINT:")
    assert "lost contact" not in output and "Connection reset" not in output, output
    assert len(_lines(output)) <= 3, output  # the launcher's start and failure lines, and the reason


def test_a_full_disk_under_the_checkpoint_folder_is_one_line_with_a_free_space_hint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    # Room for the start-up probe and the metrics file, not for one checkpoint (~260 kB).
    _mount(ckpt_dir, "-o", "size=96k")
    try:
        result = run_launch(ckpt_dir, "trainer.max_steps=10", "checkpoint.every_steps=5", timeout=120)
    finally:
        _release(ckpt_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    line = _assert_one_clear_line(output, "could not write checkpoint step 5", "No space left on device",
                                  "HINT: the disk is full")
    assert "permissions" not in line
    assert "lost contact" not in output, output


def test_a_bug_on_one_rank_is_its_traceback_and_one_line_from_the_others(tmp_path):
    """A user's exception on rank 0: rank 0 prints its traceback; rank 1, whose next collective
    breaks, names the rank it lost in one line instead of a second, misleading gloo traceback."""
    script = REPO / "tests" / "scripts" / "user_loop.py"
    result = run_launch(tmp_path / "ckpt", f"script={script}", "script_args=['--fail-at=3']",
                        "trainer.max_steps=10", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("Traceback") == 1 and "ValueError: a bug in the user's step 3" in output, output
    assert "[rank 1] lost contact with rank 0 on node" in output, output
    assert "Connection closed by peer" not in output and "Connection reset" not in output, output


def test_a_save_called_on_rank_0_only_ends_at_the_collective_timeout_with_the_hint(tmp_path):
    """session.save() is a collective; `if rank == 0: session.save()` (the pattern of many torch
    examples) leaves the ranks in different collectives until trainer.collective_timeout_s. Each rank
    then says what usually causes it, beside its traceback."""
    script = REPO / "tests" / "scripts" / "user_loop.py"
    result = run_launch(tmp_path / "ckpt", f"script={script}", "trainer.max_steps=20",
                        "trainer.collective_timeout_s=10",
                        "script_args=['--where=after_step','--at=5','--save','--rank0-only']", timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert re.search(r"\[rank [01]\] a collective timed out \(trainer.collective_timeout_s\): the ranks did not "
                     r"call the same collectives.*HINT: every rank must call session.save\(\)", output), output


# ---- a double Ctrl-C is a request, not a crash -------------------------------------------------------

DEADLOCK = REPO / "tests" / "scripts" / "deadlock.py"


def _press_ctrl_c_twice(launcher: subprocess.Popen) -> int:
    """Two Ctrl-C presses on the launcher; its exit code (the job is killed if it does not exit)."""
    try:
        launcher.send_signal(signal.SIGINT)
        time.sleep(2 * SAME_PRESS_S)  # two presses: one sooner is the same press delivered twice
        launcher.send_signal(signal.SIGINT)
        return launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)


def _start_deadlock(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """Two ranks blocked in a collective for good (tests/scripts/deadlock.py), both known to be there."""
    ready = tmp_path / "ready"
    launcher = start_launch(tmp_path / "ckpt", "launcher.nproc_per_node=2", f"script={DEADLOCK}",
                            f"script_args=[{ready}]", *overrides, log_path=tmp_path / "job.log")
    try:
        pids = worker_pids(launcher)
        wait_for(lambda: all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)), 90, "both ranks to block")
    except BaseException:
        kill_tree(launcher)
        raise
    time.sleep(0.5)  # from writing the file to waiting in recv
    return launcher, pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_double_ctrl_c_stops_ranks_blocked_in_a_collective(tmp_path):
    """Ranks stuck in native code never run their KeyboardInterrupt: the launcher kills them a few
    seconds after the second Ctrl-C, says so, and exits 130 (before: it waited forever)."""
    launcher, pids = _start_deadlock(tmp_path)
    code = _press_ctrl_c_twice(launcher)
    output = (tmp_path / "job.log").read_text()
    assert code == 130, output
    assert "did not stop within 5 s of the second Ctrl-C (blocked in a collective or in native code): killed" \
        in output, output
    assert not any(_alive(pid) for pid in pids.values())


def test_ranks_blocked_in_a_collective_exit_after_their_launcher_died(tmp_path):
    """SIGKILL of the launcher: its ranks get SIGTERM but, blocked in a collective, cannot act on it;
    each exits preempt.grace_s later on its own, saying where it was stuck, instead of living on as
    an orphan (the first to give up frees its peer: the collective breaks)."""
    launcher, pids = _start_deadlock(tmp_path, "preempt.grace_s=2")
    launcher.kill()
    launcher.wait()
    try:
        wait_for(lambda: not any(_alive(pid) for pid in pids.values()), 30, "the orphaned ranks to exit")
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = (tmp_path / "job.log").read_text()
    # The first rank to give up says so; its peer may instead fail at once in the broken collective.
    assert re.search(r"\[rank [01]\] the launcher is gone and this rank did not stop within preempt.grace_s=2 s",
                     output), output
    assert "in main" in output and "deadlock.py" in output  # the stack it was stuck in


def test_one_ctrl_c_delivered_twice_by_a_forwarding_wrapper_still_saves(tmp_path):
    """`timeout 3h python -m harness.launch ...` in a terminal: Ctrl-C reaches the group (timeout and
    the launcher) and timeout forwards it to the launcher again, a few ms later. That is one press:
    the job saves and exits 75 (before: two SIGINTs, a stop without saving, exit 130, 3 in 8 tries)."""
    ckpt_dir = tmp_path / "ckpt"
    with open(tmp_path / "job.log", "a") as log:
        wrapper = subprocess.Popen(["timeout", "300", *launch_cmd(ckpt_dir, "trainer.max_steps=100000")], cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: metrics(ckpt_dir), 90, "training")
        os.killpg(wrapper.pid, signal.SIGINT)
        code = wrapper.wait(timeout=120)
    finally:
        if wrapper.poll() is None:
            kill_tree(wrapper)
    output = (tmp_path / "job.log").read_text()
    assert code == 75, output
    assert "second Ctrl-C" not in output and "stopped at step" in output, output


def test_a_double_ctrl_c_says_the_job_stopped_at_your_request_and_exits_130(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    log = tmp_path / "job.log"
    # Agreements far apart: the first Ctrl-C is recorded but not acted on before the second arrives.
    launcher = start_launch(ckpt_dir, "trainer.max_steps=100000", "preempt.check_every=100000", log_path=log)
    try:
        worker_pids(launcher)
        wait_for(lambda: metrics(ckpt_dir), 90, "training")
    except BaseException:
        kill_tree(launcher)
        raise
    code = _press_ctrl_c_twice(launcher)
    output = log.read_text()
    assert code == 130, output
    assert "job stopped without saving at your request (second Ctrl-C)" in output, output
    assert "failed with exit code 130" not in output and "Traceback" not in output, output
