"""Model unwrapping and state-dict key mapping: prefixes, renames, incompatible-key reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

# Prefixes that wrappers add to parameter names. Saving never needs them (we save from the unwrapped
# module); they are only stripped from OLD files that were saved from a wrapper.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers, however nested."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``module.`` / ``_orig_mod.`` (any nesting) from every key of an old file.

    Only prefixes shared by ALL keys are removed, so a model whose own submodule is called ``module``
    keeps its names.
    """
    result = dict(state)
    while result:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in result)), None)
        if prefix is None:
            return result
        result = {key[len(prefix):]: value for key, value in result.items()}
    return result


def align_wrapper_prefixes(state: Mapping[str, torch.Tensor], own_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Keys as the receiving module names them: unchanged when they already match (a module whose own
    keys all start with ``module.``, e.g. timm's ModelEmaV2, keeps them), else wrapper prefixes of an
    old file stripped."""
    own = set(own_keys)
    if set(state) == own:
        return dict(state)
    return strip_wrapper_prefixes(state)


def rename_prefixes(state: Mapping[str, torch.Tensor], rules: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Apply prefix renames such as ``{"backbone.": "encoder."}``; the longest matching rule wins."""
    ordered = sorted(rules.items(), key=lambda item: len(item[0]), reverse=True)
    renamed = {}
    for key, value in state.items():
        for old, new in ordered:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


@dataclass
class KeyReport:
    """What did not match when loading weights into a model, in three groups."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        if self.clean:
            return "all keys matched"
        lines = []
        for title, keys in (("missing in file", self.missing), ("unexpected in file", self.unexpected),
                            ("shape mismatch (skipped)", self.mismatched)):
            if keys:
                lines.append(f"{title} ({len(keys)}):")
                lines.extend(f"  {key}" for key in keys)
        return "\n".join(lines)


def match_state(model_state: Mapping[str, torch.Tensor],
                file_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """The loadable subset of ``file_state`` and a report of what was left out and why."""
    report = KeyReport()
    loadable = {}
    for key, value in file_state.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            report.mismatched.append(
                f"{key}: file {tuple(value.shape)} vs model {tuple(model_state[key].shape)}")
        else:
            loadable[key] = value
    report.missing = sorted(key for key in model_state if key not in file_state)
    report.unexpected.sort()
    report.mismatched.sort()
    return loadable, report
