"""pytest-benchmark timings of lors_fast.contrastive_loss on a CUDA device (skipped without one).

    pytest bench/test_bench_triton.py --benchmark-only -m "gpu or not gpu" [-k "32768"]

Each case times forward+backward (``torch.autograd.grad`` w.r.t. every input) with ``triton.testing.do_bench``
inside ``benchmark.pedantic`` (one round = one do_bench median), and records median/p20/p80 ms, TFLOP/s by
the FLOP model 8·N²·(d+r) (docs/KERNELS_MATHS.md) and peak memory in ``benchmark.extra_info``. Providers: triton,
streaming (our chunked torch path), reference (eager, materialised), compile (torch.compile of the
reference), and, for the symmetric hard-label
CLIP loss only (kind infonce, identity target), infcl (Inf-CL, ``inf_cl.cal_flash_loss`` both ways, averaged)
and openclip (``open_clip.loss.ClipLoss``, materialised), each skipped when not importable. The one-shot
script with the correctness sweep is bench/gpu_check.py (its docstring: offline install of the two packages).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [4096, 16384, 32768, 65536]
DIMS = [512, 768]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KINDS = [("infonce", False), ("infonce", True), ("wbce", True), ("siglip", False)]
PROVIDERS = ["triton", "streaming", "reference", "compile", "infcl", "openclip"]
OTHERS = ("infcl", "openclip")  # outside implementations of the hard-label CLIP loss (infonce, identity) only
_COMPILED = {}


def _inputs(N, d, dtype, kind, lowrank, r=10):
    from lors_fast.ops.triton_tuning import problem  # the inputs `lors-fast tune-kernels` and gpu_check time

    return problem(N, d, dtype, kind, lowrank, "cuda", r=r)


def _clip_loss_cls():
    """open_clip's ClipLoss (bench/_providers.py: loss.py loaded alone when `import open_clip` fails)."""
    from _providers import load_clip_loss  # bench/ is on sys.path (pytest's rootdir-relative import)

    return load_clip_loss()[0]


def _other_loss_fn(provider):
    """Same quantity as ours with kind="infonce" and the identity target: ½[mean row CE + mean column CE] of
    Z = s·U·Vᵀ. open_clip's ClipLoss computes exactly that (two N×N logit matrices). Inf-CL's single-GPU entry
    ``inf_cl.cal_flash_loss(q, k, scale=s, head_dim=h)`` gives one direction's unreduced per-row loss
    (LSE_j(s·q_i·k_j) − s·q_i·k_i; q, k cast to fp32 inside, TF32 dots), so it is called both ways and the means
    averaged. (cal_inf_loss wraps the scale in a GradientGather whose backward needs torch.distributed.)"""
    if provider == "openclip":
        try:
            crit = _clip_loss_cls()()
        except Exception as e:
            pytest.skip(f"open_clip not importable: {type(e).__name__}: {e}")
        return lambda U, V, s, t, kind, logit_bias: crit(U, V, s)
    inf_cl = pytest.importorskip("inf_cl")

    def f(U, V, s, t, kind, logit_bias):
        hd = next(h for h in (256, 128, 64, 32, 16) if U.shape[1] % h == 0)
        return 0.5 * (inf_cl.cal_flash_loss(U, V, scale=s, head_dim=hd).mean()
                      + inf_cl.cal_flash_loss(V, U, scale=s, head_dim=hd).mean())
    return f


def _loss_fn(provider, kind, lowrank):
    import lors_fast
    from lors_fast.core.reference import reference_loss

    if provider in OTHERS:
        return _other_loss_fn(provider)
    if provider == "triton":
        return lambda *a, **k: lors_fast.contrastive_loss(*a, **k, backend="triton")
    if provider in ("reference", "streaming"):
        return lambda *a, **k: lors_fast.contrastive_loss(*a, **k, backend=provider)
    key = (kind, lowrank)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(
            lambda U, V, s, t, kind, logit_bias: reference_loss(U, V, s, t, kind=kind, logit_bias=logit_bias),
            dynamic=False)
    return _COMPILED[key]


