"""Collectives that keep ranks together when one of them fails.

Without these, a rank that raises leaves its peers waiting in the next collective until
``trainer.collective_timeout_s`` (30 minutes by default). Every helper here is a collective: every
rank must call it, in the same order. Errors name the failing rank(s), and carry them as
``failed_ranks`` (FAILED_RANKS): a rank not in it only relays what another rank reports, so the
worker leaves the reporting to the failing rank instead of printing the same failure from every rank.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from harness.checkpoint.errors import CheckpointError

FAILED_RANKS = "failed_ranks"  # attribute of a collective's error: the ranks whose failure it reports
LOST_PEER = "harness_lost_peer"  # set on an error a lost peer caused, once its line was printed


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def on_rank0(work: Callable[[], Any], failure: str, is_main: bool,
             error_type: type[Exception] = CheckpointError) -> Any:
    """Run ``work`` on rank 0 and hand its result to every rank.

    If it raised, every rank raises ``error_type`` with the message "<failure> (rank 0): <error>",
    so no rank is left waiting in a later collective for a peer that died. Results must pickle.
    """
    result, error = None, None
    if is_main:
        try:
            result = work()
        except Exception as exc:  # disk, network, serialization: every rank must learn it
            error = exc
    shared = [result, None if error is None else f"{type(error).__name__}: {error}"]
    if distributed():
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise failed_on(error_type(f"{failure} (rank 0): {shared[1]}"), [0]) from error
    return shared[0]


def raise_if_any_failed(error: Optional[BaseException], failure: str, device: torch.device) -> None:
    """Every rank passes its own error (or None); if any rank failed, every rank raises.

    The failing rank re-raises its own error; the others raise CheckpointError naming which ranks
    failed, so every log says where to look. Ranks that failed with the same message leave it to the
    lowest of them to report (``failed_ranks`` names it), so a job prints one line, not one per rank.
    """
    ranks = which_failed(error, device)
    if len(ranks) > 1:  # a collective, on every rank: each failing rank learns who said it first
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            first = min(rank for rank in ranks if messages[rank] == messages[dist.get_rank()])
            if first != dist.get_rank():  # the same failure, reported once, by the lowest rank that had it
                failed_on(error, [first])
    if error is not None:
        raise error
    if ranks:
        raise failed_on(CheckpointError(f"{failure}: rank(s) {ranks} failed; see their logs"), ranks)


def which_failed(error: Optional[BaseException], device: torch.device) -> list[int]:
    """Every rank passes its own error (or None); every rank learns which ranks failed."""
    if not distributed():
        return [] if error is None else [0]
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    failed[dist.get_rank()] = int(error is not None)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    return [rank for rank, flag in enumerate(failed.tolist()) if flag]


def failed_on(error: Exception, ranks: list[int]) -> Exception:
    """``error`` marked as reported by ``ranks``: the other ranks raise it without a word."""
    setattr(error, FAILED_RANKS, tuple(ranks))
    return error


# gloo names the peer whose connection dropped: "Connection closed by peer [10.77.0.12]:57993",
# "Read error [10.77.0.12]:24812: Connection reset by peer".
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")


@dataclass(frozen=True)
class Peer:
    """Where one rank runs: its node's name and the address its peers reach it at."""

    rank: int
    node: str
    address: str


def this_address() -> str:
    """The address gloo binds for this host: its name as resolved here (127.0.0.1 when unresolvable)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def gather_peers() -> list[Peer]:
    """Every rank's node and address, indexed by rank. A collective; [] without a process group."""
    if not distributed():
        return []
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (os.uname().nodename, this_address()))
    return [Peer(rank, node, address) for rank, (node, address) in enumerate(rows)]


def describe_lost_peer(error: BaseException, peers: list[Peer], me: int) -> Optional[str]:
    """Name the rank(s) and node behind a collective that failed because a peer vanished.

    None when the error does not name a peer address, or no known rank has it.
    """
    match = _PEER_ADDRESS.search(str(error))
    if match is None:
        return None
    lost = [peer for peer in peers if peer.address == match.group(1) and peer.rank != me]
    if not lost:
        return None
    ranks = ", ".join(str(peer.rank) for peer in lost)
    nodes = ", ".join(sorted({peer.node for peer in lost}))
    return (f"lost contact with rank {ranks} on node {nodes} ({match.group(1)}): that node or its "
            "rank died. Stopping; the last committed checkpoint is kept, and the next launch (or "
            "SLURM's requeue) resumes from it")
