"""Crash-consistency fuzzer: many short trials, each injecting a random real fault into a training
job's checkpointing, then checking what a user relies on.

A trial runs tests/fuzz/job.py (one rank) once with a fault, sometimes a second time with another
(e.g. a read error while resuming), then once without, and checks:

1. after each faulty launch: every complete checkpoint in the folder verifies or is skipped by
   ``latest_valid`` with a warning (no crash), and one that was committed before the fault survives
   (the newest valid step is at least the last save the fault could not have touched);
2. nothing outside the checkpoint folder was touched (a sentinel folder beside it is unchanged);
3. the final, clean launch exits 0 and its last checkpoint equals an uninterrupted run's bit for bit
   (model, optimizer, scheduler, every RNG, progress).

Faults: SIGKILL at a save phase (before / in the middle of / after the payload write, the manifest
write = the commit, a retention delete) or at a random instant from outside; an injected EIO, ENOSPC
or EAGAIN (once, or from then on) on a write, delete, listing or manifest read; a real ENOSPC on a
small tmpfs (root only). Each trial is sync or async, and local or staged to S3 (a moto server on
loopback, when moto is installed), at random.

    python tests/fuzz/fuzz.py --trials 200 --seed 1 --report fuzz.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faulty import ERRORS, FaultPlan  # noqa: E402
from job import EVERY, KEEP_LAST, STEPS  # noqa: E402
from harness.checkpoint.format import read_payload  # noqa: E402
from harness.checkpoint.storage import open_storage  # noqa: E402
from harness.checkpoint.store import CheckpointStore  # noqa: E402

SAVES = STEPS // EVERY
JOB_TIMEOUT = 120
BUCKET = "fuzz"
MOTO_LINE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


def start_moto(workdir: Path) -> Optional[subprocess.Popen]:
    """A moto S3 server on loopback (port chosen by the kernel); its address goes to the jobs through
    AWS_* variables of this process. None when moto is not installed or does not start."""
    log_path = workdir / "moto.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        match = MOTO_LINE.search(log_path.read_text())
        if match:
            os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{match.group(1)}",
                               "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
                               "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials")})
            import s3fs
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(BUCKET)
            return process
        time.sleep(0.05)
    process.kill()
    return None


@dataclass
class Trial:
    index: int
    kind: str
    asynchronous: bool
    storage: str = "local"
    faults: list = field(default_factory=list)  # FaultPlan dicts, or {"random_kill_s": t} / {"tmpfs_bytes": n}
    outcomes: list = field(default_factory=list)  # exit codes of the faulty launches
    resumed_from: list = field(default_factory=list)  # the newest valid step after each faulty launch
    violations: list = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """Where a trial's checkpoints go: a local folder, or an S3 URL staged through a local folder."""

    dir: str
    staging: Optional[str] = None

    def store(self) -> CheckpointStore:
        return CheckpointStore(open_storage(self.dir))


def run_job(target: Target, asynchronous: bool, fault: Optional[dict] = None, kill_after_s: float = 0,
            log: Optional[Path] = None) -> tuple[int, str]:
    command = [sys.executable, str(HERE / "job.py"), "--dir", target.dir]
    if target.staging:
        command += ["--staging", target.staging]
    if asynchronous:
        command.append("--async-save")
    if fault:
        command += ["--fault", json.dumps(fault)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        if kill_after_s:
            kill_once_saving(process, Path(target.staging or target.dir), kill_after_s)
        output, _ = process.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        output += "\n[fuzz] TIMED OUT (a hang)"
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"\n===== fault={fault} kill_after_s={kill_after_s} exit={process.returncode}\n{output}")
    return process.returncode, output


