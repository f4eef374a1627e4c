"""The fused Triton primitives as PyTorch custom operators, and `TritonPrimitives`, their public face.

Each primitive is a chain of three ops (`torch.library.custom_op`, namespace ``lors_fast``):

    triton_lse      → (row LSE, column LSE)      its autograd calls triton_lse_bwd
    triton_lse_bwd  → (∂U, ∂V, ∂s, ∂b)           its autograd calls triton_lse_dbl (hand-written, fused)
    triton_lse_dbl  → second-order terms          (no third order)

and likewise ``triton_pairsum`` / ``_bwd`` / ``_dbl`` for Σ φ(Z, S), plus ``triton_count_pos``. Because the
backward is itself an op with an autograd formula, ``create_graph=True`` gives exact second derivatives; and
because every kernel launch sits inside an op with a shape-only ("fake") implementation, ``torch.compile``
traces a loss built on them **without graph breaks** (``fullgraph=True`` works): the compiled graph calls the
ops as opaque kernels. (Second derivatives through a compiled region remain a torch.compile limitation:
"aot_autograd does not currently support double backward"; eager code gets them.)

Absent optional inputs (no bias, identity target) come back from the backward ops as 0-dim or empty
placeholders, mapped to None here: custom ops cannot return None.
"""

# ruff: noqa: UP045 — torch.library.custom_op infers each op's schema from these annotations, so they stay
# real objects (no `from __future__ import annotations`) spelled Optional[Tensor], which every supported torch
# (>= 2.4) parses.
from typing import Optional

import torch
from torch import Tensor

from lors_fast.core.kinds import PAIR_PHIS, pair_kind_error
from lors_fast.ops import triton_backend as tb

__all__ = ["TritonPrimitives"]


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: Tensor, ref: Tensor) -> Tensor:
    return x.to(ref.dtype).reshape(ref.shape)


def _zeros_if_none(g, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _placeholder(ref: Tensor) -> Tensor:
    """What a backward op returns for an absent optional input (a fresh one each time: returns may not alias)."""
    return ref.new_zeros(0)


def _tgt(a, Lc, R):
    return None if a is None else ("lowrank", a, Lc, R)


def _new(x: Tensor, shape=None, dtype=None) -> Tensor:
    """A fresh contiguous tensor shaped like x (fake implementations: what the real ops return)."""
    return x.new_empty(x.shape if shape is None else shape, dtype=dtype or x.dtype)


# ----------------------------------------------------------------------------------------------- LSE
@torch.library.custom_op("lors_fast::triton_lse", mutates_args=())
def _lse_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], prec: str) -> tuple[Tensor, Tensor]:
    return tb._lse_forward(tb._Ctx(U, V, scale, bias, prec))


@_lse_op.register_fake
def _(U, V, scale, bias, prec):
    return _new(U, (U.shape[0],), _acc(U)), _new(U, (V.shape[0],), _acc(U))


@torch.library.custom_op("lors_fast::triton_lse_bwd", mutates_args=())
def _lse_bwd_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], lr: Tensor, lc: Tensor, glr: Tensor,
                glc: Tensor, prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dU, dV, ds, db = tb._lse_backward(tb._Ctx(U, V, scale, bias, prec), lr, lc, glr, glc)
    return dU, dV.to(V.dtype), _like(ds, scale), _like(db, scale if bias is None else bias)


@_lse_bwd_op.register_fake
def _(U, V, scale, bias, lr, lc, glr, glc, prec):
    return _new(U), _new(V), _new(scale), _new(scale if bias is None else bias)


@torch.library.custom_op("lors_fast::triton_lse_dbl", mutates_args=())
def _lse_dbl_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], lr: Tensor, lc: Tensor, glr: Tensor,
                glc: Tensor, Ub: Tensor, Vb: Tensor, sbar: Tensor, bbar: Optional[Tensor],
                prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    c = tb._Ctx(U, V, scale, bias, prec)
    gU, gV, gs, gb, rho, kap = tb._lse_double(c, lr, lc, glr, glc, Ub, Vb, sbar, bbar)
    return (gU, gV.to(V.dtype), _like(gs, scale), _like(gb, scale if bias is None else bias), rho.to(glr.dtype),
            kap.to(glc.dtype))


