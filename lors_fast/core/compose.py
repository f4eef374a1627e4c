"""Every loss kind, written once over the pairwise primitives of a backend (docs/DESIGN.md).

With Z = s·U·Vᵀ + b and a target S (identity, low-rank diag(a) + c·L·Rᵀ, or dense), the terms that are
linear in S never need an N×N pass (docs/KERNELS_MATHS.md §5, "low-rank algebra"):

    rs = S·1,  cs = Sᵀ·1,  Σ_ij S_ij Z_ij = s·[Σ_i a_i U_i·V_i + ⟨(cL)ᵀU, RᵀV⟩_F] + b·Σ_ij S_ij

so the losses are, per kind (N = batch size; φ and the primitives in DESIGN.md):

    infonce = (1/2N)[rs·LSEr + cs·LSEc] − (1/N)·Σ S∘Z
    cwcl    = (1/2N)[wr·LSEr + wc·LSEc − Σ S∘Z/(rs+ε)_row − Σ S∘Z/(cs+ε)_col],  wr = rs/(rs+ε), wc = cs/(cs+ε)
    siglip  = (1/N)[Σ softplus(Z) − Σ S∘Z]
    bce, mse = (1/N²) Σ φ(Z, S);  wbce = Σ φ(Z, S) with the ½/(n±+ε) weights inside φ
    kl      = streaming-only (softmax of τS in both directions)

Autograd composes the primitives with these O(N·r·d) terms, so first and second derivatives of every kind
are exact as soon as the primitives' are.
"""

from __future__ import annotations

import torch

from lors_fast.core.kinds import EPS
from lors_fast.core.targets import LowRankTarget


def normalise_target(target):
    """None | ("lowrank", a, c·L, R) | ("dense", S)."""
    if target is None:
        return None
    if isinstance(target, LowRankTarget):
        return ("lowrank", target.diag, target.scaled_left(), target.right)
    return ("dense", target)


def _sums(t, n, like):
    if t is None:
        one = torch.ones(n, dtype=like.dtype, device=like.device)
        return one, one
    if t[0] == "lowrank":
        _, a, lc, r = t
        return a + lc @ r.sum(0), a + r @ lc.sum(0)
    s = t[1]
    return s.sum(1), s.sum(0)


def bilinear(U, V, scale, bias, t):
    """Σ_ij S_ij Z_ij in O(N·r·d) (O(N²·d) for a dense S, without any other N×N tensor)."""
    n = U.shape[0]
    if t is None:
        core = (U * V).sum()
        total = torch.tensor(float(n), dtype=U.dtype, device=U.device)
    elif t[0] == "lowrank":
        _, a, lc, r = t
        core = (a * (U * V).sum(1)).sum() + ((lc.T @ U) * (r.T @ V)).sum()
        total = a.sum() + lc.sum(0) @ r.sum(0)
    else:
        s = t[1]
        core = (U * (s @ V)).sum()
        total = s.sum()
    out = scale * core
    return out if bias is None else out + bias * total


def _row_scaled(t, w, n, like):
    """diag(w)·S as a normalised target."""
    if t is None:
        return ("lowrank", w, torch.zeros(n, 1, dtype=like.dtype, device=like.device),
                torch.zeros(n, 1, dtype=like.dtype, device=like.device))
    if t[0] == "lowrank":
        _, a, lc, r = t
        return ("lowrank", a * w, lc * w[:, None], r)
    return ("dense", t[1] * w[:, None])


def _col_scaled(t, w, n, like):
    """S·diag(w) as a normalised target."""
    if t is None:
        return _row_scaled(None, w, n, like)
    if t[0] == "lowrank":
        _, a, lc, r = t
        return ("lowrank", a * w, lc, r * w[:, None])
    return ("dense", t[1] * w[None, :])


class CastPrimitives:
    """``prims`` fed features and target factors cast to ``dtype`` (16-bit kernels under the fp32 loss
    algebra, :func:`lors_fast.core.functional.amp_inputs`); outputs as ``prims`` returns them (their
    accumulation dtype); gradients flow back through the casts."""

    def __init__(self, prims, dtype: torch.dtype):
        self.prims, self.dtype, self.name = prims, dtype, prims.name

    def _t(self, t):
        if t is None:
            return None
        return (t[0], *(x.to(self.dtype) for x in t[1:]))

    def lse(self, U, V, scale, bias):
        return self.prims.lse(U.to(self.dtype), V.to(self.dtype), scale, bias)

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        return self.prims.pairsum(kind, U.to(self.dtype), V.to(self.dtype), scale, bias, self._t(target),
                                  npos=npos, nneg=nneg)

    def count_pos(self, t, n):
        return self.prims.count_pos(self._t(t), n)


def compose_loss(prims, U, V, scale, target, kind, bias=None, *, kl_temperature=10.0, fallback=None,
                 prim_dtype=None):
    """The loss ``kind`` over ``prims`` (a backend's primitives). ``scale``/``bias``: 0-dim tensors (bias may
    be None). ``fallback``: primitives used for what ``prims`` lacks (``kl``). ``prim_dtype``: the dtype the
    primitives read (None: U's), the O(N·r·d) terms stay in U's dtype."""
    n = U.shape[0]
    if prim_dtype is not None and prim_dtype != U.dtype:
        prims = CastPrimitives(prims, prim_dtype)
    t = normalise_target(target)
    if kind in ("infonce", "cwcl"):
        lse_r, lse_c = prims.lse(U, V, scale, bias)
        rs, cs = _sums(t, n, U)
        if kind == "infonce":
            return ((rs * lse_r).sum() + (cs * lse_c).sum()) / (2 * n) - bilinear(U, V, scale, bias, t) / n
        wr, wc = 1.0 / (rs + EPS), 1.0 / (cs + EPS)
        pos = (rs * wr * lse_r).sum() + (cs * wc * lse_c).sum()
        neg = bilinear(U, V, scale, bias, _row_scaled(t, wr, n, U)) + \
            bilinear(U, V, scale, bias, _col_scaled(t, wc, n, U))
        return (pos - neg) / (2 * n)
    if kind == "siglip":
        return (prims.pairsum("softplus", U, V, scale, bias, None) - bilinear(U, V, scale, bias, t)) / n
    if kind in ("bce", "mse"):
        return prims.pairsum(kind, U, V, scale, bias, t) / (n * n)
    if kind == "wbce":
        npos = prims.count_pos(t, n)
        nneg = torch.tensor(float(n * n), dtype=torch.float64) - npos
        return prims.pairsum("wbce", U, V, scale, bias, t, npos=npos, nneg=nneg)
    if kind == "kl":
        p = prims if hasattr(prims, "kl") else fallback
        return p.kl(U, V, scale, bias, t, n, kl_temperature)
    raise ValueError(f"unknown loss kind {kind!r}")