def kill_once_saving(process: subprocess.Popen, folder: Path, delay_s: float) -> None:
    """SIGKILL ``process`` ``delay_s`` after its first checkpoint folder appeared: a random instant
    while it trains and saves (start-up, the same for every trial, is skipped)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline and not list(folder.glob("step_*")):
        time.sleep(0.01)
    try:
        process.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)


def final_state(target: Target, scratch: Path) -> dict:
    store = target.store()
    ref = store.latest_valid()
    copy = scratch / "final-payload"
    with store.storage.open_read(ref.payload_path) as source, open(copy, "wb") as handle:
        shutil.copyfileobj(source, handle)
    payload = read_payload(str(copy))
    return {key: payload[key] for key in ("state", "rng", "progress")}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for key in a for d in differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for index, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{index}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def durable_floor(plan: dict) -> int:
    """The newest step that must still be valid after this planned fault: the saves before the
    faulted one committed, and a fault after a commit (or during its retention) keeps that commit."""
    op, nth, action = plan["op"], plan["nth"], plan["action"]
    if op == "write_payload":
        return (nth - 1) * EVERY
    if op == "write_manifest":
        return nth * EVERY if action == "kill_after" else (nth - 1) * EVERY
    if op == "remove_dir":  # the first delete follows the commit of save KEEP_LAST + 1
        return (nth + KEEP_LAST) * EVERY
    return 0  # listings and reads happen at start and in every prune: no step is implied


def check_folder(target: Target, floor: int, trial: Trial) -> int:
    """Invariant 1; returns the newest valid step (0: none). With staging, what counts is the
    destination once the uploads a relaunch finishes are done, so only local folders are held to
    the floor right after the fault."""
    store = target.store()
    if target.staging:
        floor = 0
    try:
        ref = store.latest_valid()
    except Exception as error:  # a crash here is a violation, not a fuzzer failure
        trial.violations.append(f"latest_valid raised {type(error).__name__}: {error}")
        return 0
    newest = ref.step if ref else 0
    if ref is not None and store.problems(ref):
        trial.violations.append(f"latest_valid chose {ref.name}, which does not verify")
    if newest < floor:
        trial.violations.append(f"newest valid step {newest} < {floor}, committed before the fault")
    return newest


def pick_fault(rng: random.Random) -> tuple[str, dict]:
    roll = rng.random()
    if roll < 0.4:  # SIGKILL at a save phase
        op = rng.choice(["write_payload", "write_payload", "write_manifest", "remove_dir"])
        actions = ["kill_before", "kill_mid", "kill_after"] if op == "write_payload" else ["kill_before", "kill_after"]
        limit = SAVES - KEEP_LAST if op == "remove_dir" else SAVES
        return "kill_at_phase", asdict(FaultPlan(op=op, nth=rng.randint(1, limit), action=rng.choice(actions),
                                                 after_bytes=rng.randint(0, 600_000)))
    if roll < 0.6:
        return "kill_at_random_instant", {"random_kill_s": round(rng.uniform(0.0, 1.5), 3)}
    if roll < 0.9:
        op = rng.choice(["write_payload", "write_manifest", "remove_dir", "list_names", "read_bytes"])
        limit = {"remove_dir": SAVES - KEEP_LAST, "list_names": 2 * SAVES, "read_bytes": 3 * SAVES}.get(op, SAVES)
        return "storage_error", asdict(FaultPlan(op=op, nth=rng.randint(1, limit), action=rng.choice(sorted(ERRORS)),
                                                 once=rng.random() < 0.5))
    return "full_disk", {"tmpfs_bytes": rng.randint(2_000_000, 4_000_000)}


def run_trial(index: int, rng: random.Random, workdir: Path, reference: dict, log: Path, s3: bool) -> Trial:
    kind, fault = pick_fault(rng)
    trial = Trial(index=index, kind=kind, asynchronous=rng.random() < 0.5, faults=[fault])
    folder = workdir / f"trial_{index:04d}"
    outside = folder / "outside"
    outside.mkdir(parents=True)
    (outside / "sentinel.txt").write_text("must not change\n")
    before = folder_digest(outside)
    ckpt_dir = folder / "ckpt"
    target = Target(str(ckpt_dir))
    if s3 and kind != "full_disk" and rng.random() < 0.3:
        trial.storage = "staged_s3"
        target = Target(f"s3://{BUCKET}/trial_{index:04d}", staging=str(ckpt_dir))
    mounted = False
    if kind == "full_disk":
        ckpt_dir.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={fault['tmpfs_bytes']}", "tmpfs", str(ckpt_dir)],
                               capture_output=True)
        if mount.returncode != 0:
            trial.kind, fault = "storage_error", asdict(FaultPlan(op="write_payload", nth=rng.randint(1, SAVES),
                                                                  action="enospc", once=False))
            trial.faults = [fault]
        else:
            mounted = True
    try:
        if "random_kill_s" in fault:
            code, _ = run_job(target, trial.asynchronous, kill_after_s=fault["random_kill_s"], log=log)
            floor = 0
        elif "tmpfs_bytes" in fault:
            code, _ = run_job(target, trial.asynchronous, log=log)
            floor = 0
            subprocess.run(["mount", "-o", "remount,size=200m", str(ckpt_dir)], check=True)
        else:
            code, _ = run_job(target, trial.asynchronous, fault=fault, log=log)
            floor = durable_floor(fault) if code != 0 else STEPS
        trial.outcomes.append(code)
        trial.resumed_from.append(check_folder(target, floor, trial))
        if rng.random() < 0.3:  # a second launch whose resume reads fail
            second = asdict(FaultPlan(op=rng.choice(["read_bytes", "list_names"]), nth=rng.randint(1, 3),
                                      action=rng.choice(sorted(ERRORS)), once=True))
            trial.faults.append(second)
            code, _ = run_job(target, trial.asynchronous, fault=second, log=log)
            trial.outcomes.append(code)
            trial.resumed_from.append(check_folder(target, trial.resumed_from[-1] if code != 0 else STEPS, trial))
        code, output = run_job(target, trial.asynchronous, log=log)
        if code != 0:
            trial.violations.append(f"the clean relaunch exited {code}: {output[-600:]}")
        else:
            found = differences(final_state(target, folder), reference)
            if found:
                trial.violations.append(f"final state differs from the uninterrupted run at {found[:5]}")
        if folder_digest(outside) != before:
            trial.violations.append("a file outside the checkpoint folder changed")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ckpt_dir)], check=False)
    shutil.rmtree(folder, ignore_errors=True)
    return trial


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="append every trial here as a line of JSON")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--no-s3", action="store_true", help="local folders only (no moto server)")
    parser.add_argument("--require-s3", action="store_true", help="fail when moto's S3 server cannot start")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="harness-fuzz-"))
    log = workdir / "jobs.log"
    rng = random.Random(args.seed)
    started = time.monotonic()
    moto = None if args.no_s3 else start_moto(workdir)
    if moto is None and args.require_s3:
        print("moto's S3 server did not start (pip install 'moto[server]')")
        return 1
    try:
        return run_trials(args, workdir, log, rng, started, s3=moto is not None)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)


def run_trials(args: argparse.Namespace, workdir: Path, log: Path, rng: random.Random, started: float,
               s3: bool) -> int:
    code, output = run_job(Target(str(workdir / "reference")), asynchronous=False, log=log)
    if code != 0:
        print(f"the uninterrupted reference run failed ({code}):\n{output}")
        return 1
    reference = final_state(Target(str(workdir / "reference")), workdir)
    trials = []
    for index in range(args.trials):
        trial = run_trial(index, rng, workdir, reference, log, s3)
        trials.append(trial)
        if args.report:  # one JSON line per trial as it ends: a long run interrupted keeps its results
            with open(args.report, "a") as report:
                report.write(json.dumps(asdict(trial)) + "\n")
        status = "VIOLATION " + "; ".join(trial.violations) if trial.violations else "ok"
        print(f"[fuzz] trial {index + 1}/{args.trials} {trial.kind} {trial.storage} "
              f"{'async' if trial.asynchronous else 'sync'} "
              f"faults={trial.faults} exits={trial.outcomes} newest_valid={trial.resumed_from}: {status}", flush=True)
    kinds = collections.Counter(f"{trial.kind}/{trial.storage}" for trial in trials)
    failed = [trial for trial in trials if trial.violations]
    print(f"[fuzz] {len(trials)} trials in {time.monotonic() - started:.0f}s: {dict(kinds)}; "
          f"{len(failed)} with violations; job output in {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
