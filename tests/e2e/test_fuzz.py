"""The crash-consistency fuzzer (tests/fuzz/fuzz.py) in CI: a few random trials, each a real fault
(SIGKILL at a save phase or a random instant, EIO/ENOSPC/EAGAIN from the storage, a full tmpfs),
then the folder's invariants and a bit-exact clean relaunch. Long runs: see the script's --help."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_random_faults_never_lose_a_committed_checkpoint_and_relaunches_end_bit_identical(tmp_path, capsys):
    seed = int(os.environ.get("HARNESS_FUZZ_SEED", "2026"))
    trials = int(os.environ.get("HARNESS_FUZZ_TRIALS", "8"))
    required = ["--require-s3"] if os.environ.get("HARNESS_REQUIRE_ALL") == "1" else []
    code = fuzz.main(["--trials", str(trials), "--seed", str(seed), "--workdir", str(tmp_path),
                      "--report", str(tmp_path / "report.jsonl"), *required])
    out = capsys.readouterr().out
    assert code == 0, f"seed {seed}:\n{out}"
    assert out.count(": ok") == trials, out


def test_the_fuzzers_checks_see_a_lost_checkpoint_and_a_changed_state(tmp_path):
    """Negative control: the invariants the fuzzer checks do fail on a folder that lost a committed
    checkpoint and on a state that differs by one value."""
    import torch
    from harness.checkpoint.format import encode

    target = fuzz.Target(str(tmp_path))
    target.store().commit(8, encode({"w": torch.zeros(2)}).write_to, {})
    trial = fuzz.Trial(index=0, kind="control", asynchronous=False)
    assert fuzz.check_folder(target, floor=12, trial=trial) == 8
    assert trial.violations == ["newest valid step 8 < 12, committed before the fault"]
    assert fuzz.differences({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1e-30])}) == ["/w"]
