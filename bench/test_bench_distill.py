"""Smoke test of bench/bench_distill.py (run explicitly: pytest bench/test_bench_distill.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import bench_distill  # noqa: E402


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_worker_runs(impl):
    row = bench_distill.worker(impl, 2, 1, "cpu")
    assert row["impl"] == impl and row["K"] == 2
    assert row["s_per_it"] > 0 and row["peak_mb"] >= 0


def test_render_table():
    rows = [{"impl": "ours", "K": 10, "s_per_it": 1.0, "peak_mb": 100.0},
            {"impl": "reference", "K": 10, "s_per_it": 2.0, "peak_mb": 300.0},
            {"impl": "ours", "K": 80, "s_per_it": 8.0, "peak_mb": 105.0}]
    md = bench_distill.render(rows, SimpleNamespace(iters=1, steps=[10, 80], threads=1, device="cpu"))
    assert "| 10 | ours | 1.000 | 100.0 | 2.00× | 0.33 |" in md, md
    assert "+5.0 %" in md


def test_interleaved_timing():
    t = bench_distill.timing(2, 1, ["ours", "ours+chunk", "reference"], "cpu")
    assert set(t) == {"ours", "ours+chunk", "reference"} and all(v["min"] > 0 for v in t.values())
