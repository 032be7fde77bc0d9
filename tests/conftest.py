"""Shared helpers: run the real launcher, find its worker processes, compare checkpoints."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from harness.checkpoint import checksum, layout
from harness.checkpoint.format import encode, read_payload

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# One configuration for every end-to-end comparison, so one uninterrupted reference serves all.
# 2048 samples / 2 ranks / batch 32 = 32 steps per epoch: step 45 is mid-epoch, 64 an epoch boundary.
STEPS = 160
BASE_OVERRIDES = [
    f"trainer.max_steps={STEPS}", "checkpoint.every_steps=40", "checkpoint.keep_last=0",
    "launcher.nproc_per_node=2", "trainer.num_threads=1", "trainer.log_every=20",
]


def launch_cmd(ckpt_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "harness.launch", "name=test", f"checkpoint.dir={ckpt_dir}",
            *BASE_OVERRIDES, *overrides]


def run_launch(ckpt_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(ckpt_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def start_launch(ckpt_dir: Path, *overrides: str, log_path: Optional[Path] = None) -> subprocess.Popen:
    log = open(log_path or (ckpt_dir.parent / f"{ckpt_dir.name}.log"), "a")
    return subprocess.Popen(launch_cmd(ckpt_dir, *overrides), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(launcher: subprocess.Popen, nproc: int = 2, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the launcher's current worker processes (read from their RANK variable)."""
    def found():
        ranks = {}
        for pid in children(launcher.pid):
            try:
                env = proc_env(pid)
            except OSError:
                continue
            if "RANK" in env:
                ranks[int(env["RANK"])] = pid
        return ranks if len(ranks) == nproc else None
    return wait_for(found, timeout, "worker processes")


def metrics(ckpt_dir: Path) -> dict[int, dict]:
    """Per-step metrics written by rank 0; a step logged again after a resume overrides the first."""
    path = ckpt_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


STOP_LINE = re.compile(r"stop requested .*? at step (\d+): checkpoint")


