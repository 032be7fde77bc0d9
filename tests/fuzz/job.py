"""One crash-fuzz trial's training job: one rank, an MLP with dropout and AdamW under a cosine
schedule, shuffled data, a save every few steps. ``--fault`` (JSON of a FaultPlan) wraps the
checkpoint store's storage in a FaultyStorage."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from faulty import FaultPlan, FaultyStorage
from harness import Session, validate
from harness.env import DistEnv
from harness.example import MLP, SyntheticClassification, classification_loss

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                 master_port=0, source="single")
STEPS = 40
EVERY = 4
KEEP_LAST = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, help="checkpoint folder or s3:// URL")
    parser.add_argument("--staging", default=None, help="checkpoint.staging_dir (commit here, upload to --dir)")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--fault", default="", help="a FaultPlan as JSON")
    args = parser.parse_args()
    cfg = validate({"trainer": {"max_steps": STEPS, "seed": 7, "num_threads": 1, "log_every": 1000},
                    "checkpoint": {"dir": args.dir, "every_steps": EVERY, "keep_last": KEEP_LAST,
                                   "async_save": args.async_save, "staging_dir": args.staging}})
    with Session(cfg, env=SINGLE) as session:
        if args.fault:
            store = session.checkpoints.store
            store.storage = FaultyStorage(store.storage, FaultPlan(**json.loads(args.fault)))
        model = session.prepare(MLP(in_features=32, hidden=256, num_classes=8, dropout=0.1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
        session.register(optimizer=optimizer, scheduler=scheduler)
        loader = session.loader(SyntheticClassification(num_samples=512, seed=7), batch_size=32)
        for batch in session.batches(loader):
            loss = classification_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            session.log(loss=loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
