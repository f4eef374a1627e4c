"""pytest-benchmark setup of ``pytest bench --benchmark-only``.

- By default only the quick sizes run (16 cases: loss-cpu at N = 1024, retrieval metrics at Flickr size);
  cases marked ``bench_full`` (the larger sizes, 48 in all) run with ``--bench-full``. Measured on the shared
  2-core development machine under a load average of about 8 (other jobs running):
  ``time python -m pytest bench --benchmark-only -q`` took 118 s wall, 39 s user CPU (the old default, 48
  cases each spawning a process for its memory, took 252 s idle). tests/test_bench_selection.py keeps the
  default selection at 16 cases.
- ``peak_mib``: a fixture measuring the peak resident-memory increase of one call in this process.
- After pytest-benchmark's own table, one table per group (= one problem, its providers side by side): median
  time, ratio to the group's fastest, peak memory and TFLOP/s (when the case records a FLOP model), read from
  ``benchmark.extra_info`` keys ``peak_MiB``, ``flops`` (model FLOPs of one call) and ``ms_median`` (a time
  measured inside the case, e.g. by ``triton.testing.do_bench``, preferred over pytest-benchmark's median).
"""

from __future__ import annotations

import ctypes
import gc

import pytest
from _memory import status_bytes as _status  # bench/ is on sys.path (pytest rootdir)

FULL_MARK = "bench_full"


def pytest_addoption(parser):
    """``--bench-full``: also run the larger sizes."""
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="also run the benchmark cases marked bench_full (larger sizes; several minutes)")


def pytest_configure(config):
    """Register the ``bench_full`` marker."""
    config.addinivalue_line("markers", f"{FULL_MARK}: larger benchmark sizes, run only with --bench-full")


def pytest_collection_modifyitems(config, items):
    """Deselect the ``bench_full`` cases unless ``--bench-full`` is given."""
    if config.getoption("--bench-full"):
        return
    drop = [it for it in items if it.get_closest_marker(FULL_MARK) is not None]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it.get_closest_marker(FULL_MARK) is None]


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the baseline is the live set
    except (OSError, AttributeError):
        pass


def measure_peak_mib(fn) -> float | None:
    """Peak resident-set increase (MiB) of one ``fn()`` call in this process (Linux: VmHWM after resetting it
    through /proc/self/clear_refs), or None where the peak cannot be reset."""
    _trim()
    try:
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    fn()
    return max(0, _status("VmHWM") - base) / 2**20


@pytest.fixture
def peak_mib():
    """``peak_mib(fn)``: the peak resident-memory increase (MiB) of one call of ``fn`` (see measure_peak_mib)."""
    return measure_peak_mib


def _row(b) -> dict:
    info = b.extra_info
    sec = info["ms_median"] / 1e3 if "ms_median" in info else b.stats.median
    flops = info.get("flops")
    return {"name": b.name, "s": sec, "mib": info.get("peak_MiB"),
            "tflops": flops / sec / 1e12 if flops and sec > 0 else None}


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """Per group: every provider's median time, ratio to the fastest, peak memory and TFLOP/s."""
    bs = getattr(config, "_benchmarksession", None)
    benches = [b for b in (bs.benchmarks if bs is not None else []) if b]
    if not benches:
        return
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or "(no group)", []).append(_row(b))
    tr = terminalreporter
    tr.section("time, peak memory and TFLOP/s per problem (providers side by side)", sep="-")
    for group, rows in groups.items():
        best = min(r["s"] for r in rows)
        tr.write_line(f"{group}:")
        width = max(len(r["name"]) for r in rows)
        for r in sorted(rows, key=lambda r: r["s"]):
            mem = f"{r['mib']:9.1f} MiB" if r["mib"] is not None else "        - MiB"
            tfl = f"{r['tflops']:8.3f} TFLOP/s" if r["tflops"] is not None else ""
            tr.write_line(f"  {r['name']:<{width}}  {_fmt_time(r['s']):>11}  x{r['s'] / best:6.2f}  {mem}  {tfl}")
