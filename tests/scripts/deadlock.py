"""A user's script whose two ranks wait for each other in a collective forever (each receives from
the other, neither sends): stuck in native code, where no Python signal handler runs. Each rank
writes ``<argv[1]><rank>`` once it is blocked (tests/e2e/test_errors.py)."""

import sys

import torch
import torch.distributed as dist

import harness


def main() -> None:
    with harness.Session(harness.load_config()):
        with open(f"{sys.argv[1]}{dist.get_rank()}", "w") as ready:
            ready.write("about to block\n")
        dist.recv(torch.zeros(1), src=1 - dist.get_rank())


if __name__ == "__main__":
    harness.entrypoint(main)
