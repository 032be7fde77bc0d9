"""Task pieces used by end-to-end tests (imported by worker processes as tests.tasks)."""

import os

from harness.example import classification_loss

_calls = {"n": 0}


def loss_that_fails_on_rank1(model, batch):
    """Like the example's loss, but rank 1 raises on its 5th step: a worker crash."""
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 5:
        raise RuntimeError("deliberate failure in rank 1")
    return classification_loss(model, batch)
