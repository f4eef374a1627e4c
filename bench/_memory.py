"""Process memory readings for the benchmarks (Linux ``/proc``): shared by the pytest-benchmark hooks
(bench/conftest.py) and the per-case worker processes of bench/test_bench_loss_cpu.py."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field given in kB (VmRSS, VmHWM, ...), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")
