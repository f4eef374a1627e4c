"""The strip path of the Triton backend (lors_fast.ops.strip) and the path choice, under the interpreter.

Values, first and second derivatives against the one oracle (lors_fast.core.reference via the helpers of
test_triton_primitives), fp64 and fp32, awkward N and d, strips of strip ± 1 rows; every path setting
(LORS_FAST_TRITON_PATH, override) and the auto rule / the timed choice cached in the user table.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_triton_primitives import (  # noqa: E402
    DEV,
    F64,
    P_EXACT,
    TOL,
    _counts,
    _leaves,
    compare,
    make_inputs,
    oracle_lse,
    oracle_pairsum,
)

from lors_fast.ops import last_path, strip, tuned_tables  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
F32 = torch.float32


def _check_strip(fn):
    """Run ``fn`` (which compares against the oracle) and check the strip path ran (last launch)."""
    fn()
    assert last_path() == "strip", f"last launch took {last_path()!r}, expected 'strip'"


@pytest.mark.parametrize("case", [
    (17, 17, 33, True, F64, 5), (1, 1, 3, False, F64, None), (2, 2, 17, True, F32, 1),
    (33, 33, 20, True, F32, 32), (31, 31, 8, False, F64, 32), (17, 5, 9, True, F64, 4), (5, 40, 7, True, F32, 2),
], ids=lambda c: f"M{c[0]}-N{c[1]}-d{c[2]}-{'b' if c[3] else 'nob'}-{str(c[4])[6:]}-rows{c[5]}")
def test_lse_strip(case):
    M, N, d, bias, dt, rows = case
    U, V, s, b, _ = make_inputs(M, N, d, 1, F64, seed=31, bias=bias, lowrank=False)
    kin, oin = _leaves(U, V, s, b, None, dt, DEV)
    with strip.override(path="strip", strip_rows=rows):
        _check_strip(lambda: compare(lambda: P_EXACT.lse(*kin[:4]), lambda: oracle_lse(*oin[:4]), kin, oin,
                                     *TOL[dt], f"strip lse {case}"))


PAIRS = [(k, t) for k in ("bce", "wbce", "mse") for t in ("identity", "lowrank")] + [("softplus", "identity")]


@pytest.mark.parametrize("dt", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", PAIRS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_pair_strip(case, dt):
    kind, tg = case
    n, rows = (17, 8) if dt == F64 else (9, 4)
    U, V, s, b, tgt = make_inputs(n, n, 11, 3, F64, seed=32, lowrank=tg == "lowrank")
    kin, oin = _leaves(U, V, s, b, tgt, dt, DEV)
    npos, nneg = _counts(P_EXACT, kin[4], n) if kind == "wbce" else (None, None)
    with strip.override(path="strip", strip_rows=rows):
        _check_strip(lambda: compare(lambda: P_EXACT.pairsum(kind, *kin, npos=npos, nneg=nneg),
                                     lambda: oracle_pairsum(kind, *oin, npos=npos, nneg=nneg), kin, oin, *TOL[dt],
                                     f"strip {kind}/{tg} {dt}"))


@pytest.mark.parametrize("n", [1, 2])
def test_pair_strip_tiny(n):
    U, V, s, b, tgt = make_inputs(n, n, 3, 1, F64, seed=33)
    kin, oin = _leaves(U, V, s, b, tgt, F64, DEV)
    with strip.override(path="strip", strip_rows=1):
        _check_strip(lambda: compare(lambda: P_EXACT.pairsum("mse", *kin), lambda: oracle_pairsum("mse", *oin),
                                     kin, oin, *TOL[F64], f"strip mse N={n}"))


def test_strip_bf16_matches_rounded_oracle():
    """16-bit inputs: the GEMM in fp32 from exact 16-bit products, G stored in bf16 (a bf16-level error)."""
    U, V, s, b, tgt = make_inputs(20, 20, 16, 2, F64, seed=34)
    Ub, Vb = U.bfloat16().requires_grad_(True), V.bfloat16().requires_grad_(True)
    with strip.override(path="strip", strip_rows=7):
        lr, lc = P_EXACT.lse(Ub, Vb, s.float(), b.float())
        (lr.sum() + 2 * lc.sum()).backward()
    assert last_path() == "strip"
    Uo, Vo = Ub.detach().double().requires_grad_(True), Vb.detach().double().requires_grad_(True)
    lro, lco = oracle_lse(Uo, Vo, s, b)
    (lro.sum() + 2 * lco.sum()).backward()
    assert torch.allclose(lr.double(), lro, atol=1e-5, rtol=1e-5), "bf16 strip LSE rows"
    assert torch.allclose(lc.double(), lco, atol=1e-5, rtol=1e-5), "bf16 strip LSE columns"
    err = float((Ub.grad.double() - Uo.grad).norm() / Uo.grad.norm())
    assert Ub.grad.dtype == torch.bfloat16 and err < 1e-2, f"bf16 strip dU relative error {err:.3g}"


def test_strip_rows_from_budget_and_determinism():
    U, V, s, b, _ = make_inputs(40, 40, 8, 1, F64, seed=35, lowrank=False)
    with strip.override(path="strip", budget_bytes=40 * 8 * 8):  # 8 fp64 rows of 40: < one block → 32 rows
        c = type("C", (), {"M": 40, "N": 40, "device": torch.device("cpu")})()
        assert strip._rows(c, 8) == 32
        outs = [P_EXACT.lse(U, V, s, b) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*outs)), "strip path not deterministic"


def test_path_settings(monkeypatch):
    U, V, s, b, _ = make_inputs(9, 9, 5, 1, F64, seed=36, lowrank=False)
    ref = oracle_lse(U, V, s, b)
    for setting in ("fused", "strip"):
        monkeypatch.setenv(strip.ENV, setting)
        got = P_EXACT.lse(U, V, s, b)
        assert last_path() == setting, f"{strip.ENV}={setting}: last_path() = {last_path()!r}"
        assert torch.allclose(got[0], ref[0]) and torch.allclose(got[1], ref[1]), setting
    monkeypatch.setenv(strip.ENV, "auto")
    P_EXACT.lse(U, V, s, b)
    assert last_path() == strip.rule(9, 9, 5) == "fused", "auto off the GPU follows strip.rule"
    with strip.override(path="strip"):  # the override beats the environment
        P_EXACT.lse(U, V, s, b)
        assert last_path() == "strip"
    monkeypatch.setenv(strip.ENV, "fast")
    with pytest.raises(ValueError, match=r"LORS_FAST_TRITON_PATH='fast' is not a Triton path"):
        P_EXACT.lse(U, V, s, b)
    with pytest.raises(ValueError, match=r"path must be one of"), strip.override(path="quick"):
        pass


def test_auto_rule():
    assert strip.rule(32768, 32768, 512) == "strip"
    assert strip.rule(32768, 32768, 64) == "fused"
    assert strip.rule(1024, 1024, 512) == "fused"


def test_auto_times_once_and_caches(monkeypatch, tmp_path):
    """The first large call per key times both candidates and records the winner; later calls read it."""
    monkeypatch.setenv(tuned_tables.ENV, str(tmp_path / "table.json"))
    tuned_tables.reset_cache()
    calls = []

    def timer():
        calls.append(1)
        return {"fused": 2.0, "strip": 1.0}

    dev = torch.device("cpu")
    try:
        assert strip.cached_choice(dev, "lse", torch.bfloat16, 30000, 512, timer) == "strip"
        assert strip.cached_choice(dev, "lse", torch.bfloat16, 32768, 512, timer) == "strip"  # same N bucket
        assert len(calls) == 1, "timed more than once for one key"
        assert strip.cached_choice(dev, "pair", torch.bfloat16, 32768, 512, lambda: {"fused": 1, "strip": 3}) == \
            "fused"
        table = tuned_tables.load_table(tmp_path / "table.json")
        assert table["devices"]["cpu"]["path_lse_n32768|bfloat16|512"]["config"] == {"PATH": "strip"}
        # choose() on a "GPU": small calls stay fused without timing, large ones use the cache
        c = type("C", (), {"M": 32768, "N": 32768, "D": 512, "dtype": torch.bfloat16, "device": dev})()
        monkeypatch.setattr(strip, "_on_gpu", lambda c: True)
        assert strip.choose(c, "lse", timer) == "strip" and len(calls) == 1
        c.M = c.N = 64
        assert strip.choose(c, "lse", timer) == "fused"
    finally:
        tuned_tables.reset_cache()


def test_roofline_predictions_match_results_gpu():
    """bench/roofline.py's model gives the predictions written into bench/RESULTS_GPU.md."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_roofline", root / "bench" / "roofline.py")
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    inf = rl.strip_ms(32768, 512, 0, "bfloat16", False, 700, 4.8)
    wb = rl.strip_ms(32768, 512, 10, "bfloat16", True, 700, 4.8)
    text = (root / "bench" / "RESULTS_GPU.md").read_text()
    assert f"**{inf:.2f}**" in text and f"**{wb:.2f}**" in text, (inf, wb)
    assert 1.0 < wb / inf < 1.5 and rl.predict_ms("eager", "infonce", False, 64, 8, 0, "float32", 1, 1) is None
    assert rl.predict_ms("triton-strip", "wbce", True, 32768, 512, 10, "bfloat16", 700, 4.8) == wb


