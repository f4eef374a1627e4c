"""TritonPrimitives (fused kernels) against a materialised float64 oracle written here from DESIGN.md.

On CPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` is set at import of this module,
before the kernel module (imported lazily by lors_fast.ops.triton_backend at the first call) is decorated.
Sizes stay tiny (one or two 64-row programs). GPU checks are marked ``gpu`` and skipped without CUDA.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from lors_fast.core.kinds import PAIR_PHIS, TRITON_KINDS, interpreting  # noqa: E402
from lors_fast.core.reference import reference_lse, reference_pairsum  # noqa: E402
from lors_fast.ops import TritonPrimitives  # noqa: E402
from lors_fast.ops.options import override  # noqa: E402

INTERP = interpreting()
if not INTERP and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEV = "cpu" if INTERP else "cuda"
F64 = torch.float64
# numpy overflow / invalid-value warnings from the interpreter mean a kernel computed with garbage (once: an
# out-of-bounds read of a 2-element dummy, unmasked in masked-off lanes): an error here
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


# ------------------------------------------------------------------------------------------- oracle
# the one oracle of the primitives (lors_fast.core.reference; φ from lors_fast.core.kinds)
oracle_lse = reference_lse
oracle_pairsum = reference_pairsum


def oracle_S(n, tgt, like):
    if tgt is None:
        return torch.eye(n, dtype=like.dtype, device=like.device)
    return torch.diag(tgt[1]) + tgt[2] @ tgt[3].T


# ------------------------------------------------------------------------------------------ helpers
def assert_close(actual, expected, rtol, atol, tag):
    assert actual is not None and expected is not None, f"{tag}: one side is None"
    actual = actual.detach().to(F64).cpu()
    expected = expected.detach().to(F64).cpu()
    assert actual.shape == expected.shape, f"{tag}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{tag}: non-finite values in the kernel's result"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs().max()
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= tol, (f"{tag}: max abs err {worst:.3e} > tol {float(tol):.3e} "
                          f"(max |expected| {float(expected.abs().max()):.3e}, mean err {float(err.mean()):.3e})")


def make_inputs(M, N, d, r, dtype, seed=0, bias=True, scale=3.0, lowrank=True):
    g = torch.Generator().manual_seed(seed)
    U = (torch.randn(M, d, generator=g, dtype=F64) / d ** 0.5).to(dtype)
    V = (torch.randn(N, d, generator=g, dtype=F64) / d ** 0.5).to(dtype)
    s = torch.tensor(scale, dtype=F64)
    b = torch.tensor(-0.7, dtype=F64) if bias else None
    tgt = None
    if lowrank:
        a = torch.rand(N, generator=g, dtype=F64)
        L = torch.randn(N, r, generator=g, dtype=F64) * 0.4
        R = torch.randn(N, r, generator=g, dtype=F64) * 0.4
        tgt = ("lowrank", a, L, R)
    return U, V, s, b, tgt


def _leaves(U, V, s, b, tgt, dtype, device):
    """Kernel-side leaves (dtype, device) and oracle-side float64 leaves holding the same values."""
    def pair(x, dt):
        k = x.detach().to(device=device, dtype=dt).requires_grad_(True)
        o = x.detach().to(F64).requires_grad_(True)
        return k, o

    (Uk, Uo), (Vk, Vo) = pair(U, dtype), pair(V, dtype)
    sdt = F64 if dtype == F64 else torch.float32
    (sk, so) = pair(s, sdt)
    bk = bo = None
    if b is not None:
        bk, bo = pair(b, sdt)
    tk = to = None
    if tgt is not None:
        (ak, ao), (Lk, Lo), (Rk, Ro) = (pair(t, sdt) for t in tgt[1:])
        tk, to = ("lowrank", ak, Lk, Rk), ("lowrank", ao, Lo, Ro)
    return (Uk, Vk, sk, bk, tk), (Uo, Vo, so, bo, to)


def _inputs_of(U, V, s, b, tgt):
    xs = [U, V, s] + ([b] if b is not None else []) + (list(tgt[1:]) if tgt is not None else [])
    return xs


def _first_second(out_fn, xs, seed=5):
    """Value, first grads and second grads (grad of a random linear function of the first grads)."""
    out = out_fn()
    g = torch.Generator().manual_seed(seed)
    if isinstance(out, tuple):
        w = [torch.randn(o.shape, generator=g, dtype=F64).to(o) for o in out]
        loss = sum((wi * o).sum() for wi, o in zip(w, out))
    else:
        loss = out
    g1 = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    f2 = sum((torch.randn(gi.shape, generator=g, dtype=F64).to(gi) * gi).sum() for gi in g1 if gi is not None)
    g2 = torch.autograd.grad(f2, xs, allow_unused=True)
    return out, g1, g2


def compare(kern_fn, orac_fn, kin, oin, rtol, atol, tag, second=True):
    xk, xo = _inputs_of(*kin), _inputs_of(*oin)
    ok, g1k, g2k = _first_second(kern_fn, xk)
    oo, g1o, g2o = _first_second(orac_fn, xo)
    if isinstance(ok, tuple):
        for i, (a, e) in enumerate(zip(ok, oo)):
            assert_close(a, e, rtol, atol, f"{tag} value[{i}]")
    else:
        assert_close(ok, oo, rtol, atol, f"{tag} value")
    names = ["U", "V", "scale"] + (["bias"] if kin[3] is not None else []) + (["a", "Lc", "R"] if kin[4] else [])
    for n, a, e in zip(names, g1k, g1o):
        if e is None:
            assert a is None or float(a.abs().max()) == 0.0, f"{tag} d{n}: expected no gradient"
            continue
        assert_close(a, e, rtol, atol, f"{tag} d{n}")
    if second:
        # normwise: a second derivative that is exactly zero (lse w.r.t. the bias) comes out of fp32 sums as
        # cancellation noise, so its tolerance scales with the largest second derivative of the call
        big = max(float(e.detach().abs().max()) for e in g2o if e is not None and e.numel())
        for n, a, e in zip(names, g2k, g2o):
            if e is None:
                continue
            assert_close(a, e, rtol, atol * 10 + rtol * big * 0.1, f"{tag} d2{n}")


P_EXACT = TritonPrimitives(fp32_precision="ieee")
TOL = {F64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}

# ------------------------------------------------------------------------------------------------ LSE
LSE_CASES = [  # (M, N, d, bias)
    (37, 37, 40, True),
    (1, 1, 3, False),
    (2, 2, 17, True),
    (17, 5, 33, False),  # M != N, d not a multiple of 16 nor of the d-chunk
    (65, 63, 24, True),  # block + 1 rows, block − 1 columns
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-d{c[2]}-{'b' if c[3] else 'nob'}")
def test_lse(case, dtype):
    M, N, d, bias = case
    U, V, s, b, _ = make_inputs(M, N, d, 1, F64, bias=bias, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, dtype, DEV)
    rtol, atol = TOL[dtype]
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin, rtol, atol,
            f"lse {case} {dtype}")


# ------------------------------------------------------------------------------------------- pairsum
PAIR_CASES = [(kind, tg) for kind in PAIR_PHIS[:3] for tg in ("identity", "lowrank")] + \
    [("softplus", "identity")]


def _counts(P, tgt, n):
    npos = P.count_pos(tgt, n)
    return npos, n * n - npos


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_pairsum_f64(case):
    kind, tg = case
    U, V, s, b, tgt = make_inputs(37, 37, 40, 3, F64, seed=1, lowrank=tg == "lowrank")
    kin, oin = _leaves(U, V, s, b, tgt, F64, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], 37) if kind == "wbce" else (None, None)
    rtol, atol = TOL[F64]
    compare(lambda: P_EXACT.pairsum(kind, *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum(kind, *oin, npos=npos, nneg=nneg), kin, oin, rtol, atol, f"{kind}/{tg} f64")


@pytest.mark.parametrize("case", [("wbce", "lowrank"), ("mse", "lowrank"), ("bce", "identity"),
                                  ("softplus", "identity")], ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("shape", [(1, 3), (2, 17), (65, 20)], ids=lambda s: f"N{s[0]}-d{s[1]}")
def test_pairsum_f32_awkward(case, shape):
    kind, tg = case
    N, d = shape
    U, V, s, b, tgt = make_inputs(N, N, d, 2, F64, seed=2, bias=N != 2, lowrank=tg == "lowrank")
    kin, oin = _leaves(U, V, s, b, tgt, torch.float32, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], N) if kind == "wbce" else (None, None)
    rtol, atol = TOL[torch.float32]
    compare(lambda: P_EXACT.pairsum(kind, *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum(kind, *oin, npos=npos, nneg=nneg), kin, oin, rtol, atol,
            f"{kind}/{tg} N={N} d={d}")


def test_softplus_rectangular():
    U, V, s, b, _ = make_inputs(19, 70, 21, 1, F64, seed=3, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, torch.float32, DEV)
    rtol, atol = TOL[torch.float32]
    compare(lambda: P_EXACT.pairsum("softplus", *kin), lambda: oracle_pairsum("softplus", *oin), kin, oin,
            rtol, atol, "softplus 19x70")


def test_bf16_inputs_match_oracle_on_rounded_values():
    # The kernels upcast bf16 loads; compared with the oracle on the same bf16-rounded values the only error
    # left is fp32 accumulation and the bf16 rounding of the returned gradients.
    U, V, s, b, tgt = make_inputs(33, 33, 24, 2, F64, seed=4)
    kin, oin = _leaves(U.bfloat16().double(), V.bfloat16().double(), s, b, tgt, torch.bfloat16, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], 33)
    compare(lambda: P_EXACT.pairsum("wbce", *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum("wbce", *oin, npos=npos, nneg=nneg), kin, oin, 1e-2, 1e-4, "wbce bf16")
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin[:4] + (None,), oin[:4] + (None,),
            1e-2, 1e-4, "lse bf16")


_ALL_STAGES = ("fwd", "bwd", "pre", "dbl", "fwd_pair", "bwd_pair", "dbl_pair")


@pytest.mark.parametrize("lowrank_16bit,wd", [(False, False), (True, False), (False, True)],
                         ids=["rank-r-fp32", "rank-r-16bit", "whole-d"])
def test_fp16_native_operands_gpu_code_path(lowrank_16bit, wd):
    # The GPU path keeps 16-bit GEMM operands (G·V, and with experimental_lowrank_16bit the rank-r tiles and the
    # hi/lo split of S; with WD the resident row block and the column tiles) instead of upcasting. The
    # interpreter handles fp16 (not bf16) natively, so this runs that code path on CPU.
    with override(interpret_native_16bit=INTERP, experimental_lowrank_16bit=lowrank_16bit,
                  configs={st: {"WD": True} for st in _ALL_STAGES} if wd else {}):
        _fp16_native_cases()


def _fp16_native_cases():
    U, V, s, b, tgt = make_inputs(33, 33, 40, 2, F64, seed=12)
    kin, oin = _leaves(U.half().double(), V.half().double(), s, b, tgt, torch.float16, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], 33)
    for kind in ("wbce", "mse"):
        compare(lambda k=kind: P_EXACT.pairsum(k, *kin, npos=npos, nneg=nneg),
                lambda k=kind: oracle_pairsum(k, *oin, npos=npos, nneg=nneg), kin, oin, 1e-2, 1e-4, f"{kind} fp16")
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin[:4] + (None,), oin[:4] + (None,),
            1e-2, 1e-4, "lse fp16")


def test_lse_unfused_column_pass():
    U, V, s, b, _ = make_inputs(30, 70, 24, 1, F64, seed=13, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, torch.float32, DEV)
    with override(fwd_fused_columns=False):
        compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin, *TOL[torch.float32],
                "lse unfused", second=False)


@pytest.fixture
def whole_d():
    """Every stage in the WD layout (resident row block, one load of each column tile for both GEMMs)."""
    import lors_fast.ops.triton_backend as tb

    with override(configs={st: {"WD": True} for st in _ALL_STAGES}):
        assert tb._config("bwd", 40, torch.float32, torch.device(DEV)).WD
        assert tb._config("dbl_pair", 40, torch.float32, torch.device(DEV)).BDO == 64  # d = 40 padded to DP = 64
        yield tb


@pytest.mark.parametrize("case", [(17, 5, 33, False), (65, 63, 24, True), (1, 1, 3, True)],
                         ids=lambda c: f"M{c[0]}-N{c[1]}-d{c[2]}")
def test_whole_d_layout_lse(whole_d, case):
    M, N, d, bias = case
    U, V, s, b, _ = make_inputs(M, N, d, 1, F64, seed=21, bias=bias, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, F64, DEV)
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin, *TOL[F64], f"WD lse {case}")


@pytest.mark.parametrize("case", [("wbce", "lowrank"), ("mse", "lowrank"), ("bce", "identity")],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_whole_d_layout_pairsum(whole_d, case):
    kind, tg = case
    U, V, s, b, tgt = make_inputs(65, 65, 20, 3, F64, seed=22, lowrank=tg == "lowrank")
    kin, oin = _leaves(U, V, s, b, tgt, F64, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], 65) if kind == "wbce" else (None, None)
    compare(lambda: P_EXACT.pairsum(kind, *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum(kind, *oin, npos=npos, nneg=nneg), kin, oin, *TOL[F64], f"WD {kind}/{tg}")


@pytest.mark.parametrize("case", [(17, 5, 33, False, torch.float64), (65, 63, 24, True, torch.float64),
                                  (1, 1, 3, True, torch.float64), (70, 40, 24, True, torch.float32)],
                         ids=lambda c: f"M{c[0]}-N{c[1]}-d{c[2]}-{str(c[4])[6:]}")
def test_lse_backward_by_strips(request, case):
    """STRIP: the backward as G tiles written per strip of rows (of U, then of V) and library matmuls; strips
    of 32 rows (two or three per side here, the last one short), values and first and second derivatives."""
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(override(configs={"bwd": dict(STRIP=32, BM=16, BN=16, BK=16)}))
    M, N, d, bias, dt = case
    U, V, s, b, _ = make_inputs(M, N, d, 1, F64, seed=23, bias=bias, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, dt, DEV)
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin, *TOL[dt], f"strips lse {case}")


@pytest.mark.parametrize("case", [("wbce", "lowrank", 70, torch.float64), ("mse", "lowrank", 33, torch.float64),
                                  ("bce", "identity", 40, torch.float64), ("wbce", "lowrank", 50, torch.float32)],
                         ids=lambda c: f"{c[0]}-{c[1]}-N{c[2]}-{str(c[3])[6:]}")
def test_pair_backward_by_strips(request, case):
    """STRIP for the pair kinds: s·G tiles per strip + library matmuls, H·Lb from per-tile partials summed
    over column tiles, diag(H) from the one tile holding each row's diagonal."""
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(override(configs={"bwd_pair": dict(STRIP=32, BM=16, BN=16, BK=16)}))
    kind, tg, n, dt = case
    U, V, s, b, tgt = make_inputs(n, n, 20, 3, F64, seed=24, lowrank=tg == "lowrank")
    kin, oin = _leaves(U, V, s, b, tgt, dt, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], n) if kind == "wbce" else (None, None)
    compare(lambda: P_EXACT.pairsum(kind, *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum(kind, *oin, npos=npos, nneg=nneg), kin, oin, *TOL[dt], f"strips {kind}/{tg}")


def test_softplus_backward_by_strips_rectangular(request):
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(override(configs={"bwd_pair": dict(STRIP=16, BM=16, BN=16, BK=16)}))
    U, V, s, b, _ = make_inputs(37, 50, 12, 1, F64, seed=25, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, F64, DEV)
    compare(lambda: P_EXACT.pairsum("softplus", *kin), lambda: oracle_pairsum("softplus", *oin), kin, oin,
            *TOL[F64], "strips softplus 37x50")


@pytest.mark.parametrize("how", ["flag-off", "over-cap"])
def test_lse_double_backward_two_pass_pre(how):
    # the unfused pre-pass (ρ and κ in two sweeps), taken when asked or when the partials buffer is too big
    U, V, s, b, _ = make_inputs(30, 70, 24, 1, F64, seed=14, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, F64, DEV)
    with override(**({"dbl_fused_pre": False} if how == "flag-off" else {"dbl_fused_pre_max_bytes": 0})):
        compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin, *TOL[F64], f"lse pre {how}")


