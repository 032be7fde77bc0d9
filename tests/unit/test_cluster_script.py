"""slurm/local-cluster.sh, checked without starting the cluster: the pieces that are pure shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local-cluster.sh"


def _run_function(name: str, env: dict[str, str]) -> str:
    """Define one function of the script (sed cuts it out, from `name() {` to the first `}` line)
    and call it, without running the script's main part (which needs root and apt)."""
    snippet = f'eval "$(sed -n \'/^{name}() {{/,/^}}/p\' "$1")"; {name}'
    done = subprocess.run(["bash", "-c", snippet, "bash", str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell the counts apart")
def test_the_node_offers_every_cpu_even_with_omp_num_threads_1_exported():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_THREAD_LIMIT="1")
    # The trap it avoids: GNU nproc honours OMP_NUM_THREADS.
    assert subprocess.run(["nproc"], env=env, capture_output=True, text=True).stdout.strip() == "1"
    assert int(_run_function("cpu_count", env)) == len(os.sched_getaffinity(0))
    assert "cpus=$(cpu_count)" in SCRIPT.read_text(), "write_config must size the node with cpu_count"
