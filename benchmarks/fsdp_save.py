"""Sharded save cost with FSDP2 on CPU ranks over gloo: DCP's synchronous ``save`` against its
``async_save`` (thread, default stager), per rank. Not part of the installed package.

    python -m benchmarks.fsdp_save --ranks 2 --blocks 12 --width 1024 --reps 3

Reports, per rank (medians): the sync save's wall time (what a save blocks the loop today with
trainer.strategy=fsdp), async_save's blocked time (until it returns), its time until the future is
done, and the training-step slowdown while the background write runs (effective stall).

    python -m benchmarks.fsdp_save --memory --ranks 2 --blocks 12 --width 1024

measures instead the peak resident memory of each rank while it saves and while it loads a sharded
checkpoint the way the harness does (harness.strategy.dcp_state: ``get_state_dict`` templates, DCP
``save``/``load``, ``set_state_dict``), above what the rank held before the phase, next to its shard
file and the model's largest tensor: "no rank ever holds the whole state" in numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import torch.multiprocessing as mp

STEPS_OVERLAPPED = 3  # training steps run while an async save is in flight
CLEAR_PEAK = "5"  # written to /proc/self/clear_refs: resets VmHWM to the current RSS (Linux >= 4.0)


def _model(blocks: int, width: int) -> nn.Module:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                                      nn.Linear(2 * width, width)) for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = x + block(x)
            return x

    return Model()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> float:
    started = time.perf_counter()
    model(torch.randn(8, width)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def _status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident since the last
    reset). Not ``ru_maxrss``: it cannot be reset (and survives execve)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in kB. Heap memory
    that was freed but is still resident is first handed back (``malloc_trim``), so a phase that
    allocates cannot hide in it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write(CLEAR_PEAK)
    return _status_kb("VmRSS")


def _memory(rank: int, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
            folder: str) -> dict:
    """Peak RSS above the phase's start, per phase, for one save and one load through the harness's
    DCP path (the same calls as trainer.strategy=fsdp), after a training step filled AdamW's state."""
    from harness.strategy import dcp_state

    _step(model, optimizer, args.width)
    target = f"{folder}/memory"
    found: dict[str, float] = {}
    for phase in ("save", "load"):
        dist.barrier()
        before = _reset_peak()
        if phase == "save":
            dcp_state.save(dcp_state.template(model, "model", [optimizer]), target)
        else:
            dcp_state.load(target, model, "model", [optimizer])
        found[f"{phase}_rss_before_mb"] = round(before / 1024, 1)
        found[f"{phase}_peak_above_mb"] = round((_status_kb("VmHWM") - before) / 1024, 1)
    shard = os.path.getsize(f"{target}/__{rank}_0.distcp")
    largest = max(param.numel() * param.element_size() for param in model.parameters())  # full (DTensor) shape
    return found | {"shard_file_mb": round(shard / 2**20, 1), "largest_tensor_mb": round(largest / 2**20, 1),
                    "whole_state_mb": round(shard * args.ranks / 2**20, 1)}


def _rank(rank: int, args: argparse.Namespace, port: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    torch.manual_seed(0)
    bare_mb = round(_status_kb("VmRSS") / 1024, 1)  # torch and the process group, no model yet
    mesh = init_device_mesh("cpu", (args.ranks,))
    # --memory: built on the meta device and materialised sharded, so no rank ever held the whole
    # model before the measured phases (the harness's task.meta_init does the same on a resume).
    with torch.device("meta" if args.memory else "cpu"):
        model = _model(args.blocks, args.width)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if args.memory:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # async_save's collectives run in a background thread: on the group FSDP's own collectives use
    # they interleave with training steps and hang; DCP's docs ask for a separate (gloo) group.
    save_group = dist.new_group(backend="gloo")
    if args.memory:
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"rank": rank, "bare_rss_mb": bare_mb} | _memory(rank, args, model, optimizer, folder), handle)
        dist.destroy_process_group()
        return
    step_s = statistics.median(_step(model, optimizer, args.width) for _ in range(3))
    found: dict[str, list[float]] = {"sync_s": [], "async_block_s": [], "async_done_s": [], "stall_s": []}
    for rep in range(args.reps):
        print(f"[rank {rank}] rep {rep}", flush=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        dist.barrier()
        started = time.perf_counter()
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=f"{folder}/sync{rep}",
                 process_group=save_group)
        found["sync_s"].append(time.perf_counter() - started)
        # The same steps without a save, just before: the baseline of this repetition (a loaded
        # machine drifts between repetitions, and the first steps warm up).
        alone = sum(_step(model, optimizer, args.width) for _ in range(STEPS_OVERLAPPED))
        model_state, optim_state = get_state_dict(model, optimizer)
        dist.barrier()
        started = time.perf_counter()
        future = dcp.async_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=f"{folder}/async{rep}",
                                process_group=save_group)
        found["async_block_s"].append(time.perf_counter() - started)
        overlapped = sum(_step(model, optimizer, args.width) for _ in range(STEPS_OVERLAPPED))
        future.result()
        found["async_done_s"].append(time.perf_counter() - started)
        found["stall_s"].append(found["async_block_s"][-1] + overlapped - alone)
        dist.barrier()
    state_bytes = sum(t.to_local().numel() * t.element_size() for t in model.parameters()) * 3
    result = {key: round(statistics.median(values), 3) for key, values in found.items()}
    result |= {"rank": rank, "step_s": round(step_s, 3), "state_mb_per_rank": round(state_bytes / 1e6, 1)}
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--memory", action="store_true", help="peak RSS per rank on save and load instead of times")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fsdp-save-", dir=args.dir)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = os.path.join(folder, "result")
    try:
        mp.spawn(_rank, args=(args, port, folder, out), nprocs=args.ranks, join=True)
        for rank in range(args.ranks):
            with open(f"{out}.{rank}") as handle:
                print(json.dumps(json.load(handle)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