@_lse_dbl_op.register_fake
def _(U, V, scale, bias, lr, lc, glr, glc, Ub, Vb, sbar, bbar, prec):
    return _new(U), _new(V), _new(scale), _new(scale if bias is None else bias), _new(glr), _new(glc)


def _lse_setup(ctx, inputs, output):
    U, V, scale, bias, prec = inputs
    ctx.save_for_backward(U, V, scale, bias, *output)
    ctx.prec = prec


def _lse_grad(ctx, glr, glc):
    U, V, scale, bias, lr, lc = ctx.saved_tensors
    glr, glc = _zeros_if_none(glr, lr), _zeros_if_none(glc, lc)
    dU, dV, ds, db = _lse_bwd_op(U, V, scale, bias, lr.detach(), lc.detach(), glr, glc, ctx.prec)
    return dU, dV, ds, (db if bias is not None else None), None


def _lse_bwd_setup(ctx, inputs, output):
    U, V, scale, bias, lr, lc, glr, glc, prec = inputs
    ctx.save_for_backward(U, V, scale, bias, lr, lc, glr, glc)
    ctx.prec = prec


def _lse_bwd_grad(ctx, Ub, Vb, sbar, bbar):
    U, V, scale, bias, lr, lc, glr, glc = ctx.saved_tensors
    Ub, Vb, sbar = _zeros_if_none(Ub, U), _zeros_if_none(Vb, V), _zeros_if_none(sbar, scale)
    bbar = None if bias is None else _zeros_if_none(bbar, bias)
    gU, gV, gs, gb, rho, kap = _lse_dbl_op(U, V, scale, bias, lr, lc, glr, glc, Ub, Vb, sbar, bbar, ctx.prec)
    return gU, gV, gs, (gb if bias is not None else None), None, None, rho, kap, None


_lse_op.register_autograd(_lse_grad, setup_context=_lse_setup)
_lse_bwd_op.register_autograd(_lse_bwd_grad, setup_context=_lse_bwd_setup)


# ------------------------------------------------------------------------------------------ pairsum
@torch.library.custom_op("lors_fast::triton_pairsum", mutates_args=())
def _pair_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], a: Optional[Tensor], Lc: Optional[Tensor],
             R: Optional[Tensor], w: Tensor, kind: str, prec: str) -> Tensor:
    return tb._pair_forward(tb._Ctx(U, V, scale, bias, prec), kind, _tgt(a, Lc, R), w)


@_pair_op.register_fake
def _(U, V, scale, bias, a, Lc, R, w, kind, prec):
    return _new(U, (), _acc(U))


@torch.library.custom_op("lors_fast::triton_pairsum_bwd", mutates_args=())
def _pair_bwd_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                 Lc: Optional[Tensor], R: Optional[Tensor], g: Tensor, w: Tensor, kind: str,
                 prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    c = tb._Ctx(U, V, scale, bias, prec)
    dU, dV, ds, db, da, dL, dR = tb._pair_backward(c, kind, _tgt(a, Lc, R), w, g)
    if a is None:
        da, dL, dR = _placeholder(U), _placeholder(U), _placeholder(U)
    else:
        da, dL, dR = _like(da, a), _like(dL, Lc), _like(dR, R)
    return dU, dV.to(V.dtype), _like(ds, scale), _like(db, scale if bias is None else bias), da, dL, dR


@_pair_bwd_op.register_fake
def _(U, V, scale, bias, a, Lc, R, g, w, kind, prec):
    low = (_new(a), _new(Lc), _new(R)) if a is not None else (_new(U, (0,)),) * 3
    return (_new(U), _new(V), _new(scale), _new(scale if bias is None else bias)) + low


