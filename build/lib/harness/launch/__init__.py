"""Launching: ``python -m harness.launch`` (Hydra) -> a backend (local, direct, slurm) -> workers.

Nothing here imports torch, so a rank started in-process installs its stop handlers first.
"""
