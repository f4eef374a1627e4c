"""Smoke test of the buffer benchmark at a tiny size (slow: spawns a Python process)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_buffer_runs(tmp_path):
    script = Path(__file__).with_name("bench_buffer.py")
    out = tmp_path / "r.md"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            "--n-images",
            "16",
            "--jpeg-size",
            "40x30",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--results",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    text = out.read_text()
    assert "memmap cache (img/s)" in text and "expert epoch" in text
