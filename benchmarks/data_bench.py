"""``python -m benchmarks.data_bench``: what the harness's data path costs (resume positioning, seeding).

    python -m benchmarks.data_bench [--reps N] [--position P] [--baseline-commit REV] [--json FILE]

Four groups of figures, each a median over ``--reps`` with its min and max beside it:

* **A user's sampler, resumed at position P** (default 1e6 indices): ``position_loader`` then the
  first batch of a loader built with ``sampler=DistributedSampler(...)`` (and ``batch_sampler=``),
  at position 0 and at P. The difference is the skip: the indices before P are drawn and dropped
  (the sampler's own ``__iter__``, e.g. DistributedSampler's ``randperm(n).tolist()``, is in both).
* **Per-batch collate seeding**: ``SeededCollate`` with and without seeding around a collate_fn,
  timed directly in the main process (seed, call, restore the training RNG) and inside a DataLoader
  worker (seed only); and end to end, time per batch of a loader with ``seed_collate`` on and off
  (per-sample seeding off in both), with 0 and 2 workers, and with 0 workers and per-sample
  seeding on (the default loader: the samples already pay for keeping the training RNG)
  (interleaved reps; the difference of two noisy medians).
* **Per-sample seeding in the main process**: time per batch with the training RNG kept once per
  batch (``SeededSamples.__getitems__``) and once per sample (as before), against no seeding.
* **The keyed permutation, now and before** (``--baseline-commit``, default a91c966, the commit
  before user samplers and collate seeding): positioning a ``ResumableSampler`` at P, keys per
  second, and batches per second of ``make_loader``'s default path, for both versions' data.py.

Nothing is written to disk but ``--json``. The numbers are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, default_collate

from harness import data as data_mod

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = "a91c966"  # harness/data.py before user samplers and collate seeding
BATCH = 64  # samples per batch everywhere below
COLLATE_CALLS = 2000  # SeededCollate calls per timed rep
LOADER_BATCHES = 100  # batches per end-to-end loader rep
KEYS = 1 << 18  # sampler keys per keys-per-second rep


class Indices(Dataset):
    """Sample ``i`` is ``tensor(i)``: loading costs next to nothing, so the harness's part shows."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


def user_collate(samples: list) -> torch.Tensor:
    """A collate_fn of the user's (not ``default_collate``), so the harness seeds around it."""
    return default_collate(samples)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "reps": len(values)}


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ----- a user's sampler at a position -------------------------------------------------------------
def _first_batch_at(loader: DataLoader, batch: int) -> float:
    def first() -> None:
        data_mod.position_loader(loader, seed=0, epoch=3, batch_in_epoch=batch)
        next(iter(loader))
    return timed(first)


