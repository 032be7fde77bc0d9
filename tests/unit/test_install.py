"""What an install ships: every package, the presets, the declared dependencies."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts)
               for init in (REPO / "harness").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert "harness.conf" in listed


def test_presets_are_found_through_the_package_like_a_wheel_would():
    conf = importlib.resources.files("harness.conf")
    assert conf.joinpath("config.yaml").is_file()
    for preset in ("launcher/local.yaml", "launcher/direct.yaml", "launcher/slurm.yaml", "task/example.yaml"):
        assert conf.joinpath(preset).is_file(), preset


def test_numpy_is_a_declared_runtime_dependency():
    # torch.distributed's object collectives and the saved numpy RNG state need it; torch's CPU wheel
    # does not bring it.
    assert any(dep.startswith("numpy") for dep in _pyproject()["project"]["dependencies"])


def test_public_api_imports_lazily():
    code = ("import sys, harness; assert 'torch' not in sys.modules; "
            "from harness import Session, Preempted, CheckpointError, validate; "
            "assert Preempted(3, 'x').code == 75; print(sorted(harness.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Session" in done.stdout


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the wheel build alone may take its own 600 s limit
def test_the_wheel_carries_every_module_and_the_presets(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("harness-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (REPO / "harness").rglob("*.py"):
        assert "/".join(source.relative_to(REPO).parts) in names, source
    for preset in (REPO / "conf").rglob("*.yaml"):
        assert "harness/conf/" + "/".join(preset.relative_to(REPO / "conf").parts) in names, preset
    assert not any(name.startswith(("benchmarks/", "tests/")) for name in names)
