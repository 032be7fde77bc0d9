"""``python -m benchmarks.gpu``: the async checkpoint of GPU-resident state, against DCP, on one GPU.

    python -m benchmarks.gpu [--sizes 1B,7B] [--reps 2] [--dir /tmp/harness-gpu] [--json FILE] [--ablate]

Sizes: ``1B`` is a 1B-parameter training state in fp32 with AdamW's two moments (12 bytes per
parameter); ``7B`` is 7B parameters of bf16 weights (2 bytes per parameter: a 7B state with its
optimizer would not fit the test machine's host memory twice, once per writer). The state lives on
``cuda:0`` as 1 GiB tensors. A "training step" is a fixed chain of bf16 matmuls on the same GPU
(about 50 ms), so the slow-down of the steps that overlap a background write can be measured.

Per size and writer (the harness's ``CheckpointWriter(asynchronous=True)`` and
``torch.distributed.checkpoint.async_save``):

- ``blocked_s``: until ``submit()`` / ``async_save()`` returns (the CPU is free);
- ``gpu_blocked_s``: until the training stream is free again (the device-to-host copy has landed:
  the harness copies on a side stream and makes the training stream wait for it);
- ``durable_s``: until the checkpoint is committed (fsync'd, manifest written);
- ``effective_stall_s``: ``blocked_s`` plus what the overlapping steps took beyond a step with no
  save in flight.

``pinned_d2h_GBps`` is measured first (one 1 GiB copy into pinned memory); the target is
``gpu_blocked_s <= 1.5 x state bytes / pinned_d2h_GBps``. Never part of CI.

``--ablate`` (issue 23: where does the effective stall go?) also times each part of the writer's
background work alone, after the same snapshot into the same pinned buffer: ``copy`` (only the
device-to-host copy), ``hash`` (XXH3 over the buffer in 8 MiB calls, one thread), ``write``
(O_DIRECT writes of 8 MiB, 4 in flight, and fsync: no hash), ``handoffs`` (the writer's thread
wake-ups and GIL hand-offs per 8 MiB piece, with no work in them). ``step_slowdown`` is how much
slower the overlapping steps ran than a step with nothing in flight.

``--device cpu --sizes smoke`` runs the same code on the CPU with a 0.2 GB state (a check that the
script runs before a GPU's minutes are spent on it; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.checkpoint import checksum
from harness.checkpoint.storage.directio import ALIGN, CHUNK, IN_FLIGHT, open_direct
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.writer import CheckpointWriter, FlatSnapshot
from harness.env import free_port

GB = 1e9
TENSOR_ELEMENTS = 1 << 28  # elements per state tensor (1 GiB in fp32)
SIZES = {"1B": (1_000_000_000, torch.float32, 3), "7B": (7_000_000_000, torch.bfloat16, 1),
         "smoke": (50_000_000, torch.float32, 1)}
ABLATIONS = ("copy", "hash", "write", "handoffs")
DEVICE = "cuda"  # --device cpu: the smoke run


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def say(text: str) -> None:
    print(f"[gpu-bench] {text}", file=sys.stderr, flush=True)


def build_state(params: int, dtype: torch.dtype, copies: int) -> dict:
    """``copies`` groups (weights, then optimizer moments) of ``params`` elements on cuda:0."""
    state: dict[str, Any] = {}
    for group in range(copies):
        left, index = params, 0
        while left > 0:
            count = min(TENSOR_ELEMENTS, left)
            state[f"g{group}/t{index}"] = torch.randn(count, device=DEVICE, dtype=torch.float32).to(dtype)
            left -= count
            index += 1
    return {"state": state}


def state_bytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload["state"].values())


class Step:
    """A fixed GPU workload standing in for a training step; ``__call__`` returns its seconds."""

    def __init__(self) -> None:
        side = 8192 if DEVICE == "cuda" else 512
        self.a = torch.randn(side, side, device=DEVICE, dtype=torch.bfloat16)
        self.b = torch.randn(side, side, device=DEVICE, dtype=torch.bfloat16)
        self.repeat = 1
        self()  # the first product initialises cuBLAS: not a step
        while self() < 0.05:
            self.repeat *= 2

    def __call__(self) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(self.repeat):
            torch.mm(self.a, self.b)
        sync()
        return time.perf_counter() - started


def pinned_bandwidth() -> float:
    if DEVICE != "cuda":
        return float("nan")
    source = torch.empty(TENSOR_ELEMENTS, device="cuda")
    target = torch.empty(TENSOR_ELEMENTS, pin_memory=True)
    target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return source.numel() * 4 / GB / (time.perf_counter() - started)


def measure(step: Step, save: Callable[[], Callable[[], bool]], finish: Callable[[], None]) -> dict:
    """One save overlapped with steps. ``save()`` starts it and returns ``done()``."""
    baseline = statistics.median(step() for _ in range(3))
    sync()
    started = time.perf_counter()
    done = save()
    blocked = time.perf_counter() - started
    sync()
    gpu_blocked = time.perf_counter() - started
    overlapping = []
    while not done():
        overlapping.append(step())
    finish()
    durable = time.perf_counter() - started
    stall = blocked + max(0.0, sum(overlapping) - baseline * len(overlapping))
    slowdown = statistics.mean(overlapping) / baseline - 1 if overlapping else 0.0
    return {"blocked_s": blocked, "gpu_blocked_s": gpu_blocked, "durable_s": durable,
            "effective_stall_s": stall, "step_s": baseline, "overlapped_steps": len(overlapping),
            "step_slowdown": slowdown}


def harness_reps(payload: dict, folder: str, reps: int, step: Step) -> list[dict]:
    store = CheckpointStore(LocalStorage(os.path.join(folder, "harness")))
    writer = CheckpointWriter(store, Retention(keep_last=1), asynchronous=True)
    writer.submit(0, payload, {})  # the first save allocates and pins the host buffer: not a rep
    writer.flush()
    results = []
    for rep in range(reps):
        done = threading.Event()

        def save() -> Callable[[], bool]:
            writer.submit(rep + 1, payload, {})
            threading.Thread(target=lambda: (writer.flush(), done.set())).start()
            return done.is_set

        results.append(measure(step, save, writer.flush))
    assert store.problems(store.latest_listed()) == []
    buffer = writer._snapshot._buffer
    results[0]["snapshot_pinned"] = float(buffer.is_pinned())
    results[0]["snapshot_page_aligned"] = float(buffer.data_ptr() % 4096 == 0)  # O_DIRECT in place
    del writer
    shutil.rmtree(store.root)
    return results


def _hash(image: memoryview) -> None:
    hasher = checksum.new()
    for start in range(0, image.nbytes, CHUNK):
        checksum.update(hasher, image[start:start + CHUNK])


def _write(image: memoryview, path: str) -> None:
    fd = open_direct(path)
    if fd is None:  # a filesystem without O_DIRECT (tmpfs): buffered, as the harness falls back to
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
            aligned = image.nbytes // ALIGN * ALIGN
            list(pool.map(lambda start: os.pwrite(fd, image[start:min(start + CHUNK, aligned)], start),
                          range(0, aligned, CHUNK)))
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def _handoffs(image: memoryview) -> None:
    """The writer's per-piece thread traffic (a hash task, then a write task that waits for it, at
    most IN_FLIGHT pieces in flight) with no work inside: what the hand-offs alone cost."""
    with ThreadPoolExecutor(max_workers=1) as hasher, ThreadPoolExecutor(max_workers=IN_FLIGHT) as io:
        in_flight: list = []
        for _ in range(0, image.nbytes, CHUNK):
            if len(in_flight) >= IN_FLIGHT:
                in_flight.pop(0).result()
            hashed = hasher.submit(lambda: None)
            in_flight.append(io.submit(lambda hashed=hashed: hashed.result()))
        for future in in_flight:
            future.result()


def ablation_reps(payload: dict, folder: str, reps: int, step: Step) -> dict[str, list[dict]]:
    """Each part of the background write alone (ABLATIONS), after a snapshot like the writer's."""
    snapshot = FlatSnapshot()
    snapshot.take(payload)  # the first take allocates and pins the buffer: not a rep
    snapshot.wait()
    nbytes = state_bytes(payload)
    work = {"copy": lambda image: None, "hash": _hash,
            "write": lambda image: _write(image, os.path.join(folder, "ablation.bin")),
            "handoffs": _handoffs}
    results: dict[str, list[dict]] = {}
    for rep in range(reps):
        for mode in ABLATIONS:  # alternated, so a slow minute of the disk is not one mode's
            done = threading.Event()

            def save() -> Callable[[], bool]:
                snapshot.take(payload)
                image = memoryview(snapshot._buffer[:nbytes].numpy())

                def background() -> None:
                    snapshot.wait()
                    work[mode](image)
                    done.set()

                threading.Thread(target=background).start()
                return done.is_set

            results.setdefault(mode, []).append(measure(step, save, done.wait))
    return results


