"""Guard of the benchmark suite's runtime: `pytest bench --benchmark-only` collects only the quick cases by
default (about a minute of CPU on two cores); the larger sizes need --bench-full."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the default selection's benchmark cases: loss-cpu at N=1024 (2 kinds x 2 backends x 3 modes) and the
#: retrieval metrics at Flickr size (ours and the reference pipeline, 2 signals)
DEFAULT_CASES = 12 + 4


def _collect(*extra: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_default_benchmark_selection_is_small():
    ids = _collect()
    cases = [i for i in ids if "test_loss_cpu[" in i or "test_ours[" in i or "test_reference_pipeline[" in i]
    assert len(cases) == DEFAULT_CASES, cases
    assert all("[1024-" in i for i in ids if "test_loss_cpu[" in i)
    assert not any("coco" in i or "gpu" in i for i in cases)
