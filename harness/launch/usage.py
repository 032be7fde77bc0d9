"""What a person reads when the command line asks for help or is wrong.

``help_template()`` is the text of ``python -m harness.launch --help``, generated from the schema
(``harness.config.schema_keys``: every key of every launcher, its default and its comment), so it
cannot drift from it. ``describe(error)`` turns Hydra's and OmegaConf's errors about a command line
(an unknown key, a value of the wrong type, a preset that does not exist, bad override syntax) into
one line that names the key, with "did you mean" for a typo. Both hide the internal ``*_schema``
entries that the presets extend.
"""

from __future__ import annotations

import difflib
import re
from typing import Optional, Sequence

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue,
                              OmegaConfBaseException)

from harness.config import CONFIG_ERROR_EXIT_CODE, LAUNCHERS, PREEMPTED_EXIT_CODE, SchemaKey, schema_keys

SCHEMA_SUFFIX = "_schema"  # ConfigStore entries the presets extend (harness.config.register_configs)
HELP_KEY_WIDTH = 40  # column where a key's comment starts in --help
MATCH_CUTOFF = 0.6  # difflib similarity a typo needs to get a suggestion

_INTRO = """python -m harness.launch [KEY=VALUE ...]: train with DDP, checkpoint, survive preemption.

== Presets (group=option) ==
launcher: {launchers}  (default: local)
task:     example (an MLP on synthetic data), or your own conf/task/NAME.yaml (or --config-dir)
script:   script=path/to/train.py runs YOUR training script on every rank instead of a task

== Exit codes ==
0 finished, {preempted} preempted (checkpoint saved: relaunch to resume), 1 a rank failed or the checkpoint
folder is unusable (the message says why), {config} invalid configuration or SLURM refused the job,
130 stopped without saving (second Ctrl-C)

== Logging ==
metrics.jsonl in checkpoint.dir; log.tensorboard=true and log.wandb=true (pip install
'harness[tensorboard]' / 'harness[wandb]') write the same values, one run across restarts

== Keys (KEY=DEFAULT; ??? means the task preset sets it; --cfg job prints the composed config) ==
"""


def help_text(keys: Optional[Sequence[SchemaKey]] = None) -> str:
    """The help, as a person reads it: the presets, exit codes, then every key by section."""
    keys = list(keys if keys is not None else schema_keys())
    lines = [_INTRO.format(launchers=", ".join(LAUNCHERS), preempted=PREEMPTED_EXIT_CODE,
                           config=CONFIG_ERROR_EXIT_CODE)]
    lines += [_key_line(key) for key in keys if key.launcher is None]
    for launcher in LAUNCHERS:
        own = [key for key in keys if key.launcher == launcher]
        if own:
            lines.append(f"\n== launcher={launcher} keys ==")
            lines += [_key_line(key) for key in own]
    return "\n".join(lines) + "\n\n$FLAGS_HELP"


def help_template() -> str:
    """``help_text`` escaped for where Hydra reads it: OmegaConf resolves ``${...}`` in the config
    value, then ``string.Template`` substitutes ``$FLAGS_HELP``. A default such as
    ``checkpoints/${name}`` must come out as written."""
    text = help_text()
    flags = "$FLAGS_HELP"
    body = text[:-len(flags)].replace("$", "$$").replace("$${", "$\\${")
    return body + flags


def _key_line(key: SchemaKey) -> str:
    setting = f"{key.key}={key.default}"
    if not key.comment:
        return setting
    return f"{setting:<{HELP_KEY_WIDTH}} {key.comment}" if len(setting) < HELP_KEY_WIDTH else \
        f"{setting}\n{'':<{HELP_KEY_WIDTH}} {key.comment}"


# ---- errors ------------------------------------------------------------------------------------------

def describe(error: BaseException) -> str:
    """One line for a command-line error from Hydra (composition, override syntax, missing preset)
    or OmegaConf (unknown key, wrong type, missing value), naming the key and the fix."""
    if isinstance(error, MissingConfigException):
        return _missing_preset(error)
    if isinstance(error, OverrideParseException):
        if str(error.override).startswith("script_args="):  # the one list users type by hand
            return (f"{error.override!r} is not a valid override ({_first_line(error.message)}): script_args "
                    "takes a list of quoted strings, e.g. 'script_args=[\"--lr=3e-4\",\"--tag\",\"x\"]' "
                    "(single quotes around it all for the shell)")
        return (f"{error.override!r} is not a valid override ({_first_line(error.message)}): write KEY=VALUE, "
                "e.g. trainer.max_steps=1000")
    cause = error.__cause__
    if not isinstance(error, OmegaConfBaseException) and isinstance(cause, OmegaConfBaseException):
        error = cause  # Hydra's "Could not override ..." wraps OmegaConf's error, which names the key
    if isinstance(error, OmegaConfBaseException):
        return _omegaconf_error(error)
    return _first_line(str(error))


def _omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or ""
    message = _first_line(getattr(error, "msg", None) or str(error))
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and " not in " in message:
        return unknown_key(key)
    if isinstance(error, MissingMandatoryValue):
        return f"{key} has no value (???): set it on the command line or in the task preset"
    converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", message)
    if converted:
        return f"{key}={converted.group(1)!r} is invalid: expected {_article(converted.group(2).lower())}"
    return f"{key}: {message}" if key else message


def unknown_key(key: str, keys: Optional[Sequence[SchemaKey]] = None) -> str:
    """``<key> is not a key`` with the closest schema key, and which launcher preset has it."""
    keys = list(keys if keys is not None else schema_keys())
    exact = [item for item in keys if item.key == key and item.launcher]
    if exact:  # a key of another launcher, e.g. launcher.nodes with launcher=local
        presets = " or ".join(f"launcher={item.launcher}" for item in exact)
        return f"{key} is a key of {presets}, not of the launcher this command line uses: add {presets}"
    # Sections too: a misspelt section ("chekpoint") is reported alone, without its sub-key.
    names = sorted({item.key for item in keys} | {item.key.rsplit(".", 1)[0] for item in keys if "." in item.key})
    close = difflib.get_close_matches(key, names, n=1, cutoff=MATCH_CUTOFF)
    hint = f": did you mean {close[0]}{_launcher_note(close[0], keys)}?" if close else ""
    return f"{key} is not a key{hint} (python -m harness.launch --help lists every key)"


def _launcher_note(name: str, keys: Sequence[SchemaKey]) -> str:
    presets = sorted({item.launcher for item in keys if item.key == name and item.launcher})
    return f" (launcher={'|'.join(presets)})" if presets else ""


def _missing_preset(error: MissingConfigException) -> str:
    missing = error.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = sorted(name for name in (error.options or []) if not name.endswith(SCHEMA_SUFFIX))
    if not group:
        return _first_line(str(error))
    close = difflib.get_close_matches(option, options, n=1, cutoff=MATCH_CUTOFF)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    available = ", ".join(options) or "none"
    return (f"{group}={option}: no such preset. {hint}Available: {available} "
            f"(or add conf/{group}/{option}.yaml with --config-dir)")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"
