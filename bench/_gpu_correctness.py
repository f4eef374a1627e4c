"""The correctness cases of bench/gpu_check.py: the Triton primitives' values, first and second derivatives
against the float64 oracle (lors_fast.core.reference; φ from lors_fast.core.kinds), low precision judged by
the flash-attention rule err ≤ 2·err(torch eager in that dtype) + floor."""

from __future__ import annotations

import math

import torch

from lors_fast.core.reference import reference_lse, reference_pairsum

F64 = torch.float64
DEV = "cpu"  # set per call (correctness_case's dev)

# the one oracle of the primitives (lors_fast.core.reference; φ from lors_fast.core.kinds)
oracle_lse = reference_lse
oracle_pairsum = reference_pairsum


def _derivs(fn, xs, seed):
    out = fn(*xs)
    g = torch.Generator(device=DEV).manual_seed(seed)
    if isinstance(out, tuple):
        loss = sum((torch.randn(o.shape, generator=g, device=DEV, dtype=F64).to(o.dtype) * o).sum()
                   for o in out)
        val = torch.cat([o.reshape(-1) for o in out])
    else:
        loss, val = out, out.reshape(1)
    g1 = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    f2 = sum((torch.randn(x.shape, generator=g, device=DEV, dtype=F64).to(x.dtype) * x).sum()
             for x in g1 if x is not None)
    g2 = torch.autograd.grad(f2, xs, allow_unused=True)
    return [val] + list(g1) + list(g2)


def _relerr(a, e, floor_scale=0.0):
    """max|a − e| / max(max|e|, floor_scale): floor_scale (a fraction of the largest tensor of the same
    derivative order) keeps derivatives that are exactly zero in exact arithmetic (e.g. ∂²lse/∂b²) from
    being judged relative to rounding noise."""
    if a is None or e is None:
        return 0.0 if (a is None and e is None) else float("nan")
    a, e = a.detach().double(), e.detach().double()
    return float((a - e).abs().max() / max(float(e.abs().max()), floor_scale, 1e-30))


MODES = {  # name: (dtype, triton fp32 precision, eager allow_tf32, floor)
    "fp32-ieee": (torch.float32, "ieee", False, 1e-4),
    "fp32-tf32": (torch.float32, "tf32", True, 2e-3),
    "bf16": (torch.bfloat16, "ieee", False, 1e-2),
    "fp16": (torch.float16, "ieee", False, 2e-3),
}


def correctness_case(prim_name, kind, tgt_kind, M, N, d, mode, bias=True, *, dev, sz, log, record, r=10, seed=0,
                     scale=10.0):
    """``dev``: the device; ``sz``: the size cap of a dry run; ``log``; ``record``: takes the result dict."""
    from lors_fast.ops import TritonPrimitives

    global DEV  # noqa: PLW0603 - the device of this script run (one per process)
    DEV = dev
    _sz = sz

    dtype, prec, eager_tf32, floor = MODES[mode]
    M, N, d = _sz(M), (_sz(N) if N == M else _sz(N, 45)), _sz(d, 48)
    P = TritonPrimitives(fp32_precision=prec)
    g = torch.Generator(device=DEV).manual_seed(seed)
    U = (torch.randn(M, d, generator=g, device=DEV, dtype=F64) / d**0.5).to(dtype).double()
    V = (torch.randn(N, d, generator=g, device=DEV, dtype=F64) / d**0.5).to(dtype).double()
    base = [U, V, torch.tensor(float(scale), device=DEV, dtype=F64)]
    if bias:
        base.append(torch.tensor(-1.0, device=DEV, dtype=F64))
    if tgt_kind == "lowrank":
        base += [torch.rand(N, generator=g, device=DEV, dtype=F64),
                 torch.randn(N, r, generator=g, device=DEV, dtype=F64) * 0.2,
                 torch.randn(N, r, generator=g, device=DEV, dtype=F64) * 0.2]
    npos = nneg = None
    if kind == "wbce":
        # counted on the fp32 factors the kernel sees (its S > 0.5 mask is built from them)
        t32 = None if tgt_kind != "lowrank" else ("lowrank", *[x.float() for x in base[-3:]])
        npos = P.count_pos(t32, N)
        nneg = N * N - npos

    def make(dt, sdt):
        xs = [x.detach().to(dt if i < 2 else sdt).requires_grad_(True) for i, x in enumerate(base)]
        return xs

    def call(fn_lse, fn_pair):
        def f(*xs):
            U_, V_, s_ = xs[:3]
            b_ = xs[3] if bias else None
            rest = xs[4:] if bias else xs[3:]
            t_ = ("lowrank", *rest) if tgt_kind == "lowrank" else None
            if prim_name == "lse":
                return fn_lse(U_, V_, s_, b_)
            return fn_pair(kind, U_, V_, s_, b_, t_, npos, nneg)
        return f

    kern = call(P.lse, lambda k, *a: P.pairsum(k, *a[:5], npos=a[5], nneg=a[6]))
    orac = call(oracle_lse, oracle_pairsum)
    ref = _derivs(orac, make(F64, F64), seed + 1)
    out = _derivs(kern, make(dtype, torch.float32), seed + 1)
    torch.backends.cuda.matmul.allow_tf32 = eager_tf32
    try:
        eag = _derivs(orac, make(dtype, dtype), seed + 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    n_in = len(base)
    names = ["value"] + [f"d{i}" for i in range(n_in)] + [f"dd{i}" for i in range(n_in)]
    rows = []
    ok = True
    gmax = [float(ref[0].abs().max()),
            max(float(x.abs().max()) for x in ref[1:1 + n_in] if x is not None),
            max([float(x.abs().max()) for x in ref[1 + n_in:] if x is not None] + [0.0])]
    for i, (nm, a, e, q) in enumerate(zip(names, out, ref, eag)):
        fl = 1e-3 * gmax[0 if i == 0 else (1 if i <= n_in else 2)]
        ek, ee = _relerr(a, e, fl), _relerr(q, e, fl)
        lim = 2 * (ee if math.isfinite(ee) else 0.0) + floor
        passed = bool(ek <= lim) or (a is None and e is None)
        ok &= passed
        rows.append(dict(name=nm, err=ek, eager_err=ee, limit=lim, ok=passed))
    rec = dict(prim=prim_name, kind=kind, target=tgt_kind, M=M, N=N, d=d, mode=mode, bias=bias, scale=scale, ok=ok,
               worst=max(r_["err"] for r_ in rows), worst_eager=max(r_["eager_err"] for r_ in rows),
               details=rows)
    record(rec)
    bad = [f"{r_['name']}:{r_['err']:.1e}>{r_['limit']:.1e}" for r_ in rows if not r_["ok"]]
    log(f"{'OK  ' if ok else 'FAIL'} {prim_name:4s} {kind:8s} {tgt_kind:8s} {mode:9s} M={M} N={N} d={d} s={scale:g} "
        f"worst={rec['worst']:.2e} eager={rec['worst_eager']:.2e} {' '.join(bad)}")


