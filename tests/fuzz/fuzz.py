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
small tmpfs (root only). Each trial is sync or async at random.

    python tests/fuzz/fuzz.py --trials 200 --seed 1 --report fuzz.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
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
from harness.checkpoint.storage import LocalStorage  # noqa: E402
from harness.checkpoint.store import CheckpointStore  # noqa: E402

SAVES = STEPS // EVERY
JOB_TIMEOUT = 120


@dataclass
class Trial:
    index: int
    kind: str
    asynchronous: bool
    faults: list = field(default_factory=list)  # FaultPlan dicts, or {"random_kill_s": t} / {"tmpfs_bytes": n}
    outcomes: list = field(default_factory=list)  # exit codes of the faulty launches
    resumed_from: list = field(default_factory=list)  # the newest valid step after each faulty launch
    violations: list = field(default_factory=list)


def run_job(ckpt_dir: Path, asynchronous: bool, fault: Optional[dict] = None, kill_after_s: float = 0,
            log: Optional[Path] = None) -> tuple[int, str]:
    command = [sys.executable, str(HERE / "job.py"), "--dir", str(ckpt_dir)]
    if asynchronous:
        command.append("--async-save")
    if fault:
        command += ["--fault", json.dumps(fault)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        if kill_after_s:
            try:
                process.wait(timeout=kill_after_s)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        output += "\n[fuzz] TIMED OUT (a hang)"
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"\n===== fault={fault} kill_after_s={kill_after_s} exit={process.returncode}\n{output}")
    return process.returncode, output


def final_state(ckpt_dir: Path) -> dict:
    store = CheckpointStore(LocalStorage(str(ckpt_dir)))
    ref = store.latest_valid()
    payload = read_payload(str(ckpt_dir / ref.payload_path))
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


def check_folder(ckpt_dir: Path, floor: int, trial: Trial) -> int:
    """Invariant 1; returns the newest valid step (0: none)."""
    store = CheckpointStore(LocalStorage(str(ckpt_dir)))
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
        return "kill_at_random_instant", {"random_kill_s": round(rng.uniform(2.0, 6.0), 2)}
    if roll < 0.9:
        op = rng.choice(["write_payload", "write_manifest", "remove_dir", "list_names", "read_bytes"])
        limit = {"remove_dir": SAVES - KEEP_LAST, "list_names": 2 * SAVES, "read_bytes": 3 * SAVES}.get(op, SAVES)
        return "storage_error", asdict(FaultPlan(op=op, nth=rng.randint(1, limit), action=rng.choice(sorted(ERRORS)),
                                                 once=rng.random() < 0.5))
    return "full_disk", {"tmpfs_bytes": rng.randint(2_000_000, 4_000_000)}


def run_trial(index: int, rng: random.Random, workdir: Path, reference: dict, log: Path) -> Trial:
    kind, fault = pick_fault(rng)
    trial = Trial(index=index, kind=kind, asynchronous=rng.random() < 0.5, faults=[fault])
    folder = workdir / f"trial_{index:04d}"
    outside = folder / "outside"
    outside.mkdir(parents=True)
    (outside / "sentinel.txt").write_text("must not change\n")
    before = folder_digest(outside)
    ckpt_dir = folder / "ckpt"
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
            code, _ = run_job(ckpt_dir, trial.asynchronous, kill_after_s=fault["random_kill_s"], log=log)
            floor = 0
        elif "tmpfs_bytes" in fault:
            code, _ = run_job(ckpt_dir, trial.asynchronous, log=log)
            floor = 0
            subprocess.run(["mount", "-o", "remount,size=200m", str(ckpt_dir)], check=True)
        else:
            code, _ = run_job(ckpt_dir, trial.asynchronous, fault=fault, log=log)
            floor = durable_floor(fault) if code != 0 else STEPS
        trial.outcomes.append(code)
        trial.resumed_from.append(check_folder(ckpt_dir, floor, trial))
        if rng.random() < 0.3:  # a second launch whose resume reads fail
            second = asdict(FaultPlan(op=rng.choice(["read_bytes", "list_names"]), nth=rng.randint(1, 3),
                                      action=rng.choice(sorted(ERRORS)), once=True))
            trial.faults.append(second)
            code, _ = run_job(ckpt_dir, trial.asynchronous, fault=second, log=log)
            trial.outcomes.append(code)
            trial.resumed_from.append(check_folder(ckpt_dir, trial.resumed_from[-1] if code != 0 else STEPS, trial))
        code, output = run_job(ckpt_dir, trial.asynchronous, log=log)
        if code != 0:
            trial.violations.append(f"the clean relaunch exited {code}: {output[-600:]}")
        else:
            found = differences(final_state(ckpt_dir), reference)
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
    parser.add_argument("--report", type=Path, help="write every trial as JSON here")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="harness-fuzz-"))
    log = workdir / "jobs.log"
    rng = random.Random(args.seed)
    started = time.monotonic()
    code, output = run_job(workdir / "reference", asynchronous=False, log=log)
    if code != 0:
        print(f"the uninterrupted reference run failed ({code}):\n{output}")
        return 1
    reference = final_state(workdir / "reference")
    trials = []
    for index in range(args.trials):
        trial = run_trial(index, rng, workdir, reference, log)
        trials.append(trial)
        status = "VIOLATION " + "; ".join(trial.violations) if trial.violations else "ok"
        print(f"[fuzz] trial {index + 1}/{args.trials} {trial.kind} {'async' if trial.asynchronous else 'sync'} "
              f"faults={trial.faults} exits={trial.outcomes} newest_valid={trial.resumed_from}: {status}", flush=True)
    kinds = collections.Counter(trial.kind for trial in trials)
    failed = [trial for trial in trials if trial.violations]
    print(f"[fuzz] {len(trials)} trials in {time.monotonic() - started:.0f}s: {dict(kinds)}; "
          f"{len(failed)} with violations; job output in {log}")
    if args.report:
        args.report.write_text(json.dumps([asdict(trial) for trial in trials], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
