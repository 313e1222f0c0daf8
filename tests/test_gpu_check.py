"""benchmarks/gpu_check.py, the prepared GPU run, kept from rotting: its --cpu-smoke mode runs the same code
path (build, stage-1 and stage-2 steps, a test batch, the loader, compiled and not, in bf16) on the tiny demo
model, and without CUDA it refuses in one line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    res = _run(CUDA_VISIBLE_DEVICES="")  # no GPU visible, wherever the test runs
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0], res.stderr


@pytest.mark.integration  # ~20 s of imports and compile tracing: CI's second step
def test_cpu_smoke_prints_one_table_of_finite_figures(demo_root):
    res = _run("--cpu-smoke", "--precisions", "bf16", "--demo-root", str(demo_root), CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("precision"))
    rows = [[c.strip() for c in line.split("|")] for line in lines[head + 2:head + 4]]
    assert [r[:2] for r in rows] == [["bf16", "off"], ["bf16", "on"]], res.stdout
    for r in rows:
        steady = [float(c.split()[0]) for c in r[2:5]]  # stage-1, stage-2, test: "median (first)"
        rates = [float(r[5]), float(r[6])]  # model and loader images/s
        assert all(math.isfinite(v) and v > 0 for v in steady + rates), r
        assert r[7] == "n/a"  # no GPU memory on the CPU
