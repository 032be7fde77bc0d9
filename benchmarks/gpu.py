"""``python -m benchmarks.gpu``: the async checkpoint of GPU-resident state, against DCP, on one GPU.

    python -m benchmarks.gpu [--sizes 1B,7B] [--reps 2] [--dir /tmp/harness-gpu] [--json FILE]

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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.writer import CheckpointWriter
from harness.env import free_port

GB = 1e9
TENSOR_ELEMENTS = 1 << 28  # elements per state tensor (1 GiB in fp32)
SIZES = {"1B": (1_000_000_000, torch.float32, 3), "7B": (7_000_000_000, torch.bfloat16, 1)}


def say(text: str) -> None:
    print(f"[gpu-bench] {text}", file=sys.stderr, flush=True)


def build_state(params: int, dtype: torch.dtype, copies: int) -> dict:
    """``copies`` groups (weights, then optimizer moments) of ``params`` elements on cuda:0."""
    state: dict[str, Any] = {}
    for group in range(copies):
        left, index = params, 0
        while left > 0:
            count = min(TENSOR_ELEMENTS, left)
            state[f"g{group}/t{index}"] = torch.randn(count, device="cuda", dtype=torch.float32).to(dtype)
            left -= count
            index += 1
    return {"state": state}


def state_bytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload["state"].values())


class Step:
    """A fixed GPU workload standing in for a training step; ``__call__`` returns its seconds."""

    def __init__(self) -> None:
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.repeat = 1
        self()  # the first product initialises cuBLAS: not a step
        while self() < 0.05:
            self.repeat *= 2

    def __call__(self) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(self.repeat):
            torch.mm(self.a, self.b)
        torch.cuda.synchronize()
        return time.perf_counter() - started


def pinned_bandwidth() -> float:
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
    torch.cuda.synchronize()
    started = time.perf_counter()
    done = save()
    blocked = time.perf_counter() - started
    torch.cuda.current_stream().synchronize()
    gpu_blocked = time.perf_counter() - started
    overlapping = []
    while not done():
        overlapping.append(step())
    finish()
    durable = time.perf_counter() - started
    stall = blocked + max(0.0, sum(overlapping) - baseline * len(overlapping))
    return {"blocked_s": blocked, "gpu_blocked_s": gpu_blocked, "durable_s": durable,
            "effective_stall_s": stall, "step_s": baseline, "overlapped_steps": len(overlapping)}


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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no GPU visible")
    folder = tempfile.mkdtemp(prefix="harness-gpu-bench-", dir=args.dir)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
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
                "target_met": harness["gpu_blocked_s"] <= 1.5 * floor}
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