def dcp_reps(payload: dict, folder: str, reps: int, step: Step) -> list[dict]:
    import torch.distributed.checkpoint as dcp

    results = []
    for rep in range(reps + 1):  # the first one warms DCP's stager up, like the harness's first save
        target = os.path.join(folder, f"dcp-{rep}")
        future = None

        def save() -> Callable[[], bool]:
            nonlocal future
            response = dcp.async_save(payload, checkpoint_id=target)
            future = getattr(response, "upload_completion", response)  # newer torch: a response pair
            return future.done

        result = measure(step, save, lambda: future.result())
        if rep:
            results.append(result)
        shutil.rmtree(target)
    return results


def summarize(reps: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in reps[0]:
        values = [rep[key] for rep in reps if key in rep]
        out[key] = statistics.median(values)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1B,7B")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="folder on the disk to write (default: a temp folder)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--ablate", action="store_true",
                        help="also time each part of the background write alone (copy, hash, write, handoffs)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of this script without a GPU (use --sizes smoke)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU visible")
    folder = tempfile.mkdtemp(prefix="harness-gpu-bench-", dir=args.dir)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (cpu)", "torch": torch.__version__,
                              "pinned_d2h_GBps": pinned_bandwidth(), "sizes": {}}
    step = Step()
    try:
        for label in args.sizes.split(","):
            params, dtype, copies = SIZES[label]
            payload = build_state(params, dtype, copies)
            nbytes = state_bytes(payload)
            say(f"{label}: {nbytes / GB:.1f} GB on {report['gpu']}")
            harness = summarize(harness_reps(payload, folder, args.reps, step))
            say(f"{label}: harness {json.dumps({k: round(v, 3) for k, v in harness.items() if '_m' not in k})}")
            dcp = summarize(dcp_reps(payload, folder, args.reps, step))
            say(f"{label}: dcp {json.dumps({k: round(v, 3) for k, v in dcp.items() if '_m' not in k})}")
            floor = nbytes / GB / report["pinned_d2h_GBps"]
            report["sizes"][label] = {
                "state_bytes": nbytes, "dtype": str(dtype), "harness": harness, "dcp_async_save": dcp,
                "d2h_floor_s": floor, "gpu_blocked_over_floor": harness["gpu_blocked_s"] / floor,
                "effective_stall_over_floor": harness["effective_stall_s"] / floor,
                "target_met": harness["gpu_blocked_s"] <= 1.5 * floor}
            if args.ablate:
                parts = {mode: summarize(reps) for mode, reps in ablation_reps(payload, folder, args.reps, step).items()}
                for mode, part in parts.items():
                    say(f"{label}: {mode} alone: stall {part['effective_stall_s']:.3f} s, steps "
                        f"{part['step_slowdown']:+.1%} over {part['durable_s']:.2f} s")
                report["sizes"][label]["ablation"] = parts
            del payload
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
