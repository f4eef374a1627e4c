"""The pair-sum primitive of the streaming path (:mod:`lors_fast.core.streaming`).

Σ_ij φ(Z_ij, S_ij), Z = s·U·Vᵀ + b, the target tile S[k, :] built per chunk (:mod:`.tiles`):

- forward (``_PairSum``): also computes every first derivative from the closed forms G = ∂φ/∂Z,
  H = ∂φ/∂S (docs/KERNELS_MATHS.md) in the same pass over the tiles (``_pair_first_grads``), so the backward
  (``_PairSumGrad``) only scales them by the incoming cotangent (one pass in all instead of a forward pass
  plus a recomputing one);
- double backward: closed form (``_pair_hvp``, from φ_ZZ, φ_ZS, φ_SS per kind, ``_phi_second``): with
  T = ⟨G, Wg⟩ + ⟨H, Wh⟩, δZ = φ_ZZ·Wg + φ_ZS·Wh, δS = φ_ZS·Wg + φ_SS·Wh, then back through Z and S; or,
  with ``lors_fast.core.streaming.pairsum.CLOSED_FORM_HVP = False``, autograd of the closed-form first derivatives
  (``_pair_grad_terms``/``_phi_derivs``) over each recomputed chunk. Both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from lors_fast.core.kinds import EPS, pair_kind_error, softplus, wbce_weights
from lors_fast.core.streaming.chunked import _add_grads
from lors_fast.core.streaming.tiles import _phi_derivs, _phi_fast, _s_tile, _z_tile

#: double backward: closed-form second derivatives (True) or autograd of _pair_grad_terms (False); a
#: debugging / cross-checking switch read at each double backward (tests set it with monkeypatch)
CLOSED_FORM_HVP = True


# ----------------------------------------------------------------------------------------------------
# pairsum: closed-form first derivatives computed in the forward pass
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PairSpec:
    kind: str
    tkind: str  # "identity" | "lowrank" | "dense"
    n_rows: int
    n_cols: int
    chunk: int
    wpos: float | None
    wneg: float | None
    has_bias: bool


def _pair_chunks(spec: _PairSpec, chunk: int | None = None):
    step = chunk or spec.chunk
    for k0 in range(0, spec.n_rows, step):
        yield k0, min(k0 + step, spec.n_rows)


def _unpack(spec: _PairSpec, inputs):
    """inputs = (U, V, scale, bias?, *target tensors) -> (U, V, s, b, target tensors)."""
    U, V, s = inputs[:3]
    b = inputs[3] if spec.has_bias else None
    return U, V, s, b, tuple(inputs[4 if spec.has_bias else 3:])


def _target_rows(spec: _PairSpec, t, k0, k1):
    """(row slices, shared tensors) of the target tensors for rows k0:k1."""
    if spec.tkind == "lowrank":
        a, lc, r = t
        return (a[k0:k1], lc[k0:k1]), (r,)
    if spec.tkind == "dense":
        return (t[0][k0:k1],), ()
    return (), ()


def _pair_first_grads(spec: _PairSpec, inputs, need):
    """No-grad pass: (Σφ, gradients of Σφ w.r.t. each input that ``need`` flags), O(chunk·N) memory."""
    U, V, s, b, t = _unpack(spec, inputs)
    acc = [torch.zeros_like(x) if w else None for x, w in zip(inputs, need)]
    n_in = len(inputs)
    i_b = 3 if spec.has_bias else None
    i_t = 4 if spec.has_bias else 3
    need_z = need[0] or need[1] or need[2] or (i_b is not None and need[i_b])
    need_h = any(need[i_t:])
    sd = s.detach()  # a tensor factor: no host read
    total = None
    for k0, k1 in _pair_chunks(spec):
        Uk = U[k0:k1]
        # Z = (s·U_k)·Vᵀ + b in one GEMM call (scaling the chunk's rows costs O(chunk·d), not O(chunk·N))
        Z = torch.mm(Uk * s, V.T) if b is None else torch.addmm(b, Uk * s, V.T)
        if spec.kind == "softplus":
            S = None
        else:
            rows, shared = _target_rows(spec, t, k0, k1)
            S = _s_tile(k0, k1, spec.n_cols, spec.tkind, rows, shared, Z)
        phi, G, gm, H, hm = _phi_fast(spec.kind, Z, S, spec.wpos, spec.wneg, need_z, need_h)
        total = phi if total is None else total + phi
        if G is not None:
            GV = torch.mm(G, V)
            if need[0]:
                acc[0][k0:k1] = GV * (gm * sd)
            if need[1]:
                acc[1].addmm_(G.T, Uk * (gm * sd))
            if need[2]:
                acc[2] += gm * torch.dot(GV.reshape(-1), Uk.reshape(-1))
            if i_b is not None and need[i_b]:
                acc[i_b] += gm * G.sum()
        if H is not None and spec.tkind == "lowrank":
            a, lc, r = t
            if need[i_t]:
                acc[i_t][k0:k1] = hm * H.diagonal(offset=k0)
            if need[i_t + 1]:
                acc[i_t + 1][k0:k1] = torch.mm(H, r) * hm
            if need[i_t + 2]:
                acc[i_t + 2].addmm_(H.T, lc[k0:k1], alpha=hm)
        elif H is not None and spec.tkind == "dense" and need[i_t]:
            acc[i_t][k0:k1] = H * hm
        del Z, S, G, H  # free this chunk's tiles before the next chunk allocates its own
    assert len(acc) == n_in
    return total, acc


def _pair_grad_terms(spec: _PairSpec, k0, k1, leaves):
    """Gradients of Σφ over rows k0:k1 w.r.t. (U[k0:k1], V, s, b?, a[k0:k1], lc[k0:k1], R | S[k0:k1]),
    as differentiable expressions of the leaves (for the double backward)."""
    Uk, V, s, b, t = _unpack(spec, leaves)
    Z = _z_tile(Uk, V, s, b)
    if spec.kind == "softplus":
        S = None
    else:
        rows, shared = ((t[0], t[1]), (t[2],)) if spec.tkind == "lowrank" else (t, ())  # already sliced
        S = _s_tile(k0, k1, spec.n_cols, spec.tkind, rows, shared, Z)
    G, H = _phi_derivs(spec.kind, Z, S, spec.wpos, spec.wneg)
    GV = G @ V
    out = [s * GV, s * (G.T @ Uk), (GV * Uk).sum()]
    if b is not None:
        out.append(G.sum())
    if spec.tkind == "lowrank":
        a_k, lc_k, r = t
        out += [H.diagonal(offset=k0), H @ r, H.T @ lc_k]
    elif spec.tkind == "dense":
        out.append(H)
    return out


def _phi_second(kind, Z, S, wpos, wneg):
    """No-grad (G, H, φ_ZZ, φ_ZS, φ_SS) of one tile (H, φ_ZS, φ_SS are None for softplus; φ_SS may be a float)."""
    p = torch.sigmoid(Z)
    d1 = p * (1 - p)  # σ'
    if kind == "softplus":
        return p, None, d1, None, None
    if kind == "mse":
        e = p - S
        d2 = d1 * (1 - 2 * p)  # σ''
        return 2 * e * d1, -2 * e, 2 * d1 * d1 + 2 * e * d2, -2 * d1, 2.0
    if kind == "bce":
        sp, sn = softplus(Z), softplus(-Z)
        cn, cp = (sn <= 100).to(Z.dtype), (sp <= 100).to(Z.dtype)
        G = S * (p - 1) * cn + (1 - S) * p * cp
        H = torch.clamp(sn, max=100.0) - torch.clamp(sp, max=100.0)
        return G, H, d1 * (S * cn + (1 - S) * cp), -(1 - p) * cn - p * cp, 0.0
    if kind == "wbce":
        W = wbce_weights(S, wpos, wneg)
        d2 = d1 * (1 - 2 * p)
        ia, ib = 1 / (p + EPS), 1 / (1 - p + EPS)
        G = W * d1 * ((1 - S) * ib - S * ia)
        H = W * (torch.log(1 - p + EPS) - torch.log(p + EPS))
        fzz = W * (-S * (d2 - d1 * d1 * ia) * ia + (1 - S) * (d2 + d1 * d1 * ib) * ib)
        return G, H, fzz, -W * d1 * (ia + ib), 0.0
    raise pair_kind_error(kind)


def _pair_hvp(spec: _PairSpec, gout, inputs, cot, need, need_in):
    """Closed-form double backward of pairsum: ∂/∂inputs of gout·Σ_i ⟨cot_i, ∇_i Σφ⟩ (docs/KERNELS_MATHS.md §8).

    With T = ⟨G, Wg⟩ + ⟨H, Wh⟩, Wg = s(Ū·Vᵀ + U·V̄ᵀ) + s̄·UVᵀ + b̄ and Wh = diag(ā) + L̄·Rᵀ + lc·R̄ᵀ (+ S̄):
    δZ = φ_ZZ·Wg + φ_ZS·Wh, δS = φ_ZS·Wg + φ_SS·Wh, then back through Z = s·UVᵀ + b and S."""
    U, V, s, b, t = _unpack(spec, inputs)
    i_b = 3 if spec.has_bias else None
    i_t = 4 if spec.has_bias else 3

    def c(i):
        return cot[i] if (i is not None and i < len(cot) and cot[i] is not None and need[i]) else None

    cU, cV, cs, cb = c(0), c(1), c(2), c(i_b)
    acc = [torch.zeros_like(x) if w else None for x, w in zip(inputs, need_in)]
    sd = s.detach()
    for k0, k1 in _pair_chunks(spec):
        Uk = U[k0:k1]
        P = Uk @ V.T
        Z = P * sd if b is None else P * sd + b
        S = None
        if spec.kind != "softplus":
            rows, shared = _target_rows(spec, t, k0, k1)
            S = _s_tile(k0, k1, spec.n_cols, spec.tkind, rows, shared, Z)
        G, H, fzz, fzs, fss = _phi_second(spec.kind, Z, S, spec.wpos, spec.wneg)
        # cotangent of G
        Wg = torch.zeros_like(Z)
        M = None  # Ū·Vᵀ + U·V̄ᵀ
        if cU is not None:
            M = cU[k0:k1] @ V.T
        if cV is not None:
            M = Uk @ cV.T if M is None else M.addmm_(Uk, cV.T)
        if M is not None:
            Wg.add_(M, alpha=1.0).mul_(sd)
        if cs is not None:
            Wg.add_(P * cs)
        if cb is not None:
            Wg.add_(cb)
        # cotangent of H
        Wh = None
        if H is not None and spec.tkind == "lowrank":
            a, lc, r = t
            ca, cl, cr = c(i_t), c(i_t + 1), c(i_t + 2)
            Wh = torch.zeros_like(Z)
            if ca is not None:
                Wh.diagonal(offset=k0).add_(ca[k0:k1])
            if cl is not None:
                Wh.addmm_(cl[k0:k1], r.T)
            if cr is not None:
                Wh.addmm_(lc[k0:k1], cr.T)
        elif H is not None and spec.tkind == "dense" and c(i_t) is not None:
            Wh = cot[i_t][k0:k1]
        dZ = fzz * Wg
        if Wh is not None:
            dZ = dZ + fzs * Wh
        # back through Z = s·U·Vᵀ + b (and the explicit U, V, s in Wg)
        if need_in[0]:
            g = dZ @ V * sd
            if cV is not None:
                g += (G @ cV) * sd
            if cs is not None:
                g += (G @ V) * cs
            acc[0][k0:k1] += g
        if need_in[1]:
            acc[1].addmm_(dZ.T, Uk * sd)
            if cU is not None:
                acc[1].addmm_(G.T, cU[k0:k1] * sd)
            if cs is not None:
                acc[1].add_((G.T @ Uk) * cs)
        if need_in[2]:
            acc[2] += (dZ * P).sum() + ((G * M).sum() if M is not None else 0.0)
        if i_b is not None and need_in[i_b]:
            acc[i_b] += dZ.sum()
        # back through S (and the explicit lc, R in Wh)
        if S is not None and spec.tkind != "identity" and any(need_in[i_t:]):
            dS = fzs * Wg
            if Wh is not None and not (isinstance(fss, float) and fss == 0.0):
                dS = dS + fss * Wh
            if spec.tkind == "dense":
                acc[i_t][k0:k1] += dS
            else:
                a, lc, r = t
                ca, cl, cr = c(i_t), c(i_t + 1), c(i_t + 2)
                if need_in[i_t]:
                    acc[i_t][k0:k1] += dS.diagonal(offset=k0)
                if need_in[i_t + 1]:
                    g = dS @ r
                    if cr is not None:
                        g += H @ cr
                    acc[i_t + 1][k0:k1] += g
                if need_in[i_t + 2]:
                    acc[i_t + 2].addmm_(dS.T, lc[k0:k1])
                    if cl is not None:
                        acc[i_t + 2].addmm_(H.T, cl[k0:k1])
    return [None if x is None else x * gout for x in acc]


class _PairSum(torch.autograd.Function):
    """Σ_ij φ(Z_ij, S_ij). Forward also computes the first derivatives (one pass instead of two) when a
    backward can follow; backward scales them by the incoming cotangent through :class:`_PairSumGrad`,
    whose own backward (the double backward) recomputes each chunk and differentiates the closed-form G, H."""

    @staticmethod
    def forward(ctx, spec: _PairSpec, want_grad: bool, *inputs):
        need = tuple(bool(w) and want_grad for w in ctx.needs_input_grad[2:])
        total, grads = _pair_first_grads(spec, inputs, need)
        ctx.spec, ctx.need, ctx.grads = spec, need, grads
        ctx.save_for_backward(*inputs)
        return total

    @staticmethod
    def backward(ctx, gout):
        grads = _PairSumGrad.apply(ctx.spec, ctx.need, ctx.grads, gout, *ctx.saved_tensors)
        return (None, None, *grads)


class _PairSumGrad(torch.autograd.Function):
    """(cotangent c, inputs) -> c·∇Σφ, with ∇Σφ precomputed by the forward of :class:`_PairSum`."""

    @staticmethod
    def forward(ctx, spec: _PairSpec, need: tuple, grads: list, gout, *inputs):
        ctx.spec, ctx.need = spec, need
        ctx.save_for_backward(gout, *inputs)
        ctx.grads = grads
        return tuple(None if g is None else g * gout for g in grads)

    @staticmethod
    @once_differentiable
    def backward(ctx, *cot):
        spec, need = ctx.spec, ctx.need
        gout, *inputs = ctx.saved_tensors
        need_in = ctx.needs_input_grad[4:]
        need_go = ctx.needs_input_grad[3]
        # ∂/∂gout of ⟨cot, gout·∇Σφ⟩ is ⟨cot, ∇Σφ⟩, known without a pass
        d_go = None
        if need_go:
            d_go = sum(((c * g).sum() for c, g in zip(cot, ctx.grads) if c is not None and g is not None),
                       torch.zeros((), dtype=gout.dtype, device=gout.device))
        acc = [torch.zeros_like(x) if w else None for x, w in zip(inputs, need_in)]
        if not any(need_in):
            return (None, None, None, d_go, *acc)
        if CLOSED_FORM_HVP:
            with torch.no_grad():
                return (None, None, None, d_go, *_pair_hvp(spec, gout, inputs, cot, need, need_in))
        row_pos = {0} | ({len(inputs) - 3, len(inputs) - 2} if spec.tkind == "lowrank" else set())
        if spec.tkind == "dense":
            row_pos.add(len(inputs) - 1)
        # autograd keeps ~15 tile-sized intermediates per chunk here (fine at the default 4 MiB tiles)
        for k0, k1 in _pair_chunks(spec):
            leaves = [(x[k0:k1] if i in row_pos else x).detach().requires_grad_(need_in[i])
                      for i, x in enumerate(inputs)]
            with torch.enable_grad():
                terms = _pair_grad_terms(spec, k0, k1, leaves)
                total = None
                for i, (g, c) in enumerate(zip(terms, cot)):
                    if c is None or not need[i]:
                        continue
                    term = (g * (c[k0:k1] if i in row_pos else c)).sum()
                    total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    continue
                d = torch.autograd.grad(total * gout, [x for x, w in zip(leaves, need_in) if w], allow_unused=True)
            _add_grads(acc, d, need_in, row_pos, k0, k1)
        return (None, None, None, d_go, *acc)
