"""benchmarks/end_to_end.py on the tiny model: both sides load the one random model it writes and, both in fp32,
make the same image (so the timings compare the same weights); the table and the JSON hold every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_end_to_end_benchmark_runs_both_sides_on_the_same_weights(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/end_to_end.py"), "--config", "tiny", "--size", "64",
                           "--steps", "2", "--device", "cpu", "--workdir", str(tmp_path), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "max pixel difference of the two images (same weights, fp32): 0/255" in done.stdout
    for side in ("xldm", "diffusers"):
        row = result[side]
        assert row["dtype"] == "fp32" and row["peak_rss_gib"] > 0
        assert row["extrapolated_s"] == pytest.approx(row["total_s"] + 28 * row["per_step_s"])
        assert row["first_s"] + row["decode_s"] <= row["total_s"] + 1e-9
    assert result["ratio"] == pytest.approx(result["xldm"]["extrapolated_s"] / result["diffusers"]["extrapolated_s"])
    assert any(line.startswith("| ratio xldm/diffusers |") for line in lines)
