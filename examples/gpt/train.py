"""A character-level GPT trained nanoGPT-style in a script of your own, made resumable by the harness.

    python -m harness.launch script=examples/gpt/train.py name=gpt trainer.max_steps=200 \
        checkpoint.every_steps=25 checkpoint.best_metric=val_loss checkpoint.keep_best=1

The loop is the one you would write anyway: gradient accumulation, bf16 autocast, gradient
clipping, a warm-up + cosine learning rate set by hand every step, an evaluation every few steps.
The harness adds only ``session.*`` calls: it resumes, saves, keeps the best checkpoint by the
``val_loss`` this script logs (evaluate in the steps that save) and stops on a signal; a resumed
run equals an uninterrupted one bit for bit.

The text is this repository's README.md (read from disk, nothing downloaded); ``--text`` picks
another file. Flags after ``script_args`` set the model and the loop, the rest is harness config.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

import harness

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "README.md"


# ----- the data: a text as characters, cut into windows ------------------------------------------
class CharTokenizer:
    """One token per distinct character of the text."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {char: i for i, char in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[char] for char in text], dtype=torch.long)

    def decode(self, tokens: list[int]) -> str:
        return "".join(self.chars[token] for token in tokens)


class TokenWindows(Dataset):
    """Item ``i``: the ``block_size`` tokens from offset ``i`` and the same shifted by one (targets).

    Map-style, so the harness can position it: with ``replacement=True`` the loader draws random
    offsets, as nanoGPT's get_batch does, but from (seed, epoch, position) and hence resumable.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int):
        if len(tokens) <= block_size:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of block_size={block_size}")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[offset: offset + self.block_size + 1]
        return chunk[:-1], chunk[1:]


# ----- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.1


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (PyTorch's fused scaled_dot_product_attention)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.out = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.out_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        heads = self.qkv(x).view(batch, time, 3, self.n_head, channels // self.n_head).transpose(1, 3)
        q, k, v = heads.unbind(dim=2)  # each (batch, head, time, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(batch, time, channels)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.n_embd)
        self.attention = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Pre-norm decoder-only transformer; the output projection shares the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy (in fp32 even under autocast)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' 1-d params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def learning_rate(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``max_lr``, then cosine decay to ``min_ratio * max_lr`` at ``total``."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(session: harness.Session, model: nn.Module, loader: DataLoader, device_type: str) -> float | None:
    """Mean validation loss over every rank's share; None when a stop was agreed meanwhile (the step
    then ends, the harness saves it and stops). Dropout is off, so no RNG is drawn."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=session.device)
    try:
        for tokens, targets in loader:
            if session.check_stop():  # a collective: every rank runs the same number of batches
                return None
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = model(tokens.to(session.device), targets.to(session.device))
            totals += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=session.device)])
    finally:
        model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def validation_loader(session: harness.Session, dataset: Dataset, batches: int, batch_size: int) -> DataLoader:
    """The same fixed, evenly spaced windows at every evaluation; each rank takes its share."""
    world, rank = session.env.world_size, session.env.rank
    count = batches * batch_size * world
    stride = max(1, len(dataset) // count)
    offsets = [i * stride for i in range(count)][rank::world]
    return DataLoader(Subset(dataset, offsets), batch_size=batch_size, shuffle=False)


# ----- the training loop --------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a text file to learn")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per rank")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=4, help="batches per rank per evaluation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # The launcher's config (python -m harness.launch script=...). Keeping the best checkpoint by
    # validation loss is config too: checkpoint.best_metric=val_loss checkpoint.keep_best=1.
    cfg = harness.load_config()
    text = args.text.read_text(encoding="utf-8")
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    split = int(0.9 * len(tokens))
    train_set = TokenWindows(tokens[:split], args.block_size)
    val_set = TokenWindows(tokens[split:], args.block_size)

    with harness.Session(cfg) as session:
        device_type = session.device.type
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
        model = session.prepare(GPT(config))
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        session.register(optimizer=optimizer)  # the LR is a function of session.step: nothing to save
        train_loader = session.loader(train_set, batch_size=args.batch_size, replacement=True)
        val_loader = validation_loader(session, val_set, args.eval_batches, args.batch_size)
        total_steps = cfg.trainer.max_steps

        for micro in session.batches(train_loader, accumulate=args.accumulate):
            lr = learning_rate(session.step, args.lr, args.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=session.device)
            for tokens_batch, targets in session.micro_batches(model, micro):
                with torch.autocast(device_type, dtype=torch.bfloat16):
                    loss = model(tokens_batch.to(session.device), targets.to(session.device)) / len(micro)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            session.log(loss=loss_sum, lr=lr, grad_norm=grad_norm)

            if (session.step + 1) % args.eval_every == 0:  # session.step counts completed steps
                val_loss = evaluate(session, model, val_loader, device_type)
                if val_loss is not None:
                    session.log(val_loss=val_loss)


if __name__ == "__main__":
    harness.entrypoint(main)
