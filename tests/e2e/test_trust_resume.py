"""A real launch resumes from the previous valid checkpoint when the newest one cannot be trusted:
a payload whose safetensors header lies (its checksum recomputed to match), and a copy of an older
checkpoint under a newer step's folder name."""

from __future__ import annotations

import json
import shutil

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


def test_resume_falls_back_past_a_bogus_header_and_a_misnamed_folder(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = run_launch(ckpt_dir, "trainer.max_steps=30", *ONE_RANK)
    assert first.returncode == 0, first.stderr
    assert steps_with_saves(ckpt_dir) == [10, 20, 30]
    _bogus_header_with_matching_checksum(ckpt_dir / "step_000000030")
    shutil.copytree(ckpt_dir / "step_000000010", ckpt_dir / "step_000000900")  # step 10, named 900
    second = run_launch(ckpt_dir, "trainer.max_steps=40", *ONE_RANK)
    print(second.stdout, second.stderr)
    assert second.returncode == 0, second.stderr
    assert f"resumed from {ckpt_dir}/step_000000020 at step 20" in second.stdout
    assert f"{ckpt_dir}/step_000000030" in second.stderr and "header" in second.stderr
    assert f"{ckpt_dir}/step_000000900" in second.stderr and "step 10" in second.stderr
    assert (ckpt_dir / "step_000000900" / "manifest.json").exists()
    assert json.loads((ckpt_dir / "step_000000040" / "manifest.json").read_text())["step"] == 40
