"""Smoke test of ``python -m benchmarks.bench``: a tiny model, one rep; shape of the report only.

No timing is asserted: the numbers depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.bench import SIZE_KEYS, parse_size


@pytest.mark.slow
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
                                                               "step_overhead_ratio", "relaunch_over_floor"}
    # The relaunch figure (issue 23, item 5): a fresh process that resumed the bench's checkpoint
    # and stepped once, against a bare interpreter's start, rendezvous and all-reduce.
    for key in ("relaunch_floor_s", "relaunch_resume_s", "relaunch_resume_warm_s", "relaunch_over_floor"):
        assert isinstance(result[key], float) and result[key] > 0, (key, result.get(key))
    assert "harness checkpoint benchmark" in done.stdout
    assert list(tmp_path.iterdir()) == [out], "the bench left files behind"


def test_gpu_bench_runs_on_the_cpu_with_its_ablation(tmp_path):
    """``benchmarks.gpu`` runs where no GPU is, so a lent GPU's few minutes are not lost to a bug in
    its CPU-side code: every writer and ablated part reports finite figures and leaves no file."""
    from benchmarks.gpu import ABLATIONS

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--sizes", "smoke",
                           "--reps", "1", "--ablate", "--dir", str(tmp_path), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["sizes"]["smoke"]
    writers = {"harness": result["harness"], "dcp": result["dcp_async_save"], **result["ablation"]}
    assert set(result["ablation"]) == set(ABLATIONS)
    for name, figures in writers.items():
        for key in ("blocked_s", "durable_s", "effective_stall_s", "step_s", "step_slowdown"):
            assert isinstance(figures[key], float) and math.isfinite(figures[key]), (name, key, figures)
        assert figures["durable_s"] >= figures["blocked_s"] > 0, (name, figures)
    assert list(tmp_path.iterdir()) == [out], "the bench left files behind"


def test_sizes_parse_to_close_shapes():
    for text, params in (("1M", 1e6), ("100M", 100e6), ("500M", 500e6)):
        shape = parse_size(text)
        assert abs(shape.params - params) / params < 0.1, (text, shape)


def test_data_bench_reports_every_figure_as_a_number_and_compares_with_the_baseline(tmp_path):
    """Smoke test of ``python -m benchmarks.data_bench``: shape of the report only, no timing."""
    out = tmp_path / "data.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.data_bench", "--reps", "1", "--position", "20000",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    from benchmarks.data_bench import DEFAULT_BASELINE, rows

    figures = dict(rows(report))
    names = ["user_sampler.sampler.skip_s", "user_sampler.batch_sampler.skip_s", "collate_direct.main_cost_us",
             "collate_direct.worker_cost_us", "collate_loader_0_workers.cost_us", "collate_loader_2_workers.cost_us",
             "keyed_now.key_ns"]
    # The baseline is read from git history, which a shallow clone lacks: compared only where it exists.
    if subprocess.run(["git", "cat-file", "-e", f"{DEFAULT_BASELINE}^{{commit}}"], cwd=REPO).returncode == 0:
        names.append(f"keyed_{DEFAULT_BASELINE}.key_ns")
    for name in names:
        assert math.isfinite(figures[name]["median"]), name
    assert "harness data benchmark" in done.stdout
    assert list(tmp_path.iterdir()) == [out]
