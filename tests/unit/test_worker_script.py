"""``script=path/train.py`` runs like ``python path/train.py``: the same sys.path[0], __file__ and
sys.argv, so the script's own modules import. Real processes: the worker and a plain interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.env import CONFIG_ENV

SCRIPT = """\
import json, sys
import helper  # a module next to the script, as torchvision's reference imports `presets`
json.dump({"path0": sys.path[0], "file": __file__, "argv": sys.argv, "name": __name__,
           "helper": helper.VALUE}, open(sys.argv[-1], "w"))
"""


def _script_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(SCRIPT)
    (folder / "helper.py").write_text("VALUE = 'imported from the script folder'\n")
    return folder


def test_a_script_run_by_the_worker_sees_what_python_would_show_it(tmp_path):
    _script_folder(tmp_path)
    cwd = tmp_path  # a relative script path, from another folder, as a user types it
    plain, launched = tmp_path / "plain" / "seen.json", tmp_path / "launched" / "seen.json"
    plain.parent.mkdir(), launched.parent.mkdir()
    subprocess.run([sys.executable, "project/train.py", "--lr=0.1", str(plain)], cwd=cwd, check=True)
    config = {"script": "project/train.py", "script_args": ["--lr=0.1", str(launched)]}
    result = subprocess.run([sys.executable, "-m", "harness.launch.worker"], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, CONFIG_ENV: yaml.safe_dump(config)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    expected, seen = json.loads(plain.read_text()), json.loads(launched.read_text())
    assert seen["argv"][-1] == str(launched)
    seen["argv"][-1] = str(plain)
    assert seen == expected
    assert seen["path0"] == str(tmp_path / "project") and os.path.isabs(seen["file"])
    assert seen["argv"][0] == "project/train.py" and seen["name"] == "__main__"


@pytest.mark.parametrize("nproc", ["given", "counted"])
def test_the_launcher_starts_its_ranks_without_importing_torch_itself(tmp_path, nproc):
    """Each rank imports torch; the launcher does not (importing it there first delayed every rank's
    start by ~2 s): not when given launcher.nproc_per_node, nor when it counts GPUs on a host without
    a GPU driver (then 2 CPU ranks). A rank's script reads its parent's memory map."""
    from harness.launch.local import GPU_DRIVER_NODES

    if nproc == "counted" and any(os.path.exists(node) for node in GPU_DRIVER_NODES):
        pytest.skip("a GPU driver is here: the launcher imports torch to count the GPUs")
    script = tmp_path / "parent_maps.py"
    script.write_text("import os, sys\n"
                      "maps = open(f'/proc/{os.getppid()}/maps').read()\n"
                      "seen = repr(['libtorch' in maps, 'libpython' in maps or 'python' in maps])\n"
                      "open(sys.argv[1] + os.environ['RANK'], 'w').write(seen)\n")
    seen = tmp_path / "seen"
    given = ["launcher.nproc_per_node=1"] if nproc == "given" else []
    result = subprocess.run([sys.executable, "-m", "harness.launch", *given,
                             f"checkpoint.dir={tmp_path / 'ckpt'}", f"script={script}", f"script_args=[{seen}]"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = sorted(path.name for path in tmp_path.glob("seen*"))
    assert ranks == (["seen0"] if nproc == "given" else ["seen0", "seen1"])
    for rank in ranks:  # the control: the map was read, and it is a Python process
        assert (tmp_path / rank).read_text() == "[False, True]"
