"""``python -m harness.launch --help`` is generated from the schema; command-line typos get a suggestion."""

from __future__ import annotations

import subprocess
import sys

from harness.config import LAUNCHERS, schema_keys
from harness.launch.usage import help_text, unknown_key


def test_help_lists_every_key_of_the_schema_with_its_default_and_comment(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.launch", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = schema_keys()
    assert {"checkpoint.verify", "launcher.nodes", "launcher.partition", "launcher.max_restarts"} <= \
        {key.key for key in keys}
    for key in keys:
        assert f"{key.key}={key.default}" in done.stdout, key
        assert key.comment and key.comment in done.stdout, key
    for launcher in LAUNCHERS:
        assert f"launcher: {', '.join(LAUNCHERS)}" in done.stdout and launcher in done.stdout
    assert "checkpoint.dir=checkpoints/${name}" in done.stdout, "interpolations are shown as written"
    assert "_schema" not in done.stdout
    assert "--cfg,-c" in done.stdout, "Hydra's own flags are still listed"


def test_the_help_text_is_the_schema_so_a_new_field_appears_without_editing_it():
    text = help_text()
    assert len([line for line in text.splitlines() if "=" in line.split(" ")[0]]) >= len(schema_keys())


def test_a_typo_gets_the_closest_key_and_a_key_of_another_launcher_says_which():
    assert "did you mean trainer.max_steps?" in unknown_key("trainer.max_step")
    assert "did you mean checkpoint?" in unknown_key("chekpoint")
    assert "did you mean launcher.nodes (launcher=slurm)?" in unknown_key("launcher.node")
    assert "is a key of launcher=slurm" in unknown_key("launcher.timeout_min")
    assert "did you mean" not in unknown_key("zzzz")


def test_an_unquoted_script_args_gets_the_list_syntax_and_other_overrides_the_general_hint(tmp_path):
    def refused(override: str) -> str:
        done = subprocess.run([sys.executable, "-m", "harness.launch", "script=train.py", override],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr
        return done.stderr.strip().splitlines()[-1]

    assert "script_args takes a list of quoted strings, e.g. 'script_args=[\"--lr=3e-4\"," in refused("script_args=--lr=3")
    assert "write KEY=VALUE" in refused("trainer.max_steps=[=")
