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
from harness.launch.backend import backend_runner

# The presets: conf/ at the repository's top level, installed as the package harness.conf (pyproject).
CONF_PATH = "pkg://harness.conf"


def launch(cfg: DictConfig) -> int:
    """Validate the composed config and hand it to the chosen backend; returns the exit code."""
    try:
        config_data = to_plain(cfg)
        typed = validate(config_data)
        if typed.task is None and typed.script is None:
            raise ConfigError("nothing to train: choose a task preset (task=example) for the built-in "
                              "loop, or run your own training script with script=path/to/train.py")
        if typed.script is not None and not os.path.isfile(typed.script):
            raise ConfigError(f"script={typed.script}: no such file (relative paths start from "
                              f"{os.getcwd()})")
    except (ConfigError, ValueError) as error:
        print(f"harness: invalid configuration: {error}", file=sys.stderr)
        return 2
    return backend_runner(typed.launcher.backend)(config_data, typed)


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
