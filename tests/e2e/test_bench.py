"""Smoke test of ``python -m benchmarks.bench``: a tiny model, one rep; shape of the report only.

No timing is asserted: the numbers depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO

from benchmarks.bench import SIZE_KEYS, parse_size


def test_bench_writes_every_key_as_a_number_for_each_size(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--sizes", "1M", "--reps", "1",
                           "--json", str(out), "--dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    result = report["sizes"]["1M"]
    for key in SIZE_KEYS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        if key != "step_overhead_ratio":  # a difference of two medians: noise can make it negative
            assert value > 0, (key, value)
    assert result["async_snapshot_nbytes"] >= result["params"] * 4 * 3  # params + two AdamW moments
    assert {check["metric"] for check in report["targets"]} >= {"async_block_over_torch_save",
                                                               "step_overhead_ratio"}
    assert "harness checkpoint benchmark" in done.stdout
    assert list(tmp_path.iterdir()) == [out], "the bench left files behind"


def test_sizes_parse_to_close_shapes():
    for text, params in (("1M", 1e6), ("100M", 100e6), ("500M", 500e6)):
        shape = parse_size(text)
        assert abs(shape.params - params) / params < 0.1, (text, shape)
