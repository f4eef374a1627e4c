"""The GPU build of the fused kernels, checked on a machine without a GPU (H100/H200 and A100 targets).

bench/aot_check.py compiles each kernel specialisation for sm_90a (H100/H200) with Triton's compiler and the
ptxas it ships, exactly as the backend would launch it on CUDA. CI has no GPU, so this is the test that the
launch defaults still compile for the target card, fit its 227 KiB of shared memory, keep their tile loads
software-pipelined and do not spill much (bench/RESULTS_AOT.md has the full table). It runs in a subprocess:
the test session binds the kernels in interpreter mode (TRITON_INTERPRET=1), the build needs compiled mode.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton has no bundled ptxas")

SNIPPET = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import aot_check as A
rows = []
for dt in ("bfloat16", "float32"):
    for stage, kind, tgt in A.CASES:
        rows.append(A.compile_one(stage, kind, tgt, getattr(torch, dt), 512))
# the resident-row-block layout, as the GPU sweep tries it
rows.append(A.compile_one("bwd", "lse", 0, torch.bfloat16, 512,
                          dict(BM=64, BN=32, num_warps=8, num_stages=3, WD=True)))
rows.append(A.compile_one("fwd", "wbce", 1, torch.bfloat16, 512,
                          dict(BM=128, BN=32, num_warps=8, num_stages=2, WD=True)))
# an A100 (sm_80: no wgmma), 16-bit
for stage, kind, tgt in A.CASES:
    rows.append(A.compile_one(stage, kind, tgt, torch.bfloat16, 512, cc=80))
json.dump(rows, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def sm90_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, "-c", SNIPPET, str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, f"aot build failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return json.loads(out.read_text())


def _tag(r):
    return (f"{r['arch']} {r['stage']} {r['kind']}/{r['target']} {r['dtype']} BM{r['BM']} BN{r['BN']} "
            f"{'WD' if r['WD'] else 'BK' + str(r['BK'])} w{r['num_warps']} s{r['num_stages']}")


def test_every_default_compiles_for_sm90_and_fits_shared_memory(sm90_rows):
    assert len(sm90_rows) == 23
    for r in sm90_rows:
        assert r["ok"], f"{_tag(r)}: {r.get('error')}"
        assert r["fits"], f"{_tag(r)}: {r['shared']} B of shared memory > the {r['arch']} limit"
        if r["arch"] == "sm_90a":
            assert r["wgmma"] >= 1, f"{_tag(r)}: no Hopper tensor-core (wgmma) dot"
        assert r["async_copies"] >= 1, f"{_tag(r)}: no software-pipelined (cp.async) tile load"


def test_defaults_spill_little(sm90_rows):
    # forward and backward run at every training step: (almost) no spills; the double backward's tiles hold
    # two GEMM results and the cotangent tiles, a few hundred bytes are the best config found (RESULTS_AOT.md)
    for r in sm90_rows:
        limit = 1024 if r["stage"] == "dbl" else 160
        assert r["spill"] <= limit, f"{_tag(r)}: {r['spill']} B of register spills per thread > {limit}"


def test_whole_d_falls_back_beyond_512():
    from lors_fast.ops import triton_backend as tb
    from lors_fast.ops.options import override

    cuda = torch.device("cuda")  # a device object only: no GPU needed to pick a config
    with override(configs={"bwd": dict(WD=True, BN=32)}, replace_configs=True):
        at512 = tb._config("bwd", 512, torch.bfloat16, cuda)
        at768 = tb._config("bwd", 768, torch.bfloat16, cuda)
    assert at512.WD and at512.BDO == 512 and at512.DP == 512
    assert not at768.WD and at768.BDO == 512 and at768.BN == 32  # K-loop layout, d in two 512-chunks
    with pytest.raises(ValueError, match="unknown kernel stage"):
        tb._config("nope", 512, torch.bfloat16, cuda)
