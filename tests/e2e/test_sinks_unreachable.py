"""A logging service that cannot be reached never costs training: W&B online with its server down."""

from __future__ import annotations

import socket

import pytest

from conftest import metrics, require_module, run_launch, steps_with_saves


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(600)
def test_wandb_unreachable_at_start_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    require_module("wandb", "the W&B sink needs wandb (pip install 'harness[wandb]')")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    ckpt_dir = tmp_path / "ckpt"
    result = run_launch(ckpt_dir, "launcher.nproc_per_node=1", "trainer.max_steps=20", "checkpoint.every_steps=10",
                        "log.wandb=true", "log.wandb_mode=online", f"log.wandb_dir={tmp_path / 'wandb'}",
                        timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("could not open Weights & Biases") == 1, output
    assert "training goes on without it" in output
    assert steps_with_saves(ckpt_dir)[-1] == 20
    assert sorted(metrics(ckpt_dir)) == list(range(1, 21))
