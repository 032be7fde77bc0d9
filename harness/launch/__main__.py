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
from typing import Optional

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.folder import check_run_folders
from harness.config import CONFIG_ERROR_EXIT_CODE, ConfigError, HarnessConfig, register_configs, to_plain, validate
from harness.launch.backend import backend_runner
from harness.launch.usage import describe, help_template

# The presets: conf/ at the repository's top level, installed as the package harness.conf (pyproject).
CONF_PATH = "pkg://harness.conf"
EXIT_ERROR = 1
# Hydra prints its own composition errors (several lines, "Set the environment variable ...") and
# exits 1, unless this variable is "1": then it raises them, and they are reported here in one line.
HYDRA_FULL_ERROR = "HYDRA_FULL_ERROR"


def launch(cfg: DictConfig) -> int:
    """Validate the composed config, check the checkpoint folder, and hand the job to the chosen
    backend; returns the exit code (2: invalid configuration, 1: the folder cannot be used)."""
    try:
        config_data, typed = _validated(cfg)
    except ConfigError as error:
        return _refuse(f"invalid configuration: {error}", CONFIG_ERROR_EXIT_CODE)
    try:  # before any rank starts: not after the first checkpoint.every_steps steps of training
        check_run_folders(typed.checkpoint.dir, typed.checkpoint.staging_dir)
    except CheckpointError as error:
        return _refuse(str(error), EXIT_ERROR)
    return backend_runner(typed.launcher.backend)(config_data, typed)


def _validated(cfg: DictConfig) -> tuple[dict, HarnessConfig]:
    """(plain config, typed config); ConfigError with one line naming the key otherwise."""
    try:
        config_data = to_plain(cfg)
        typed = validate(config_data)
    except ConfigError:
        raise
    except OmegaConfBaseException as error:  # an unknown key (+foo=1), a missing or mistyped value
        raise ConfigError(describe(error)) from None
    if typed.task is None and typed.script is None:
        raise ConfigError("nothing to train: choose a task preset (task=example) for the built-in "
                          "loop, or run your own training script with script=path/to/train.py")
    if typed.script is not None and not os.path.isfile(typed.script):
        raise ConfigError(f"script={typed.script}: no such file (relative paths start from "
                          f"{os.getcwd()})")
    return config_data, typed


def _refuse(message: str, code: int) -> int:
    print(f"harness: {message}", file=sys.stderr, flush=True)
    return code


def main() -> None:
    """Compose the command line with Hydra and launch. Hydra's own errors about the command line
    (unknown key, wrong type, missing preset, override syntax) exit 2 with one line, like ours."""
    register_configs(help_template())
    user_setting = os.environ.get(HYDRA_FULL_ERROR)
    os.environ[HYDRA_FULL_ERROR] = "1"

    @hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
    def _hydra_main(cfg: DictConfig) -> None:
        # Composition is done: the ranks and the job itself see the user's environment, and an error
        # from here on is reported by Hydra as before (a bug keeps its traceback).
        _restore(user_setting)
        code = launch(cfg)
        sys.stdout.flush()
        sys.stderr.flush()
        if code:
            sys.exit(code)

    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        if user_setting == "1":  # the user asked for Hydra's full traces
            raise
        sys.exit(_refuse(f"invalid configuration: {describe(error)}", CONFIG_ERROR_EXIT_CODE))
    finally:
        _restore(user_setting)


def _restore(user_setting: Optional[str]) -> None:
    if user_setting is None:
        os.environ.pop(HYDRA_FULL_ERROR, None)
    else:
        os.environ[HYDRA_FULL_ERROR] = user_setting


if __name__ == "__main__":
    main()
