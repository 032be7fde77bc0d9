"""Resume a run of ``task.model`` with ``trainer.strategy=fsdp`` and save, from rank 0, the full
(unsharded) model and optimizer state exactly as loaded, before any step (tests/e2e/test_fsdp.py).

    python -m harness.launch script=tests/scripts/fsdp_dump.py script_args=[OUT] ...
"""

import sys

import torch
from hydra.utils import instantiate
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import harness


def main() -> None:
    cfg = harness.load_config()
    with harness.Session(cfg) as session:
        model = session.prepare(instantiate(cfg.task.model))
        optimizer = instantiate(cfg.task.optimizer)(model.parameters())
        session.register(optimizer=optimizer)
        session.start()  # resumes: every rank loads its shards, resharded to this world size
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=full)
        if session.env.is_main:
            torch.save({"model": model_state, "optimizer": optimizer_state, "step": session.step}, sys.argv[1])


if __name__ == "__main__":
    main()
