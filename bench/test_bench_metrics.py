"""pytest-benchmark cases for the retrieval metrics (``pytest bench/test_bench_metrics.py --benchmark-only``).

Cases: Flickr test size (1000 × 5000) and COCO test size (5000 × 25010, ten images with 6 captions), random
(signal 0) and "trained-like" (signal 0.2: R@10 around 50–80%) L2-normalised 256-d embeddings; ours vs the
reference's pipeline (full matrix, top-128 fill, per-row argsort) at Flickr size only (the COCO one takes
~20 s per call; ``python bench/bench_metrics.py`` runs it side by side once and writes RESULTS_CPU_metrics.md).
The COCO cases run only with ``--bench-full``. Every case also asserts that both give identical numbers and
records the peak memory of one call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench_metrics import make_inputs, reference_pipeline  # noqa: E402

from lors_fast.engine.metrics import retrieval_metrics  # noqa: E402

SIZES = {"flickr": (1000, 5000), "coco": (5000, 25010)}


@pytest.fixture(scope="module", params=[pytest.param((s, sig), marks=[pytest.mark.bench_full] if s == "coco" else [])
                                        for s in SIZES for sig in (0.0, 0.2)],
                ids=lambda p: f"{p[0]}-signal{p[1]}")
def case(request):
    size, signal = request.param
    return size, signal, make_inputs(*SIZES[size], 256, signal=signal)


def test_ours(benchmark, peak_mib, case):
    size, signal, (img, txt, t2i, i2t) = case
    benchmark.group = f"retrieval metrics {size} signal {signal}"
    out = benchmark.pedantic(retrieval_metrics, args=(img, txt, t2i, i2t), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(size=size, signal=signal, peak_MiB=peak_mib(lambda: retrieval_metrics(img, txt, t2i, i2t)))
    if size == "flickr":
        assert out == reference_pipeline(img, txt, t2i, i2t, kind="quicksort")


def test_reference_pipeline(benchmark, peak_mib, case):
    size, signal, (img, txt, t2i, i2t) = case
    if size != "flickr":
        pytest.skip("the reference pipeline at COCO size runs once in bench_metrics.py")
    benchmark.group = f"retrieval metrics {size} signal {signal}"
    out = {}
    benchmark.extra_info.update(size=size, signal=signal, peak_MiB=peak_mib(
        lambda: out.update(r=reference_pipeline(img, txt, t2i, i2t, kind="quicksort"))))
    benchmark.pedantic(lambda: out.update(r=reference_pipeline(img, txt, t2i, i2t, kind="quicksort")),
                       rounds=1, warmup_rounds=0)
    out = out["r"]
    assert out == retrieval_metrics(img, txt, t2i, i2t)
