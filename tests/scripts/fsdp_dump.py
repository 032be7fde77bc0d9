"""Resume a run of ``task.model`` with ``trainer.strategy=fsdp`` and save, from rank 0, the full
(unsharded) model and optimizer state exactly as loaded, before any step, and the bytes each rank
read from files while the session started (its resume or init_from) (tests/e2e/test_fsdp.py).

    python -m harness.launch script=tests/scripts/fsdp_dump.py script_args=[OUT] ...
"""

import sys

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import harness


def _bytes_read() -> int:
    """Bytes this process has read through read() and its kind so far (``rchar``, cached or not)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def main() -> None:
    cfg = harness.load_config()
    with harness.Session(cfg) as session:
        model = session.prepare(instantiate(cfg.task.model))
        optimizer = instantiate(cfg.task.optimizer)(model.parameters())
        session.register(optimizer=optimizer)
        read_before = _bytes_read()
        session.start()  # resumes: every rank loads its shards, resharded to this world size
        read = [_bytes_read() - read_before]
        if dist.is_initialized():  # one rank runs without a process group
            mine, read = read[0], [None] * session.env.world_size
            dist.all_gather_object(read, mine)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=full)
        if session.env.is_main:
            torch.save({"model": model_state, "optimizer": optimizer_state, "step": session.step,
                        "read_bytes": read}, sys.argv[1])


if __name__ == "__main__":
    main()
