"""The strip path of the Triton backend, and the choice between it and the fused kernels.

Per strip of rows k = r0:r1 a library matmul (``torch.mm``: cuBLAS on a GPU) computes X_k = U_k·Vᵀ in the
accumulation dtype (fp32 for 16-bit inputs: ``out_dtype`` on CUDA, exact products upcast elsewhere; fp64
for fp64), and one Triton epilogue (:mod:`lors_fast.ops.strip_kernels`, the maths in its docstring) reads it
once:

- forward: Z = s·X + b → the row LSE of the strip, the column partials (combined in torch:
  LSEc = logaddexp over strips of log Σ_p csum_p·e^{cmax_p}), or the pair sums Σ φ(Z, S);
- backward: G = ∂out/∂Z (16-bit for 16-bit inputs) and, for a low-rank target, H = ∂out/∂S; then library
  matmuls: dU_k = s·G·V, dV += s·Gᵀ·U_k, dLc_k = H·R, dR += Hᵀ·Lc_k, da = diag(H); ∂s = Σ G⊙X and
  ∂b = Σ G from per-tile fp32 partials;
- double backward (:func:`double`): per strip X and Mt = Ū_k·Vᵀ + U_k·V̄ᵀ (one GEMM of K = 2d), one epilogue
  emitting A = s·δZ + s̄·G and G (and δS, H for a low-rank target), then library matmuls; the LSE kinds first
  run a pass over all strips for ρ_i = Σ_j p_ij W_ij and κ_j = Σ_i q_ij W_ij.

Memory O(strip·N): the strip has ``rows`` = budget / (N · bytes per element of the strip's buffers) rows
(at least one epilogue block, at most M), or :attr:`StripOptions.strip_rows`. Deterministic: every sum runs
in a fixed order (strips in order, per-tile partials summed by torch).

Path choice (:func:`choose`): ``LORS_FAST_TRITON_PATH`` = ``auto`` (default) | ``fused`` | ``strip``, or
:func:`override`. ``auto`` on a GPU: calls with M·N < :data:`LARGE` take the fused kernels; the first large
call per (GPU model, dtype, family lse/pair, N bucket = next power of two, d) times both forwards once on its
inputs (below autograd: inside the custom op) and records the winner in the user table of
:mod:`lors_fast.ops.tuned_tables` (stage ``path_<family>_n<bucket>``, config ``{"PATH": ...}``), which later
calls read. ``auto`` without a GPU (the interpreter) is the fixed rule :func:`rule`: the strip path when
M·N ≥ LARGE and d ≥ 256 (where the roofline model says the library GEMM wins), else fused.
:func:`last_path` says which path the last launch took.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace

import torch

from lors_fast.core.kinds import interpreting
from lors_fast.ops.launch_common import _lowrank_parts, _rp, _scalar

__all__ = ["PATHS", "ENV", "StripOptions", "options", "override", "last_path", "choose", "rule", "LARGE"]

PATHS = ("auto", "fused", "strip")
ENV = "LORS_FAST_TRITON_PATH"
#: M·N from which "auto" considers the strip path (and times it on a GPU): 4096²
LARGE = 1 << 24


@dataclass(frozen=True)
class StripOptions:
    """path: None (read ``LORS_FAST_TRITON_PATH``, default auto) or one of :data:`PATHS`; strip_rows: rows per
    strip (None: from the budget); budget_bytes: memory of one strip's buffers (X, G, H)."""

    path: str | None = None
    strip_rows: int | None = None
    budget_bytes: int = 256 * 2**20


# the options in force: a stack that only :func:`override` pushes and pops (process-wide, not a context
# variable, so that autograd's device threads running a backward see the block's options too)
_STACK: list[StripOptions] = [StripOptions()]
# a record, not a setting: the path of the last launch
_LAST: dict = {"path": None}


def options() -> StripOptions:
    """The strip-path options in force (the innermost :func:`override`, else the defaults)."""
    return _STACK[-1]


@contextlib.contextmanager
def override(**changes):
    """Run a block with some :class:`StripOptions` fields replaced (tests, benchmarks)."""
    opts = replace(_STACK[-1], **changes)
    if opts.path is not None and opts.path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {opts.path!r}")
    _STACK.append(opts)
    try:
        yield opts
    finally:
        _STACK.pop()


def last_path() -> str | None:
    """"fused" or "strip": the path of the last primitive launch (None before any)."""
    return _LAST["path"]


def _setting() -> str:
    p = options().path or os.environ.get(ENV, "").strip().lower() or "auto"
    if p not in PATHS:
        raise ValueError(f"{ENV}={p!r} is not a Triton path; expected one of {PATHS}")
    return p


def rule(M: int, N: int, D: int) -> str:
    """The deterministic choice of "auto" where nothing is timed (no GPU, the interpreter)."""
    return "strip" if M * N >= LARGE and D >= 256 else "fused"


