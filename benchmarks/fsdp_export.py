"""Peak host memory of ``ckpt export`` on a sharded checkpoint: the streamed export (one full tensor
at a time, harness.tools.sharded_export) against reading the whole model first (the old path).

    python -m benchmarks.fsdp_export [--mb 400] [--tensors 8] [--folder /tmp/fsdp-export-bench]

Writes a DCP checkpoint of ``--tensors`` fp32 tensors totalling ``--mb`` MB (model plus AdamW-sized
optimizer state, as fsdp saves it), then exports its model in a fresh process per path and prints
that process's peak RSS (VmHWM) above its RSS once torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def _child(path: str, folder: str, out: str) -> None:
    import torch

    from harness.strategy.fsdp import read_full_state
    from harness.tools.sharded_export import export

    base = _status_mb("VmRSS")
    started = time.perf_counter()
    if path == "streamed":
        export(folder, "model", out, "torch", None)
    else:
        torch.save(read_full_state(folder)["model"], out)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report the peak
    # of the parent that wrote the checkpoint.
    peak = _status_mb("VmHWM")
    print(json.dumps({"path": path, "peak_above_start_mb": round(peak - base, 1), "s": round(time.perf_counter() - started, 2)}))


def _write_checkpoint(folder: str, mb: int, tensors: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    rows = mb * 2**20 // 4 // 3 // tensors // 1024  # model + exp_avg + exp_avg_sq
    model = {f"layer{i}.weight": torch.randn(rows, 1024) for i in range(tensors)}
    optimizer = {"state": {key: {"exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
                           for key, t in model.items()}}
    shutil.rmtree(folder, ignore_errors=True)
    dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=folder, no_dist=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--folder", default="/tmp/fsdp-export-bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    _write_checkpoint(args.folder + "/shards", args.mb, args.tensors)
    model_mb = sum(os.path.getsize(os.path.join(args.folder, "shards", f)) for f in os.listdir(args.folder + "/shards")) / 3 / 2**20
    print(f"model ~{model_mb:.0f} MB of fp32 in {args.tensors} tensors (checkpoint ~{3 * model_mb:.0f} MB)")
    for path in ("streamed", "whole", "streamed", "whole"):
        out = os.path.join(args.folder, f"{path}.pt")
        subprocess.run([sys.executable, "-m", "benchmarks.fsdp_export", "--child", path, args.folder + "/shards", out],
                       check=True)
        os.unlink(out)
    shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
