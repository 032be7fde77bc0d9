"""A user's FSDP2 loop in the shape of pytorch/examples' distributed/FSDP2 (tests/e2e/test_fsdp.py).

``--build plain``: the model is built on the CPU and ``session.prepare`` shards it. ``--build meta``:
built on the meta device (no memory), sharded, materialised and initialised by ``prepare(init=...)``;
its ``scale`` buffer is computed in ``__init__`` (like RoPE's frequencies), so ``init`` must set it.
``--build own``: the script calls ``fully_shard`` itself with its own options and ``prepare`` takes
the sharded model as it is. ``--stop-at K``: rank 1 asks for a stop in step K. ``--dump FILE``: rank
0 saves the full model and optimizer state at the end. ``--no-init`` (a meta model without ``init=``)
and ``--register-only`` (the model registered, not prepared) are mistakes the harness must refuse.
"""

import argparse

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils.data import TensorDataset

import harness

WIDTH, BLOCKS = 16, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.out = nn.Linear(WIDTH, 1)
        self.register_buffer("scale", self._scale(), persistent=False)  # not in any checkpoint

    @staticmethod
    def _scale() -> torch.Tensor:
        return torch.linspace(0.5, 1.5, WIDTH)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        self.scale.copy_(self._scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) * self.scale
        for layer in self.layers:
            h = layer(h)
        return self.out(h).sum(-1)  # not squeeze(): FSDP2 warns about a view as its output


def build(how: str) -> tuple[nn.Module, dict]:
    if how == "meta":
        with torch.device("meta"):
            return Tiny(), {"init": lambda model: model.reset_parameters()}
    model = Tiny()
    if how == "own":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
    return model, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", choices=("plain", "meta", "own"), default="plain")
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--dump", default="")
    parser.add_argument("--no-init", action="store_true", help="a meta model without init= (an error)")
    parser.add_argument("--register-only", action="store_true", help="register the model, skip prepare()")
    args = parser.parse_args()
    cfg = harness.load_config()
    with harness.Session(cfg) as session:
        model, options = build(args.build)
        if args.no_init:
            options = {}
        if args.register_only:
            session.register(model=model)
        else:
            model = session.prepare(model, **options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        session.register(optimizer=optimizer)
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(256, 8, generator=generator), torch.randn(256, generator=generator))
        for inputs, targets in session.batches(session.loader(data, batch_size=8)):
            if session.step + 1 == args.stop_at and session.env.rank == 1:
                session.request_stop()
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            session.log(loss=loss.detach())
            session.check_stop()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=full)
        scale = model.scale.full_tensor() if hasattr(model.scale, "full_tensor") else model.scale
        if args.dump and session.env.is_main:
            torch.save({"model": model_state, "optimizer": optimizer_state, "scale": scale.cpu()}, args.dump)


if __name__ == "__main__":
    harness.entrypoint(main)