@pytest.mark.parametrize("kind", ["infonce", "cwcl", "siglip", "bce", "wbce", "mse"])
def test_public_losses_on_the_strip_path(kind):
    """contrastive_loss(backend="triton") with LORS_FAST_TRITON_PATH's strip setting: value, first and
    second derivatives vs the materialised reference (float64, low-rank target, bias, strips of 6 rows)."""
    import lors_fast as lf

    g = torch.Generator().manual_seed(37)
    n, d, r = 13, 7, 2
    U = (torch.randn(n, d, generator=g, dtype=F64) / 2).requires_grad_(True)
    V = (torch.randn(n, d, generator=g, dtype=F64) / 2).requires_grad_(True)
    s = torch.tensor(4.0, dtype=F64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=F64, requires_grad=True)
    a = torch.rand(n, generator=g, dtype=F64).requires_grad_(True)
    L = (torch.randn(n, r, generator=g, dtype=F64) * 0.3).requires_grad_(True)
    R = (torch.randn(n, r, generator=g, dtype=F64) * 0.3).requires_grad_(True)
    xs = [U, V, s, b, a, L, R]
    res = []
    for backend in ("triton", "reference"):
        with strip.override(path="strip", strip_rows=6):
            loss = lf.contrastive_loss(U, V, s, lf.LowRankTarget(a, L, R, 0.5), kind=kind, logit_bias=b,
                                       backend=backend)
            g1 = torch.autograd.grad(loss, xs, create_graph=True)
            g2 = torch.autograd.grad(sum((x * x).sum() for x in g1), xs)
        res.append([loss, *g1, *g2])
        if backend == "triton":
            assert last_path() == "strip"
    # second derivatives normwise: ∂²/∂b² is zero in exact arithmetic for the LSE kinds and comes out of the
    # sums as cancellation noise (the same on the fused path), so its scale is the largest second derivative
    big2 = max(float(y.abs().max()) for y in res[1][8:])
    for i, (x, y) in enumerate(zip(*res)):
        err = float((x - y).abs().max())
        scale = max(1.0, float(y.abs().max()) if i < 8 else big2)
        assert err <= 1e-10 * scale, f"{kind} output {i}: error {err:.3e}"