@torch.library.custom_op("lors_fast::triton_pairsum_dbl", mutates_args=())
def _pair_dbl_op(U: Tensor, V: Tensor, scale: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                 Lc: Optional[Tensor], R: Optional[Tensor], g: Tensor, w: Tensor, Ub: Tensor, Vb: Tensor,
                 sbar: Tensor, bbar: Optional[Tensor], abar: Optional[Tensor], Lbar: Optional[Tensor],
                 Rbar: Optional[Tensor], kind: str,
                 prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    c = tb._Ctx(U, V, scale, bias, prec)
    gU, gV, gs, gb, gg, ga, gL, gR = tb._pair_double(c, kind, _tgt(a, Lc, R), w, g, Ub, Vb, sbar, bbar, abar,
                                                     Lbar, Rbar)
    if a is None:
        ga, gL, gR = _placeholder(U), _placeholder(U), _placeholder(U)
    else:
        ga, gL, gR = _like(ga, a), _like(gL, Lc), _like(gR, R)
    return (gU, gV.to(V.dtype), _like(gs, scale), _like(gb, scale if bias is None else bias), _like(gg, g),
            ga, gL, gR)


@_pair_dbl_op.register_fake
def _(U, V, scale, bias, a, Lc, R, g, w, Ub, Vb, sbar, bbar, abar, Lbar, Rbar, kind, prec):
    low = (_new(a), _new(Lc), _new(R)) if a is not None else (_new(U, (0,)),) * 3
    return (_new(U), _new(V), _new(scale), _new(scale if bias is None else bias), _new(g)) + low


def _pair_setup(ctx, inputs, output):
    U, V, scale, bias, a, Lc, R, w, kind, prec = inputs
    ctx.save_for_backward(U, V, scale, bias, a, Lc, R, w)
    ctx.kind, ctx.prec = kind, prec


def _pair_grad(ctx, g):
    U, V, scale, bias, a, Lc, R, w = ctx.saved_tensors
    dU, dV, ds, db, da, dL, dR = _pair_bwd_op(U, V, scale, bias, a, Lc, R, g, w, ctx.kind, ctx.prec)
    if a is None:
        da = dL = dR = None
    return dU, dV, ds, (db if bias is not None else None), da, dL, dR, None, None, None


def _pair_bwd_setup(ctx, inputs, output):
    U, V, scale, bias, a, Lc, R, g, w, kind, prec = inputs
    ctx.save_for_backward(U, V, scale, bias, a, Lc, R, g, w)
    ctx.kind, ctx.prec = kind, prec


def _pair_bwd_grad(ctx, Ub, Vb, sbar, bbar, abar, Lbar, Rbar):
    U, V, scale, bias, a, Lc, R, g, w = ctx.saved_tensors
    Ub, Vb, sbar = _zeros_if_none(Ub, U), _zeros_if_none(Vb, V), _zeros_if_none(sbar, scale)
    bbar = None if bias is None else _zeros_if_none(bbar, bias)
    if a is None:
        abar = Lbar = Rbar = None
    gU, gV, gs, gb, gg, ga, gL, gR = _pair_dbl_op(U, V, scale, bias, a, Lc, R, g, w, Ub, Vb, sbar, bbar, abar,
                                                  Lbar, Rbar, ctx.kind, ctx.prec)
    if a is None:
        ga = gL = gR = None
    return gU, gV, gs, (gb if bias is not None else None), ga, gL, gR, gg, None, None, None


_pair_op.register_autograd(_pair_grad, setup_context=_pair_setup)
_pair_bwd_op.register_autograd(_pair_bwd_grad, setup_context=_pair_bwd_setup)


@torch.library.custom_op("lors_fast::triton_count_pos", mutates_args=())
def _count_pos_op(a: Tensor, Lc: Tensor, R: Tensor, n: int) -> Tensor:
    return tb._count_pos(a, Lc, R, n)


@_count_pos_op.register_fake
def _(a, Lc, R, n):
    return _new(a, (), torch.float64)


def _weights(kind, npos, nneg, device, acc) -> Tensor:
    """wbce's class weights (0.5/(npos + 1e-6), 0.5/(nneg + 1e-6)) as a device tensor (float64 arithmetic, then
    the accumulation dtype); a dummy for the other kinds. Tensor counts stay on the device: no host sync."""
    if kind != "wbce":
        return torch.zeros(2, dtype=acc, device=device)

    def f64(x):
        if isinstance(x, Tensor):
            return x.detach().to(device=device, dtype=torch.float64).reshape(())
        return torch.tensor(float(x), dtype=torch.float64, device=device)

    return torch.stack([0.5 / (f64(npos) + 1e-6), 0.5 / (f64(nneg) + 1e-6)]).to(acc)


# ------------------------------------------------------------------------------------------ public
class TritonPrimitives:
    """Fused Triton primitives (maths in triton_backend / triton_kernels). ``fp32_precision``: ``tl.dot`` input
    precision for fp32 inputs ("ieee" | "tf32" | "tf32x3"; None → the ``fp32_precision`` of :mod:`lors_fast.ops.options`)."""

    name = "triton"

    def __init__(self, fp32_precision: str | None = None):
        if fp32_precision not in (None, "ieee", "tf32", "tf32x3"):
            raise ValueError(f"fp32_precision must be 'ieee', 'tf32', 'tf32x3' or None, got {fp32_precision!r}")
        self.fp32_precision = fp32_precision

    def _prec(self):
        from lors_fast.ops.options import current

        return self.fp32_precision or current().fp32_precision

    @staticmethod
    def _scalar_arg(x, like):
        if x is not None and not isinstance(x, Tensor):
            x = torch.tensor(float(x), dtype=torch.float32, device=like.device)
        return None if x is None else x.reshape(())

    def lse(self, U, V, scale, bias=None):
        """Row and column log-sum-exps of Z = scale·U·Vᵀ (+ bias) by the fused kernels, differentiable to
        second order."""
        tb._check_device(U, V)
        return _lse_op(U, V, self._scalar_arg(scale, U), self._scalar_arg(bias, U), self._prec())

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        """Σ_ij φ_kind(Z_ij, T_ij) over Z = scale·U·Vᵀ (+ bias) by the fused kernels (``npos``/``nneg``: the
        wbce weights)."""
        if kind not in PAIR_PHIS:
            raise pair_kind_error(kind)
        if kind == "softplus":
            target = None
        if target is not None and target[0] == "dense":
            return _dense_pairsum(kind, U, V, scale, bias, target, npos, nneg)
        tb._check_device(U, V)
        if target is not None and target[0] != "lowrank":
            raise ValueError(f"target must be None, ('lowrank', a, Lc, R) or ('dense', S), got {target[0]!r}")
        if (target is not None or kind != "softplus") and U.shape[0] != V.shape[0]:
            raise ValueError(f"pairsum {kind!r} needs M == N, got {U.shape[0]} and {V.shape[0]}")
        if kind == "wbce" and (npos is None or nneg is None):
            n = U.shape[0]
            npos = self.count_pos(target, n)
            nneg = n * n - npos
        w = _weights(kind, npos, nneg, U.device, _acc(U))
        a = Lc = R = None
        if target is not None:
            _, a, Lc, R = target
        return _pair_op(U, V, self._scalar_arg(scale, U), self._scalar_arg(bias, U), a, Lc, R, w, kind,
                        self._prec())

    def count_pos(self, target, n):
        """#{S_ij > 0.5} as a float64 0-dim tensor (no gradient)."""
        if target is None:
            return torch.tensor(float(n), dtype=torch.float64)
        if target[0] == "dense":
            with torch.no_grad():
                return (target[1] > 0.5).sum().to(torch.float64)
        _, a, lc, r_ = target
        tb._check_device(a, lc, r_)
        with torch.no_grad():
            return _count_pos_op(a.detach(), lc.detach(), r_.detach(), int(n))


@torch.compiler.disable
def _dense_pairsum(kind, U, V, scale, bias, target, npos, nneg):
    """Dense targets are not fused: the chunked torch backend (O(N²) memory anyway, because of S itself)."""
    from lors_fast.core.streaming import StreamingPrimitives

    return StreamingPrimitives().pairsum(kind, U, V, scale, bias, target, npos=npos, nneg=nneg)
