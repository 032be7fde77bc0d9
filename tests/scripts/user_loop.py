"""A user's own training loop run by ``python -m harness.launch script=...`` (tests/e2e/test_loops.py).

Gradient accumulation, DDP's no_sync on all but the last micro-batch, an evaluation inside the step.
``--where/--at`` make rank 1 ask for a stop (or every rank call save()) at one point of one step, to
prove that a mid-step call never labels a state with the wrong step. A state carried from batch to
batch differs per rank (like an RNN's hidden state) and feeds the loss: registered per rank, or
with ``--carry-shared`` as a plain registered object (rank 0's, the control that must not resume).
"""

import argparse

import torch

import harness
from harness.example import MLP, SyntheticClassification, classification_loss

POINTS = ("before_forward", "after_backward", "after_step", "in_eval")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--where", choices=POINTS, default=None)
    parser.add_argument("--at", type=int, default=0, help="the step (1-based) in which to act")
    parser.add_argument("--save", action="store_true", help="call session.save() instead of stopping")
    parser.add_argument("--rank0-only", action="store_true", help="with --save: only rank 0 calls it (a mistake)")
    parser.add_argument("--carry-shared", action="store_true", help="register the per-rank carry as shared")
    parser.add_argument("--fail-at", type=int, default=0, help="rank 0 raises a bug of the user's in this step")
    args = parser.parse_args()
    cfg = harness.load_config()
    with harness.Session(cfg) as session:
        model = session.prepare(MLP())
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        session.register(optimizer=optimizer)
        carry = harness.Values(hidden=torch.zeros(()))  # each rank's own, from its own batches
        if args.carry_shared:
            session.register(carry=carry)
        else:
            session.register_per_rank(carry=carry)
        loader = session.loader(SyntheticClassification(seed=cfg.trainer.seed), batch_size=16)

        for micro in session.batches(loader, accumulate=2):
            step = session.step + 1  # the step being computed

            def point(name: str) -> None:
                if name != args.where or step != args.at:
                    return
                if args.save:
                    if session.env.rank == 0 or not args.rank0_only:
                        session.save()
                    return
                if session.env.rank == 1:
                    session.request_stop()
                assert session.check_stop(), "an agreed stop inside a step must report True"

            if step == args.fail_at and session.env.rank == 0:
                raise ValueError(f"a bug in the user's step {step}")
            optimizer.zero_grad(set_to_none=True)
            point("before_forward")
            total = torch.zeros(())
            for batch in session.micro_batches(model, micro):
                loss = (classification_loss(model, batch) * (1 + carry.hidden)) / len(micro)
                carry.hidden = 0.5 * carry.hidden + 0.1 * batch[0].mean().clamp(-1, 1)
                loss.backward()
                total += loss.detach()
            point("after_backward")
            optimizer.step()
            point("after_step")
            session.log(loss=total)
            if step % 5 == 0:
                model.eval()
                with torch.no_grad():
                    for _ in range(3):
                        point("in_eval")
                        if session.check_stop():
                            break
                model.train()


if __name__ == "__main__":
    harness.entrypoint(main)
