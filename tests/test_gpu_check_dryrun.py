"""bench/gpu_check.py — the one prepared GPU script — runs end to end on CPU (its dry run: the Triton interpreter,
tiny sizes), so a lent GPU is never wasted on a script that broke since its last run."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRYRUN="1", OUT=str(tmp_path), PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    # the only entry allowed in errors: Inf-CL skipped (CUDA-only inline PTX; not installed here)
    assert all(e["section"] == "providers infcl" and e["error"].startswith("skipped") for e in res["errors"]), \
        res["errors"]
    # correctness: every case ran; the only entry allowed to miss the flash-attention rule is the second
    # derivative that is zero in exact arithmetic (∂²lse/∂b², "dd3" of an lse case with a bias), judged at the
    # rounding-noise level (bench/RESULTS_GPU.md)
    assert len(res["correctness"]) >= 15
    for c in res["correctness"]:
        bad = [r["name"] for r in c["details"] if not r["ok"]]
        assert bad in ([], ["dd3"]) and (not bad or (c["prim"] == "lse" and c["bias"])), (c["kind"], c["mode"], bad)
    # the tuning swept every stage, the timings have every provider of the targets, the report was written
    assert {s["stage"] for s in res["sweep"]} >= {"fwd", "bwd", "dbl", "fwd_pair", "bwd_pair", "dbl_pair"}
    assert set(res["sweep_best"]) >= {"fwd", "bwd", "dbl", "fwd_pair", "bwd_pair", "dbl_pair"}
    assert {r["provider"] for r in res["timing"]} >= {"triton", "eager", "streaming", "compile", "triton-compiled"}
    assert res["double_backward"], "no double-backward rows"
    assert "## Timings" in (tmp_path / "gpu_results.md").read_text()