def _on_gpu(c) -> bool:
    return c.device.type == "cuda" and not interpreting()


def choose(c, family: str, timer=None) -> str:
    """The path of this launch (``c``: the launch context; ``timer()`` → {"fused": ms, "strip": ms}, the
    measurement auto runs once per key on a GPU), recorded for :func:`last_path`."""
    p = _setting()
    if p == "auto":
        if not _on_gpu(c):
            p = rule(c.M, c.N, c.D)
        elif c.M * c.N < LARGE or timer is None:
            p = "fused"
        else:
            p = cached_choice(c.device, family, c.dtype, c.N, c.D, timer)
    _LAST["path"] = p
    return p


def cached_choice(device, family: str, dtype, N: int, D: int, timer) -> str:
    """The recorded winner for this key, or (first call) time both, record the winner, return it."""
    from lors_fast.ops import tuned_tables as tt

    stage = f"path_{family}_n{1 << max(0, math.ceil(math.log2(max(N, 1))))}"
    got = tt.lookup(device, stage, dtype, D).get("PATH")
    if got in ("fused", "strip"):
        return got
    ms = timer()
    win = min(("fused", "strip"), key=lambda k: ms[k])
    import datetime

    import triton

    tt.save({"device": tt.device_key(device), "entries": [{
        "key": tt._entry_key(stage, dtype, D), "config": {"PATH": win}, "ms": ms[win], "n": N,
        "triton": triton.__version__, "date": datetime.date.today().isoformat()}]})
    return win


def gpu_timer(run_fused, run_strip, reps: int = 3):
    """{"fused": ms, "strip": ms}: one warm-up and ``reps`` timed runs of each (CUDA events)."""
    out = {}
    for name, fn in (("fused", run_fused), ("strip", run_strip)):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        out[name] = start.elapsed_time(end) / reps
    return out


# ------------------------------------------------------------------------------------------- launches
_K = None


def _kernels():
    global _K  # noqa: PLW0603 - the lazily imported kernel module (triton imported at the first launch)
    if _K is None:
        from lors_fast.ops import strip_kernels

        _K = strip_kernels
    return _K


def _blocks(c):
    return (32, 128, 4) if _on_gpu(c) else (32, 64, 4)  # (BM, BN, num_warps) of the epilogues


def _rows(c, bytes_per_elem: int) -> int:
    o = options()
    if o.strip_rows is not None:
        return max(1, min(int(o.strip_rows), c.M))
    bm = _blocks(c)[0]
    rows = o.budget_bytes // max(1, c.N * bytes_per_elem) // bm * bm
    return max(1, min(max(bm, rows), c.M))


def _mm(a, b, acc):
    """a·b in the accumulation dtype ``acc`` (16-bit operands: fp32 output of the library GEMM)."""
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))  # exact products of 16-bit operands, as the GPU's fp32 accumulate


def _kw(c, kind, tgt, rp):
    bm, bn, nw = _blocks(c)
    return dict(KIND=kind, TGT=tgt, BM=bm, BN=bn, RP=rp, ACC=c.ACC, LR_PREC=c.lr_prec, num_warps=nw)


