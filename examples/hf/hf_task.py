"""Pieces of the ``hf_gpt2`` task: a byte-level text dataset generated from a seed, and the loss.

The model needs no code here: ``conf/task/hf_gpt2.yaml`` builds ``transformers.GPT2LMHeadModel``
from a ``transformers.GPT2Config`` (Hydra instantiates the nested ``_target_``), so nothing is
downloaded. The text is bytes, so the vocabulary is 256 and no tokenizer is needed either.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

SUBJECTS = ("the launcher", "rank zero", "a worker", "the scheduler", "the checkpoint", "the loader")
VERBS = ("saves", "resumes", "stops", "restores", "writes", "agrees on")
OBJECTS = ("the step", "every tensor", "the data position", "its random state", "the manifest last")


class GeneratedText(Dataset):
    """Windows of ``block_size`` bytes over a text of simple sentences drawn from ``seed``.

    Item ``i`` is ``{"input_ids": ...}`` of the window at offset ``i * stride`` (a dict, as a
    Hugging Face model takes it); the same ``seed`` gives the same text on every rank.
    """

    def __init__(self, num_sentences: int = 400, block_size: int = 32, stride: int = 8, seed: int = 0):
        rng = random.Random(seed)
        text = " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                        for _ in range(num_sentences))
        self.tokens = torch.tensor(list(text.encode("ascii")), dtype=torch.long)
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size) // self.stride

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.stride
        return {"input_ids": self.tokens[start: start + self.block_size]}


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """loss_fn(model, batch): next-token cross-entropy, computed by the model (labels are shifted
    inside Hugging Face's causal LM heads)."""
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
