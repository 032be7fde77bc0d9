"""Logs, per step, which samples all ranks consumed and what their augmentations drew
(tests/e2e/test_data_stream.py): proof that a world-size change keeps the sample stream."""

import argparse
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

import harness


class AugmentedIndices(Dataset):
    """Sample i: its index and an 'augmentation' drawn from torch, random and numpy together."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int):
        drawn = torch.rand(()).item() + random.random() + float(np.random.rand())
        return torch.tensor(index), torch.tensor(drawn, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True, help="samples per rank per step")
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--own-sampler", action="store_true",
                        help="a DistributedSampler of the script's own instead of the harness's order")
    args = parser.parse_args()
    with harness.Session(harness.load_config()) as session:
        model = session.prepare(torch.nn.Linear(1, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        session.register(optimizer=optimizer)
        dataset = AugmentedIndices()
        sampler = DistributedSampler(dataset, num_replicas=session.env.world_size, rank=session.env.rank,
                                     shuffle=True, seed=3) if args.own_sampler else None
        loader = session.loader(dataset, batch_size=args.batch, num_workers=1, sampler=sampler)
        for index, drawn in session.batches(loader):
            stats = torch.stack([index.double().sum(), index.double().pow(2).sum(), drawn.sum()])
            if dist.is_initialized():
                dist.all_reduce(stats)
            session.log(index_sum=stats[0], index_square_sum=stats[1], drawn_sum=stats[2])
            model(drawn.float().unsqueeze(1)).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if session.step + 1 == args.stop_at:
                session.request_stop()


if __name__ == "__main__":
    harness.entrypoint(main)