def test_extreme_logits_finite():
    # large scale: saturated sigmoids, bce clamp active, LSE far from 0
    U, V, s, b, tgt = make_inputs(20, 20, 16, 2, F64, seed=6, scale=300.0)
    kin, oin = _leaves(U, V, s, b, tgt, torch.float32, DEV)
    for kind in PAIR_PHIS[:3]:
        npos, nneg = _counts(P_EXACT, kin[4], 20) if kind == "wbce" else (None, None)
        compare(lambda k=kind, p=npos, q=nneg: P_EXACT.pairsum(k, *kin, npos=p, nneg=q),
                lambda k=kind, p=npos, q=nneg: oracle_pairsum(k, *oin, npos=p, nneg=q), kin, oin, 1e-4, 1e-5,
                f"{kind} scale=300", second=kind != "wbce")
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin[:4] + (None,), oin[:4] + (None,),
            1e-4, 1e-5, "lse scale=300")  # fp32 logits of size 300: LSE absolute error ~3e-5


def test_column_lse_far_below_the_block_max():
    """The forward's column LSE partials reuse the row pass's exponentials, scaled by 2^(m_i - mx) (mx the
    block's largest row max); a column more than 60 binary orders below mx takes the exact two-pass form. Here
    every column but one sits ~144 binary orders below row 0's max, where the shortcut's sums are fp32
    denormals with a few significant bits (off by ~1e-2 in the LSE)."""
    g = torch.Generator().manual_seed(11)
    n = 8
    U = torch.zeros(n, 2, dtype=F64)
    U[:, 1] = 1.0
    U[0] = torch.tensor([10.0, 0.0])
    V = torch.zeros(n, 2, dtype=F64)
    V[:, 1] = torch.rand(n, generator=g, dtype=F64)
    V[0, 0], V[1, 0] = -10.0, 10.0
    s, b = torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64)
    Z = s * U @ V.T + b
    assert Z[0].max() - Z[1:, 0].max() > 99  # ≥ 144 binary orders: the exact form must run
    lr, lc = P_EXACT.lse(*(x.to(torch.float32).to(DEV) for x in (U, V, s, b)))
    torch.testing.assert_close(lr.double().cpu(), Z.logsumexp(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lc.double().cpu(), Z.logsumexp(0), rtol=0, atol=1e-5)


def _ggc_inputs():
    g = torch.Generator().manual_seed(7)
    n, d, r = 2, 3, 2
    U = torch.randn(n, d, generator=g, dtype=F64, device=DEV, requires_grad=True)
    V = torch.randn(n, d, generator=g, dtype=F64, device=DEV, requires_grad=True)
    s = torch.tensor(1.3, dtype=F64, device=DEV, requires_grad=True)
    b = torch.tensor(-0.2, dtype=F64, device=DEV, requires_grad=True)
    a = torch.rand(n, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    L = torch.randn(n, r, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    R = torch.randn(n, r, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    return U, V, s, b, a, L, R


def test_gradgradcheck_lse_f64():
    U, V, s, b, a, L, R = _ggc_inputs()
    assert torch.autograd.gradgradcheck(lambda U, V, s, b: P_EXACT.lse(U, V, s, b), (U, V, s, b))


@pytest.mark.slow  # ~30 s under the interpreter; the oracle comparisons above cover the same maths
def test_gradgradcheck_pairsum_lowrank_f64():
    U, V, s, b, a, L, R = _ggc_inputs()
    assert torch.autograd.gradgradcheck(
        lambda U, V, s, b, a, L, R: P_EXACT.pairsum("mse", U, V, s, b, ("lowrank", a, L, R)),
        (U, V, s, b, a, L, R))


def test_count_pos_and_determinism():
    U, V, s, b, tgt = make_inputs(70, 70, 20, 3, F64, seed=8)
    tk = ("lowrank",) + tuple(t.to(DEV) for t in tgt[1:])
    S = oracle_S(70, tgt, U)
    assert float(P_EXACT.count_pos(tk, 70)) == float((S > 0.5).sum())
    assert float(P_EXACT.count_pos(None, 70)) == 70.0
    Uk, Vk = U.float().to(DEV).requires_grad_(True), V.float().to(DEV).requires_grad_(True)
    runs = []
    for _ in range(2):
        out = P_EXACT.pairsum("bce", Uk, Vk, s.float().to(DEV), None, None)
        runs.append((out.detach(),) + torch.autograd.grad(out, (Uk, Vk)))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_backward_create_graph_on_leaves():
    # .backward(create_graph=True) then a second backward: the engine pattern of trajectory matching
    U, V, s, b, tgt = make_inputs(20, 20, 12, 2, F64, seed=9)
    kin, oin = _leaves(U, V, s, b, tgt, F64, DEV)
    res = []
    for (Uq, Vq, sq, bq, tq), fn in ((kin, lambda *x: P_EXACT.pairsum("bce", *x)),
                                     (oin, lambda *x: oracle_pairsum("bce", *x))):
        fn(Uq, Vq, sq, bq, tq).backward(create_graph=True)
        gU = Uq.grad
        Uq.grad = None
        (gU ** 2).sum().backward()
        res.append((Vq.grad.clone(), tq[2].grad.clone()))
    assert_close(res[0][0], res[1][0], 1e-9, 1e-12, "dV of |dU|²")
    assert_close(res[0][1], res[1][1], 1e-9, 1e-12, "dLc of |dU|²")


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    U = torch.randn(4, 8)
    with pytest.raises(ValueError, match="CUDA"):
        TritonPrimitives().lse(U, U, torch.tensor(1.0), None)


def test_dense_target_falls_back():
    pytest.importorskip("lors_fast.core.streaming")
    U, V, s, b, tgt = make_inputs(12, 12, 8, 2, F64, seed=10)
    S = oracle_S(12, tgt, U)
    out = P_EXACT.pairsum("mse", U.to(DEV), V.to(DEV), s.to(DEV), b.to(DEV), ("dense", S.to(DEV)))
    assert_close(out, oracle_pairsum("mse", U, V, s, b, tgt), 1e-10, 1e-12, "dense mse")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA and TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_against_oracle(dtype):
    U, V, s, b, tgt = make_inputs(1000, 1000, 96, 10, F64, seed=11)
    kin, oin = _leaves(U.to(dtype).double(), V.to(dtype).double(), s, b, tgt, dtype, "cuda")
    npos, nneg = _counts(P_EXACT, kin[4], 1000)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    compare(lambda: P_EXACT.pairsum("wbce", *kin, npos=npos, nneg=nneg),
            lambda: oracle_pairsum("wbce", *oin, npos=npos, nneg=nneg), kin, oin, rtol, 1e-6, f"gpu wbce {dtype}")
    compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin[:4] + (None,), oin[:4] + (None,),
            rtol, 1e-6, f"gpu lse {dtype}")


@pytest.mark.parametrize("kind", TRITON_KINDS)
def test_public_loss_triton_backend_matches_reference(kind):
    # lors_fast.contrastive_loss(backend="triton") composes these primitives (compose.py): value, first and
    # second derivatives against the materialised reference, identity and low-rank targets, float64.
    lf = pytest.importorskip("lors_fast")
    g = torch.Generator().manual_seed(14)
    n, d, r = 20, 12, 3
    U = (torch.randn(n, d, generator=g, dtype=F64) / 3).to(DEV).requires_grad_(True)
    V = (torch.randn(n, d, generator=g, dtype=F64) / 3).to(DEV).requires_grad_(True)
    s = torch.tensor(5.0, dtype=F64, device=DEV, requires_grad=True)
    a = torch.rand(n, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    L = (torch.randn(n, r, generator=g, dtype=F64) * 0.3).to(DEV).requires_grad_(True)
    R = (torch.randn(n, r, generator=g, dtype=F64) * 0.3).to(DEV).requires_grad_(True)
    for tgt, xs in ((None, [U, V, s]), (lf.LowRankTarget(a, L, R, 0.5), [U, V, s, a, L, R])):
        res = []
        for backend in ("triton", "reference"):
            loss = lf.contrastive_loss(U, V, s, tgt, kind=kind, backend=backend)
            g1 = torch.autograd.grad(loss, xs, create_graph=True)
            g2 = torch.autograd.grad(sum((x * x).sum() for x in g1), xs)
            res.append([loss, *g1, *g2])
        for i, (x, y) in enumerate(zip(*res)):
            assert_close(x, y, 1e-10, 1e-12, f"{kind} {'lowrank' if tgt else 'identity'} output {i}")


@pytest.mark.parametrize("kinds", [("infonce", "wbce"), ("siglip", "bce")], ids=["infonce+wbce", "siglip+bce"])
def test_torch_compile_fullgraph(kinds):
    # every kernel launch sits in a custom op with a fake implementation (lors_fast.ops.triton_ops), so dynamo
    # traces a loss built on the triton backend without a graph break (fullgraph=True raises on one); values and
    # gradients equal eager. (Second derivatives through a compiled region are a torch.compile limitation —
    # "aot_autograd does not currently support double backward" — the double backward is for eager code.)
    lf = pytest.importorskip("lors_fast")
    g = torch.Generator().manual_seed(15)
    U = torch.randn(16, 8, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    V = torch.randn(16, 8, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    s = torch.tensor(2.0, dtype=F64, device=DEV, requires_grad=True)
    a = torch.rand(16, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    L = (torch.randn(16, 3, generator=g, dtype=F64) * 0.3).to(DEV).requires_grad_(True)
    R = (torch.randn(16, 3, generator=g, dtype=F64) * 0.3).to(DEV).requires_grad_(True)

    def loss_fn(U, V, s, a, L, R):
        tgt = lf.LowRankTarget(a, L, R, 1.0 / 3)
        bias = s * 0 - 1.0 if kinds[0] == "siglip" else None
        return lf.contrastive_loss(U, V, s, None, kind=kinds[0], logit_bias=bias, backend="triton") + \
            lf.contrastive_loss(U, V, s, tgt, kind=kinds[1], backend="triton")

    xs = (U, V, s, a, L, R)
    torch._dynamo.reset()
    l1 = loss_fn(*xs)
    l2 = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*xs)
    assert_close(l2, l1, 1e-12, 1e-12, "compiled loss")
    for i, (x, y) in enumerate(zip(torch.autograd.grad(l2, xs), torch.autograd.grad(l1, xs))):
        assert_close(x, y, 1e-12, 1e-12, f"compiled gradient {i}")
    torch._dynamo.reset()


def test_torch_compile_fullgraph_open_clip_dropins():
    # the open_clip drop-ins on the triton backend compile to one graph too (a CLIP trainer's usual setup)
    from lors_fast.core.losses import ClipLoss, SigLipLoss

    g = torch.Generator().manual_seed(16)
    U = torch.randn(16, 8, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    V = torch.randn(16, 8, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    s = torch.tensor(2.0, dtype=F64, device=DEV, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=F64, device=DEV, requires_grad=True)
    for name, loss in (("ClipLoss", ClipLoss(backend="triton")), ("SigLipLoss", SigLipLoss(backend="triton"))):
        def fn(U, V, s, bias, loss=loss, name=name):
            return loss(U, V, s) if name == "ClipLoss" else loss(U, V, s, bias)

        torch._dynamo.reset()
        l1 = fn(U, V, s, bias)
        l2 = torch.compile(fn, backend="aot_eager", fullgraph=True)(U, V, s, bias)
        assert_close(l2, l1, 1e-12, 1e-12, f"compiled {name}")
        xs = (U, V, s) if name == "ClipLoss" else (U, V, s, bias)
        for x, y in zip(torch.autograd.grad(l2, xs), torch.autograd.grad(l1, xs)):
            assert_close(x, y, 1e-12, 1e-12, f"compiled {name} gradient")
    torch._dynamo.reset()