def assert_resumed_where_the_first_launch_stopped(ckpt_dir: Path, output: str) -> int:
    """A job stopped once with a save of the step it stopped at (a stop signal, a requeue) and was
    launched again: rank 0's first "stop requested ... at step N" names a step that has a checkpoint,
    the next launch resumed from exactly that one, and metrics.jsonl holds every step once from 1 on
    (the relaunch logged on from N + 1). Returns N. (``output``: the logs of every launch.)"""
    stops = [int(step) for step in STOP_LINE.findall(output)]
    assert stops, f"no stop in the output:\n{output[-3000:]}"
    stopped = stops[0]
    assert stopped in steps_with_saves(ckpt_dir), f"the first launch stopped at {stopped} without its checkpoint"
    resumed = resumed_steps(output, ckpt_dir)
    assert resumed and resumed[0] == stopped, f"stopped at step {stopped}, resumed from {resumed}:\n{output[-3000:]}"
    steps = [json.loads(line)["step"] for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > stopped, f"metrics.jsonl steps: {steps}"
    return stopped


def tensorboard_points(folder: Path, tag: str = "loss", purge: bool = True) -> list[tuple[int, float]]:
    """(step, value) of every scalar point of ``tag`` as TensorBoard reads the folder: all event files
    in order and, with ``purge``, without the points that a later file's purge_step discards."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0}, purge_orphaned_data=purge)
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def steps_with_saves(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if (p / "manifest.json").exists())


def payload_file(step_dir: Path) -> Path:
    """The payload file a checkpoint's manifest lists (state.safetensors, or state.pt when older)."""
    return step_dir / layout.payload_file(json.loads((step_dir / "manifest.json").read_text()))


def read_step(ckpt_dir: Path, step: int) -> dict:
    return read_payload(str(payload_file(ckpt_dir / f"step_{step:09d}")))


def newest_payload(ckpt_dir: Path) -> dict:
    return read_step(ckpt_dir, steps_with_saves(ckpt_dir)[-1])


def rewrite_payload(step_dir: Path, payload: dict) -> None:
    """Replace a checkpoint's payload (a new file renamed over the old: the old one may be mapped)
    and record its size and checksum in the manifest, as a tampering user who knows the format would."""
    target = payload_file(step_dir)
    file = encode(payload)
    temp = target.with_name(target.name + ".new")
    with open(temp, "wb") as handle:
        file.write_to(handle)
    os.replace(temp, step_dir / file.name)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    written = step_dir / file.name
    manifest["files"] = {file.name: checksum.file_entry(written.stat().st_size, checksum.of_file(str(written)))}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def assert_tensors_equal(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_tensors_equal(x, y, f"{path}/{index}")
    else:
        assert a == b, f"values differ at {path}: {a!r} != {b!r}"


def logged(ckpt_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of one logged quantity (the last row of a step wins, as for a reader)."""
    return {step: row[key] for step, row in metrics(ckpt_dir).items() if key in row}


def assert_same_training(run_dir: Path, reference_dir: Path, steps: int = STEPS) -> None:
    """The newest checkpoints of both runs hold the same training, bit for bit: every registered state
    (model, optimizer, scheduler, EMA, scaler, ...), every rank's RNG states (torch, Python, numpy)
    and the whole progress (step, epoch, data position); and both logged the same loss at every step
    from 1 to ``steps`` (two runs that logged nothing are not "the same")."""
    run, ref = newest_payload(run_dir), newest_payload(reference_dir)
    assert run["progress"]["step"] == ref["progress"]["step"] == steps
    assert_tensors_equal(run["state"], ref["state"], "state")
    assert_tensors_equal(run.get("per_rank", []), ref.get("per_rank", []), "per_rank")
    assert run["progress"] == ref["progress"], f"progress differs: {run['progress']} != {ref['progress']}"
    assert len(run["rng"]) == len(ref["rng"]) >= 1, "the checkpoints hold RNG states of different world sizes"
    assert_tensors_equal(run["rng"], ref["rng"], "rng")
    ref_losses = logged(reference_dir)
    assert sorted(ref_losses) == list(range(1, steps + 1)), "the reference did not log a loss at every step"
    run_losses = logged(run_dir)
    differing = sorted(step for step in ref_losses if run_losses.get(step) != ref_losses[step])
    assert not differing, f"losses differ (or are missing) at steps {differing[:10]}"


def assert_diverges_after(run_dir: Path, reference_dir: Path, step: int, first_difference: int,
                          key: str = "loss") -> None:
    """Negative control: the run logged the reference's values of ``key`` up to and including ``step``
    (where it resumed from a tampered checkpoint) and its first differing one is at ``first_difference``;
    its final model differs too. Proves the comparisons of assert_same_training see the tampered thing."""
    run_losses, ref_losses = logged(run_dir, key), logged(reference_dir, key)
    assert sorted(run_losses) == sorted(ref_losses) and ref_losses, "both runs must log every step"
    assert all(run_losses[s] == ref_losses[s] for s in ref_losses if s <= step), "differs before the resume"
    differing = [s for s in sorted(ref_losses) if run_losses[s] != ref_losses[s]]
    assert differing and differing[0] == first_difference, \
        f"expected the first differing {key} at step {first_difference}, got {differing[:5]}"
    run_model, ref_model = newest_payload(run_dir)["state"]["model"], newest_payload(reference_dir)["state"]["model"]
    assert any(not torch.equal(run_model[key], ref_model[key]) for key in ref_model), "the final model is equal"


RESUMED = re.compile(r"resumed from (\S+)/step_(\d+) at step (\d+)")


def resumed_steps(output: str, ckpt_dir: Path | str) -> list[int]:
    """The step of every "resumed from <ckpt_dir>/step_N at step N" line in ``output``, in order
    (each line's folder and step must agree)."""
    found = []
    for folder, name_step, step in RESUMED.findall(output):
        if folder == str(ckpt_dir):
            assert int(name_step) == int(step), f"resumed from step_{name_step} but at step {step}"
            found.append(int(step))
    return found


def assert_resumed_from(output: str, ckpt_dir: Path | str, step: int) -> None:
    """The run resumed exactly once, from ``ckpt_dir``'s checkpoint of ``step``."""
    assert resumed_steps(output, ckpt_dir) == [step], \
        f"expected one resume from {ckpt_dir}/step_{step:09d}; the output says:\n{output[-3000:]}"


def stop_lines(output: str) -> dict[int, int]:
    """{rank: step} from each rank's 'stopped at step' line."""
    return {int(rank): int(step) for rank, step in re.findall(r"\[rank (\d+)\] stopped at step (\d+)", output)}


_REFERENCE_RUNS: dict[tuple[str, ...], Path] = {}  # overrides -> checkpoint folder, for the whole session


def uninterrupted_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    """The checkpoint folder of a reference run that must finish (exit 0) without interruption. One
    run serves every test that asks for the same overrides (tests only read it)."""
    if overrides not in _REFERENCE_RUNS:
        ckpt_dir = tmp_path_factory.mktemp(name) / "ckpt"
        result = run_launch(ckpt_dir, *overrides)
        assert result.returncode == 0, result.stdout + result.stderr
        _REFERENCE_RUNS[overrides] = ckpt_dir
    return _REFERENCE_RUNS[overrides]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the shared configuration."""
    return uninterrupted_run(tmp_path_factory, "reference")


def signal_job(tmp_path: Path, send: Callable, *overrides: str, after_step: int = 20,
               timeout: float = 120, nproc: int = 2) -> tuple[Path, str, int]:
    """Start a job of ``nproc`` ranks in ``tmp_path/ckpt`` (``overrides`` must set
    launcher.nproc_per_node when it is not 2), let it pass ``after_step`` (0: do not wait for
    training), call ``send(launcher, {rank: pid})``, wait for it to end: (checkpoint dir, its
    output, exit code)."""
    ckpt_dir = tmp_path / "ckpt"
    log = tmp_path / "job.log"
    launcher = start_launch(ckpt_dir, *overrides, log_path=log)
    code = signal_running(launcher, ckpt_dir, send, after_step, timeout, nproc)
    return ckpt_dir, log.read_text(), code


def signal_running(launcher: subprocess.Popen, metrics_dir: Path, send: Callable, after_step: int,
                   timeout: float = 120, nproc: int = 2) -> int:
    """Once the job of ``nproc`` ranks has logged ``after_step`` in ``metrics_dir`` (0: do not wait),
    ``send(launcher, {rank: pid})``; return its exit code. The job's tree is killed if it outlives
    this (a failed wait or a hang), so no test leaves ranks running."""
    try:
        pids = worker_pids(launcher, nproc)
        if after_step:
            wait_for(lambda: max(metrics(metrics_dir), default=0) >= after_step, 90, f"step {after_step}")
        send(launcher, pids)
        return launcher.wait(timeout=timeout)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)


def kill_tree(launcher: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    for pid in children(launcher.pid):
        for child in children(pid):
            _kill(child, sig)
        _kill(pid, sig)
    _kill(launcher.pid, sig)
    launcher.wait(timeout=30)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def slurm_nodes() -> list[str]:
    """The nodes of the running SLURM cluster, or [] when no controller answers."""
    if shutil.which("scontrol") is None or subprocess.run(["scontrol", "ping"], capture_output=True).returncode:
        return []
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()


REQUIRE_ALL = "HARNESS_REQUIRE_ALL"  # CI (.ci/run) sets it to 1: every optional-dependency test must run


def skip_unless_required(message: str) -> None:
    """Skip this test (or module) for a missing optional dependency or privilege, or fail it when
    ``HARNESS_REQUIRE_ALL=1`` says every test must run (CI: a test that silently skips proves nothing)."""
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{message} ({REQUIRE_ALL}=1: this test must run, not skip)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str, why: str):
    """``pytest.importorskip`` that fails instead of skipping under ``HARNESS_REQUIRE_ALL=1``."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        skip_unless_required(f"{why}: cannot import {name} ({error})")


def _supports_odirect(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` accepts O_DIRECT (asked of the kernel, not of harness)."""
    probe = folder / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


@pytest.fixture
def odirect_dir(tmp_path):
    """A fresh folder on a filesystem that supports O_DIRECT: under tmp_path, or under /var/tmp when
    tmp_path's filesystem refuses it (tmpfs before Linux 6.6): writes there take the buffered fallback."""
    for base in (tmp_path, Path("/var/tmp")):
        folder = Path(tempfile.mkdtemp(prefix="harness-odirect-", dir=base))
        if _supports_odirect(folder):
            yield folder
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(folder)
    skip_unless_required("neither tmp_path nor /var/tmp is on a filesystem with O_DIRECT")


def require_cluster(up: bool, message: str, required_by: str) -> None:
    """Skip a test module when its cluster is not running, or fail it when ``required_by`` (an
    environment variable CI sets) says the cluster must be there."""
    if up:
        return
    if os.environ.get(required_by) == "1":
        pytest.fail(message)
    pytest.skip(message)


def pytest_collection_modifyitems(config, items) -> None:
    """Everything under tests/e2e/ launches real jobs: marked ``e2e`` so ``-m "not e2e"`` is quick."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionstart(session) -> None:
    """Compile harness and the tests' own modules once: the suite starts hundreds of processes that import
    them from source, and where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE,
    as on the CI machines) each would compile them again (~0.2 CPU-s per process)."""
    import compileall

    for folder in (REPO / "harness", REPO / "tests"):
        compileall.compile_dir(str(folder), quiet=2)