def _fits(provider, N, dtype):
    """Materialised providers keep several N×N matrices: skip what would not fit in ~100 GiB."""
    if provider in ("triton", "infcl", "streaming"):
        return True
    return 8 * N * N * (2 if dtype == torch.bfloat16 else 4) < 100 * 2**30


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind,lowrank", KINDS, ids=[f"{k}-{'lowrank' if lr else 'identity'}" for k, lr in KINDS])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("N", SIZES, ids=lambda n: f"N{n}")
def test_fwd_bwd(benchmark, N, d, dtype, kind, lowrank, provider):
    import triton.testing as tt

    dt = DTYPES[dtype]
    if provider in OTHERS and (kind, lowrank) != ("infonce", False):
        pytest.skip(f"{provider}: hard-label CLIP loss only (infonce, identity target)")
    if not _fits(provider, N, dt):
        pytest.skip("materialised N×N would not fit")
    torch.backends.cuda.matmul.allow_tf32 = dt == torch.float32
    img, txt, scale, tgt, bias, leaves = _inputs(N, d, dt, kind, lowrank)
    loss_fn = _loss_fn(provider, kind, lowrank)

    def step():
        loss = loss_fn(img, txt, scale, tgt, kind=kind, logit_bias=bias)
        return torch.autograd.grad(loss, leaves)

    step()
    torch.cuda.synchronize()
    q = {}

    def run():
        q["ms"] = tt.do_bench(step, warmup=5, rep=50, quantiles=[0.5, 0.2, 0.8])

    benchmark.pedantic(run, rounds=1, iterations=1)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    r = 10 if lowrank else 0
    ms = q["ms"]
    benchmark.group = f"fwd+bwd N={N} d={d} {dtype} {kind}-{'lowrank' if lowrank else 'identity'}"  # providers side by side
    benchmark.extra_info.update(
        gpu=torch.cuda.get_device_name(), provider=provider, N=N, d=d, r=r, dtype=dtype, ms_median=ms[0],
        ms_p20=ms[1], ms_p80=ms[2], tflops_model=8.0 * N * N * (d + r) / ms[0] / 1e9, flops=8.0 * N * N * (d + r),
        peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
        peak_MiB=(torch.cuda.max_memory_allocated() - base) / 2**20)


@pytest.mark.parametrize("kind,lowrank", [("infonce", False), ("wbce", True)], ids=["infonce", "wbce-lowrank"])
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_double_backward_8192(benchmark, kind, lowrank, provider):
    import triton.testing as tt

    img, txt, scale, tgt, bias, leaves = _inputs(8192, 512, torch.bfloat16, kind, lowrank)
    loss_fn = _loss_fn(provider, kind, lowrank)
    g = torch.Generator(device="cuda").manual_seed(1)
    cots = [torch.randn(x.shape, generator=g, device="cuda").to(x.dtype) for x in leaves]

    def step():
        loss = loss_fn(img, txt, scale, tgt, kind=kind, logit_bias=bias)
        gs = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(sum((c * x).sum() for c, x in zip(cots, gs)), leaves, allow_unused=True)

    step()
    q = {}
    benchmark.group = f"double backward N=8192 d=512 bf16 {kind}{'-lowrank' if lowrank else ''}"
    benchmark.pedantic(lambda: q.update(ms=tt.do_bench(step, warmup=5, rep=50, quantiles=[0.5, 0.2, 0.8])),
                       rounds=1, iterations=1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), provider=provider, ms_median=q["ms"][0],
                                ms_p20=q["ms"][1], ms_p80=q["ms"][2], mode="fwd+bwd+double-bwd", N=8192, d=512)


def test_matmul_ceiling(benchmark):
    import triton.testing as tt

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    q = {}
    benchmark.group = "bf16 matmul 8192^3 (ceiling)"
    benchmark.pedantic(lambda: q.update(ms=tt.do_bench(lambda: a @ b, warmup=10, rep=100)), rounds=1, iterations=1)
    benchmark.extra_info.update(ms_median=q["ms"], flops=2 * 8192**3)
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), bf16_tflops=2 * 8192**3 / q["ms"] / 1e9,
                                note=f"{math.nan if q['ms'] is None else q['ms']:.3f} ms per 8192³ bf16 matmul")
