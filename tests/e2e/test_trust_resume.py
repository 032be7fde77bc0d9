"""A real launch resumes from the previous valid checkpoint when the newest one cannot be trusted:
a payload whose safetensors header lies (its checksum recomputed to match), or a copy of an older
checkpoint under a newer step's folder name."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_launch, steps_with_saves
from harness.checkpoint import checksum

ONE_RANK = ("launcher.nproc_per_node=1", "checkpoint.every_steps=10", "checkpoint.keep_last=0")


def _bogus_header_with_matching_checksum(step_dir) -> None:
    payload = step_dir / "state.safetensors"
    data = (1 << 62).to_bytes(8, "little") + payload.read_bytes()[8:]
    payload.write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["state.safetensors"] = checksum.file_entry(len(data), checksum.of_bytes(data))
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["bogus-header", "misnamed-copy"])
def test_resume_falls_back_to_the_previous_valid_checkpoint(tmp_path, damage):
    ckpt_dir = tmp_path / "ckpt"
    first = run_launch(ckpt_dir, "trainer.max_steps=30", *ONE_RANK)
    assert first.returncode == 0, first.stderr
    assert steps_with_saves(ckpt_dir) == [10, 20, 30]
    if damage == "bogus-header":  # the newest, step 30, cannot be read
        _bogus_header_with_matching_checksum(ckpt_dir / "step_000000030")
        skipped, expected = ckpt_dir / "step_000000030", 20
    else:  # a copy of step 10 under a newer name; step 30 stays the newest valid one
        shutil.copytree(ckpt_dir / "step_000000010", ckpt_dir / "step_000000900")
        skipped, expected = ckpt_dir / "step_000000900", 30
    second = run_launch(ckpt_dir, "trainer.max_steps=40", *ONE_RANK)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in second.stdout.splitlines() if "resumed from" in line]
    print(f"{damage}: {resumed}\n" + "\n".join(line for line in second.stderr.splitlines() if str(skipped) in line))
    assert f"resumed from {ckpt_dir}/step_{expected:09d} at step {expected}" in second.stdout
    reason = "header" if damage == "bogus-header" else "says step 10"
    assert any(str(skipped) in line and reason in line for line in second.stderr.splitlines()), second.stderr
    assert (skipped / "manifest.json").exists()  # skipped, not deleted
    assert json.loads((ckpt_dir / "step_000000040" / "manifest.json").read_text())["step"] == 40
