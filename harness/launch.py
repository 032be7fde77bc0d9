"""``python -m harness.launch``: the Hydra-configured launcher.

Examples::

    python -m harness.launch                                   # example task, local DDP
    python -m harness.launch name=exp1 trainer.max_steps=1000 launcher.nproc_per_node=4
    python -m harness.launch launcher=slurm launcher.nodes=2   # submit through submitit
    torchrun --nproc-per-node 2 -m harness.launch launcher=direct   # ranks started by torchrun/srun
    python -m harness.launch --help                            # every option and preset

A relaunch with the same ``name`` (or ``checkpoint.dir``) resumes from its newest checkpoint.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from harness.config import ConfigError, register_configs, to_plain, validate

# The presets: conf/ at the repository's top level, installed as the package harness.conf (pyproject).
CONF_PATH = "pkg://harness.conf"


def launch(cfg: DictConfig) -> int:
    """Validate the composed config and hand it to the chosen backend; returns the exit code."""
    try:
        config_data = to_plain(cfg)
        typed = validate(config_data)
    except (ConfigError, ValueError) as error:
        print(f"harness: invalid configuration: {error}", file=sys.stderr)
        return 2
    backend = typed.launcher.backend
    if backend == "local":
        from harness.backends.local import run_local

        return run_local(config_data, typed.launcher)
    if backend == "direct":
        from harness.worker import install_stop_flag

        flag = install_stop_flag(config_data)  # before the imports below pull in torch
        from harness.backends.direct import run_direct

        return run_direct(config_data, flag)
    from harness.backends.slurm import submit

    return submit(config_data, typed)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    code = launch(cfg)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
