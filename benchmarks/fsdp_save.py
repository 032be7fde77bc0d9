"""Sharded save cost with FSDP2 on CPU ranks over gloo: DCP's synchronous ``save`` against its
``async_save`` (thread, default stager), per rank. Not part of the installed package.

    python -m benchmarks.fsdp_save --ranks 2 --blocks 12 --width 1024 --reps 3

Reports, per rank (medians): the sync save's wall time (what a save blocks the loop today with
trainer.strategy=fsdp), async_save's blocked time (until it returns), its time until the future is
done, and the training-step slowdown while the background write runs (effective stall).
"""

from __future__ import annotations

import argparse
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


def _rank(rank: int, args: argparse.Namespace, port: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    torch.manual_seed(0)
    model = _model(args.blocks, args.width)
    mesh = init_device_mesh("cpu", (args.ranks,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # async_save's collectives run in a background thread: on the group FSDP's own collectives use
    # they interleave with training steps and hang; DCP's docs ask for a separate (gloo) group.
    save_group = dist.new_group(backend="gloo")
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
        model_state, optim_state = get_state_dict(model, optimizer)
        dist.barrier()
        started = time.perf_counter()
        future = dcp.async_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=f"{folder}/async{rep}",
                                process_group=save_group)
        found["async_block_s"].append(time.perf_counter() - started)
        overlapped = sum(_step(model, optimizer, args.width) for _ in range(STEPS_OVERLAPPED))
        future.result()
        found["async_done_s"].append(time.perf_counter() - started)
        found["stall_s"].append(found["async_block_s"][-1] + overlapped - STEPS_OVERLAPPED * step_s)
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