def measure_user_sampler_skip(position: int, reps: int) -> dict:
    """First batch at position 0 and at ``position`` with a user's sampler and batch sampler."""
    dataset = Indices(position + 16 * BATCH)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loaders = {
        "sampler": data_mod.make_loader(dataset, BATCH, rank=0, world_size=1, seed=0, sampler=sampler),
        "batch_sampler": data_mod.make_loader(dataset, None, rank=0, world_size=1, seed=0,
                                              batch_sampler=BatchSampler(sampler, BATCH, drop_last=True)),
    }
    result = {}
    for name, loader in loaders.items():
        at_start, at_position = [], []
        for _ in range(reps):
            at_start.append(_first_batch_at(loader, 0))
            at_position.append(_first_batch_at(loader, position // BATCH))
        skips = [late - statistics.median(at_start) for late in at_position]
        result[name] = {"first_batch_at_0_s": summary(at_start), "first_batch_at_position_s": summary(at_position),
                        "skip_s": summary(skips)}
    return result


# ----- per-batch collate seeding ------------------------------------------------------------------
def _keyed_batch() -> list:
    sample_seeds = data_mod.sample_seeds(0, 0, np.arange(BATCH, dtype=np.uint64)).tolist()
    return [(seed, torch.tensor(index)) for index, seed in enumerate(sample_seeds)]


def collate_call_us(seeded: bool, calls: int = COLLATE_CALLS) -> float:
    """Microseconds per ``SeededCollate`` call around ``user_collate`` in this process."""
    collate, keyed = data_mod.SeededCollate(user_collate, seed_collate=seeded), _keyed_batch()
    started = time.perf_counter()
    for _ in range(calls):
        collate(keyed)
    return (time.perf_counter() - started) / calls * 1e6


class CollateTimer(Dataset):
    """Item ``i``, loaded in a DataLoader worker: (seeded, unseeded) µs per collate call there."""

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([collate_call_us(True), collate_call_us(False)], dtype=torch.float64)


def measure_collate_direct(reps: int) -> dict:
    main_on, main_off = [], []
    for _ in range(reps):
        main_on.append(collate_call_us(True))
        main_off.append(collate_call_us(False))
    # One worker: two would time each other's share of the CPU.
    iterator = iter(DataLoader(CollateTimer(), batch_size=None, num_workers=1))
    worker_rows = [next(iterator) for _ in range(reps)]
    del iterator  # its workers stop now, not while the next figures are measured
    worker_on, worker_off = [float(row[0]) for row in worker_rows], [float(row[1]) for row in worker_rows]
    return {"main_seeded_us": summary(main_on), "main_unseeded_us": summary(main_off),
            "main_cost_us": summary([on - statistics.median(main_off) for on in main_on]),
            "worker_seeded_us": summary(worker_on), "worker_unseeded_us": summary(worker_off),
            "worker_cost_us": summary([on - statistics.median(worker_off) for on in worker_on])}


def _loader_batch_us(loader: DataLoader, batches: int) -> float:
    data_mod.position_loader(loader, seed=0, epoch=0, batch_in_epoch=0)
    iterator = iter(loader)
    next(iterator)  # workers started and the pipeline primed: not per-batch cost
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - started
    del iterator
    return elapsed / batches * 1e6


def measure_collate_end_to_end(workers: int, reps: int, seed_samples: bool = False) -> dict:
    """Time per batch with and without collate seeding. ``seed_samples=False``: the collate alone
    pays for keeping the training RNG; True (the default loader): the batch's samples already pay
    for it, and the collate adds its seeding only."""
    dataset = Indices((LOADER_BATCHES + 8) * BATCH)
    loaders = {seeded: data_mod.make_loader(dataset, BATCH, rank=0, world_size=1, seed=0, num_workers=workers,
                                            collate_fn=user_collate, seed_collate=seeded, seed_samples=seed_samples)
               for seeded in (True, False)}
    on, off = [], []
    for _ in range(reps):  # interleaved, so drift of the machine hits both alike
        on.append(_loader_batch_us(loaders[True], LOADER_BATCHES))
        off.append(_loader_batch_us(loaders[False], LOADER_BATCHES))
    return {"seeded_batch_us": summary(on), "unseeded_batch_us": summary(off),
            "cost_us": summary([value - statistics.median(off) for value in on])}


def _sample_seeding_loader(dataset: Dataset, seeded: bool, per_batch: bool) -> DataLoader:
    loader = data_mod.make_loader(dataset, BATCH, rank=0, world_size=1, seed=0, seed_samples=seeded)
    if not per_batch:  # DataLoader then fetches sample by sample: the RNG kept around each one
        loader.dataset.__getitems__ = None
    return loader


def measure_sample_seeding(reps: int) -> dict:
    """Per-sample seeding in the main process (``num_workers=0``), per batch: the training RNG kept
    once around the batch (``SeededSamples.__getitems__``) against once around every sample."""
    dataset = Indices((LOADER_BATCHES + 8) * BATCH)
    loaders = {"per_batch": _sample_seeding_loader(dataset, True, per_batch=True),
               "per_sample": _sample_seeding_loader(dataset, True, per_batch=False),
               "unseeded": _sample_seeding_loader(dataset, False, per_batch=True)}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(reps):  # interleaved, so drift of the machine hits all alike
        for name, loader in loaders.items():
            times[name].append(_loader_batch_us(loader, LOADER_BATCHES))
    unseeded = statistics.median(times["unseeded"])
    return {"unseeded_batch_us": summary(times["unseeded"]),
            "cost_rng_kept_per_batch_us": summary([value - unseeded for value in times["per_batch"]]),
            "cost_rng_kept_per_sample_us": summary([value - unseeded for value in times["per_sample"]])}


# ----- the keyed permutation, now and before ------------------------------------------------------
def load_baseline(commit: str) -> Optional[ModuleType]:
    """harness/data.py as of ``commit``, imported under another name; None when git cannot show it."""
    shown = subprocess.run(["git", "show", f"{commit}:harness/data.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        say(f"baseline {commit} not available ({shown.stderr.strip()}): comparing nothing")
        return None
    folder = tempfile.mkdtemp(prefix="data-bench-")
    path = os.path.join(folder, f"data_{commit}.py")
    with open(path, "w") as handle:
        handle.write(shown.stdout)
    spec = importlib.util.spec_from_file_location(f"harness_data_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    os.unlink(path)
    os.rmdir(folder)
    return module


def measure_keyed(module: ModuleType, position: int, reps: int) -> dict:
    size = 10 * position
    sampler = module.ResumableSampler(size, batch_size=BATCH, rank=0, world_size=2, seed=0)

    def first_key_at_position() -> None:
        sampler.set_position(0, 3, position // BATCH)
        next(iter(sampler))

    def keys() -> None:
        sampler.set_position(0, 3, 0)
        for _ in itertools.islice(iter(sampler), KEYS):
            pass

    loader = module.make_loader(Indices((LOADER_BATCHES + 8) * BATCH), BATCH, 0, 1, 0)
    positioning, per_key, per_batch = [], [], []
    for _ in range(reps):
        positioning.append(timed(first_key_at_position))
        per_key.append(timed(keys) / KEYS * 1e9)
        per_batch.append(_baseline_loader_batch_us(module, loader))
    return {"first_key_at_position_s": summary(positioning), "key_ns": summary(per_key),
            "default_loader_batch_us": summary(per_batch)}


def _baseline_loader_batch_us(module: ModuleType, loader: DataLoader) -> float:
    module.position_loader(loader, 0, 0, 0)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(iterator)
    return (time.perf_counter() - started) / LOADER_BATCHES * 1e6


# ----- the report ---------------------------------------------------------------------------------
def run(position: int, reps: int, baseline_commit: str) -> dict:
    report: dict = {"position": position, "batch_size": BATCH, "reps": reps, "torch": torch.__version__,
                    "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    say(f"a user's sampler at position {position} ...")
    report["user_sampler"] = measure_user_sampler_skip(position, reps)
    say("collate seeding, direct ...")
    report["collate_direct"] = measure_collate_direct(reps)
    for workers in (0, 2):
        say(f"collate seeding, end to end, {workers} workers ...")
        report[f"collate_loader_{workers}_workers"] = measure_collate_end_to_end(workers, reps)
    say("collate seeding, end to end, 0 workers, samples seeded too ...")
    report["collate_loader_0_workers_samples_seeded"] = measure_collate_end_to_end(0, reps, seed_samples=True)
    say("sample seeding, main process ...")
    report["sample_seeding_0_workers"] = measure_sample_seeding(reps)
    say("the keyed permutation, now ...")
    report["keyed_now"] = measure_keyed(data_mod, position, reps)
    baseline = load_baseline(baseline_commit)
    if baseline is not None:
        say(f"the keyed permutation, {baseline_commit} ...")
        report[f"keyed_{baseline_commit}"] = measure_keyed(baseline, position, reps)
    return report


def rows(report: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """(dotted name, summary) of every measured figure in ``report``."""
    found = []
    for key, value in report.items():
        if isinstance(value, dict) and "median" in value:
            found.append((prefix + key, value))
        elif isinstance(value, dict):
            found += rows(value, f"{prefix}{key}.")
    return found


def print_report(report: dict) -> None:
    print(f"harness data benchmark: position {report['position']}, batch {report['batch_size']}, "
          f"{report['reps']} reps, load average {report['load_average'][0]:.1f}")
    for name, value in rows(report):
        print(f"  {name:58s} {value['median']:12.4g}   [{value['min']:.4g} .. {value['max']:.4g}]")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per figure (default 5)")
    parser.add_argument("--position", type=int, default=1_000_000, help="resume position in samples (default 1e6)")
    parser.add_argument("--baseline-commit", default=DEFAULT_BASELINE,
                        help=f"the data.py to compare the keyed permutation with (default {DEFAULT_BASELINE})")
    parser.add_argument("--json", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = run(args.position, args.reps, args.baseline_commit)
    print_report(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