def lse_forward(c):
    """(LSEr, LSEc) by strips."""
    K = _kernels()
    d = c.dummy()
    lr = torch.empty(c.M, dtype=c.acc, device=c.device)
    lc = torch.full((c.N,), -math.inf, dtype=c.acc, device=c.device)
    rows = _rows(c, c.U.new_empty(0, dtype=c.acc).element_size())
    kw = _kw(c, 0, 0, 16)
    for r0 in range(0, c.M, rows):
        R = min(rows, c.M - r0)
        X = _mm(c.U[r0:r0 + R], c.V.T, c.acc)
        nb = -(-R // kw["BM"])
        cm = torch.empty(nb, c.N, dtype=c.acc, device=c.device)
        cs = torch.empty(nb, c.N, dtype=c.acc, device=c.device)
        K._strip_fwd_kernel[(nb,)](X, c.N, r0, R, c.M, c.N, c.s, c.b, d, d, d, 1, d, lr, cm, cs, d, **kw)
        mx = cm.max(0).values
        lc = torch.logaddexp(lc, mx + torch.log((cs * torch.exp(cm - mx)).sum(0)))
    return lr, lc


def pair_forward(c, kind_code: int, target, w):
    """Σ φ(Z, S) by strips."""
    K = _kernels()
    d = c.dummy()
    tgt, a, lc, r_, r = _lowrank_parts(target, c)
    rows = _rows(c, c.U.new_empty(0, dtype=c.acc).element_size())
    kw = _kw(c, kind_code, tgt, _rp(r))
    parts = []
    for r0 in range(0, c.M, rows):
        R = min(rows, c.M - r0)
        X = _mm(c.U[r0:r0 + R], c.V.T, c.acc)
        part = torch.empty(-(-R // kw["BM"]), dtype=c.acc, device=c.device)
        K._strip_fwd_kernel[(part.numel(),)](X, c.N, r0, R, c.M, c.N, c.s, c.b, lc, r_, a, r, w, d, d, d, part,
                                             **kw)
        parts.append(part)
    return torch.cat(parts).sum()


def _grad_inputs(c, lse, target, w, g):
    """The backward / double backward's optional inputs as kernel arguments: (a 2-element dummy, the four LSE
    vectors, the low-rank parts, the wbce weights, the upstream scalar), each absent one the dummy."""
    d = c.dummy()
    lse = lse if lse is not None else (d, d, d, d)
    g = _scalar(g, c.acc, c.device) if g is not None else d
    return d, lse, _lowrank_parts(target, c), d if w is None else w, g


def backward(c, kind_code: int, lse=None, target=None, w=None, g=None):
    """(dU, dV, ds, db, da, dLc, dR) by strips: ``lse`` = (lr, lc, glr, glc) for the LSE primitive (kind 0);
    pair kinds: ``target`` (low-rank or None), ``w`` (wbce weights), ``g`` (the upstream scalar). The last
    three are None without a low-rank target."""
    K = _kernels()
    d, (lr, lc_, glr, glc), (tgt, a, Lc, R_, r), w, g = _grad_inputs(c, lse, target, w, g)
    gdt = c.dtype if c.dtype in (torch.bfloat16, torch.float16) else c.acc
    esz = c.U.new_empty(0, dtype=c.acc).element_size()
    rows = _rows(c, esz + c.U.new_empty(0, dtype=gdt).element_size() + (esz if tgt else 0))
    kw = _kw(c, kind_code, tgt, _rp(r))
    dU = torch.empty_like(c.U)
    dV = torch.zeros(c.N, c.D, dtype=c.acc, device=c.device)
    da = torch.zeros(c.M, dtype=c.acc, device=c.device) if tgt else d
    dL = torch.empty(c.M, r, dtype=c.acc, device=c.device) if tgt else None
    dR = torch.zeros(c.N, r, dtype=c.acc, device=c.device) if tgt else None
    ps, pb = [], []
    for r0 in range(0, c.M, rows):
        R = min(rows, c.M - r0)
        Uk = c.U[r0:r0 + R]
        X = _mm(Uk, c.V.T, c.acc)
        G = torch.empty(R, c.N, dtype=gdt, device=c.device)
        H = torch.empty(R, c.N, dtype=c.acc, device=c.device) if tgt else d
        grid = (-(-R // kw["BM"]), -(-c.N // kw["BN"]))
        part_s = torch.empty(grid[0] * grid[1], dtype=c.acc, device=c.device)
        part_b = torch.empty_like(part_s)
        K._strip_bwd_kernel[grid](X, c.N, r0, R, c.M, c.N, c.s, c.b, Lc, R_, a, r, w, g, lr, lc_, glr, glc, G, H,
                                  da, part_s, part_b, NEED_H=bool(tgt), **kw)
        del X
        dU[r0:r0 + R] = (_mm(G, c.V, c.acc) * c.s).to(dU.dtype)
        dV += _mm(G.T, Uk, c.acc)
        if tgt:
            dL[r0:r0 + R] = H @ R_
            dR += H.T @ Lc[r0:r0 + R]
        ps.append(part_s.sum())
        pb.append(part_b.sum())
    dV = (dV * c.s).to(c.dtype)
    return dU, dV, torch.stack(ps).sum(), torch.stack(pb).sum(), (da if tgt else None), dL, dR


def double(c, kind_code: int, Ub, Vb, sbar, bbar, lse=None, target=None, w=None, g=None, tbar=None):
    """The double backward by strips: gradients of T = ⟨Ū, ∂U⟩ + ⟨V̄, ∂V⟩ + s̄·∂s + b̄·∂b (+ the target's
    ⟨ā, ∂a⟩ + ⟨L̄, ∂Lc⟩ + ⟨R̄, ∂R⟩, ``tbar``) w.r.t. the inputs (maths: strip_kernels._strip_dbl_kernel).
    Per strip two library GEMMs, X = U_k·Vᵀ and Mt = [Ū_k, U_k]·[V, V̄]ᵀ (K = 2d), feed the epilogue; the LSE
    kinds first run pass 1 over all strips (ρ and κ, _strip_dbl_pre_kernel). Returns
    LSE: (gU, gV, gs, gb, ρ, κ) — ρ, κ the gradients w.r.t. the row / column cotangents;
    pair: (gU, gV, gs, gb, gg, ga, gL, gR), the last three None without a low-rank target."""
    K = _kernels()
    d, (lr, lc_, glr, glc), (tgt, a, Lc, R_, r), w, g = _grad_inputs(c, lse, target, w, g)
    sb, bb = _scalar(sbar, c.acc, c.device), _scalar(bbar, c.acc, c.device)
    Ub = Ub.detach().to(c.dtype).contiguous()
    Vb = Vb.detach().to(c.dtype).contiguous()
    if tgt:
        cv = lambda t, like: (torch.zeros_like(like) if t is None else  # noqa: E731
                              t.detach().to(device=c.device, dtype=c.acc).contiguous())
        ab, Lb_, Rb_ = (cv(t, like) for t, like in zip(tbar or (None,) * 3, (a, Lc, R_)))
    else:
        ab = Lb_ = Rb_ = d
    gdt = c.dtype if c.dtype in (torch.bfloat16, torch.float16) else c.acc
    esz = c.U.new_empty(0, dtype=c.acc).element_size()
    gsz = c.U.new_empty(0, dtype=gdt).element_size()
    rows = _rows(c, 2 * esz + 2 * gsz + (2 * esz if tgt else 0))
    kw = _kw(c, kind_code, tgt, _rp(r))
    VV = torch.cat([c.V, Vb], 1)

    def gemms(r0, R):
        Uk = c.U[r0:r0 + R]
        return Uk, _mm(Uk, c.V.T, c.acc), _mm(torch.cat([Ub[r0:r0 + R], Uk], 1), VV.T, c.acc)

    rho = kap = d
    if kind_code == 0:  # pass 1: ρ per row, κ per column (summed over blocks and strips)
        rho = torch.empty(c.M, dtype=c.acc, device=c.device)
        kap = torch.zeros(c.N, dtype=c.acc, device=c.device)
        for r0 in range(0, c.M, rows):
            R = min(rows, c.M - r0)
            _, X, Mt = gemms(r0, R)
            nb = -(-R // kw["BM"])
            kpart = torch.empty(nb, c.N, dtype=c.acc, device=c.device)
            K._strip_dbl_pre_kernel[(nb,)](X, Mt, r0, R, c.M, c.N, c.s, c.b, sb, bb, lr, lc_, rho, kpart,
                                           BM=kw["BM"], BN=kw["BN"], ACC=c.ACC, num_warps=kw["num_warps"])
            kap += kpart.sum(0)
    gU = torch.empty_like(c.U)
    gV = torch.zeros(c.N, c.D, dtype=c.acc, device=c.device)
    ga = torch.zeros(c.M, dtype=c.acc, device=c.device) if tgt else d
    gL = torch.empty(c.M, r, dtype=c.acc, device=c.device) if tgt else None
    gR = torch.zeros(c.N, r, dtype=c.acc, device=c.device) if tgt else None
    ps, pb, pg = [], [], []
    for r0 in range(0, c.M, rows):
        R = min(rows, c.M - r0)
        Uk, X, Mt = gemms(r0, R)
        A = torch.empty(R, c.N, dtype=gdt, device=c.device)
        G = torch.empty(R, c.N, dtype=gdt, device=c.device)
        DS = torch.empty(R, c.N, dtype=c.acc, device=c.device) if tgt else d
        H = torch.empty(R, c.N, dtype=c.acc, device=c.device) if tgt else d
        grid = (-(-R // kw["BM"]), -(-c.N // kw["BN"]))
        parts = torch.zeros(3, grid[0] * grid[1], dtype=c.acc, device=c.device)
        K._strip_dbl_kernel[grid](X, Mt, r0, R, c.M, c.N, c.s, c.b, sb, bb, Lc, R_, a, r, w, g, Lb_, Rb_, ab,
                                  lr, lc_, glr, glc, rho, kap, A, G, DS, H, ga, parts[0], parts[1], parts[2], **kw)
        del X, Mt
        gU[r0:r0 + R] = (_mm(A, c.V, c.acc) + _mm(G, Vb, c.acc) * c.s).to(gU.dtype)
        gV += _mm(A.T, Uk, c.acc) + _mm(G.T, Ub[r0:r0 + R], c.acc) * c.s
        if tgt:
            gL[r0:r0 + R] = DS @ R_ + H @ Rb_
            gR += DS.T @ Lc[r0:r0 + R] + H.T @ Lb_[r0:r0 + R]
        ps.append(parts[0].sum())
        pb.append(parts[1].sum())
        pg.append(parts[2].sum())
    gV = gV.to(c.dtype)
    gs, gb = torch.stack(ps).sum(), torch.stack(pb).sum()
    if kind_code == 0:
        return gU, gV, gs, gb, rho, kap
    return gU, gV, gs, gb, torch.stack(pg).sum(), (ga if tgt else None), gL, gR
