"""Tiles and the elementwise φ maths of the streaming path (:mod:`lors_fast.core.streaming`).

- Tiles: rows k0:k1 of Z = s·U·Vᵀ + b (``_z_tile``) and of the target S (``_s_tile``), S built per chunk
  from the factors (a, c·L, R) as diag(a) + (c·L)·Rᵀ, read from a dense S, or the identity.
- φ(Z, S) per pairwise kind (bce, wbce, mse, softplus; DESIGN.md): its definition in plain differentiable
  torch ops (:func:`lors_fast.core.kinds.phi`), its closed-form first derivatives G = ∂φ/∂Z, H = ∂φ/∂S in differentiable ops
  (``_phi_derivs``, whose autograd gives exact second derivatives), and a no-grad, in-place, few-pass
  evaluation of (Σφ, G, H) of one tile (``_phi_fast``). wbce's weights are ½/(n_pos+ε) where S > 0.5 and
  ½/(n_neg+ε) elsewhere (:func:`lors_fast.core.kinds.wbce_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lors_fast.core.kinds import EPS, LOG_CLAMP, pair_kind_error, softplus, wbce_weights


# ----------------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------------
def _z_tile(Uk, V, s, b):
    Z = (Uk @ V.T) * s
    return Z if b is None else Z + b


def _s_tile(k0, k1, n, target, row_parts, shared_parts, like):
    """Rows k0:k1 of S. ``row_parts``/``shared_parts`` are the chunk's slices of the target tensors."""
    if target == "dense":
        return row_parts[0]
    if target == "identity":
        S = torch.zeros(k1 - k0, n, dtype=like.dtype, device=like.device)
        S.diagonal(offset=k0).fill_(1.0)
        return S
    a_k, lc_k = row_parts
    (r,) = shared_parts
    S = lc_k @ r.T
    S.diagonal(offset=k0).add_(a_k)  # the global diagonal (i, i) of rows k0:k1 (mm saves no output)
    return S


def _target_parts(target):
    """(kind, row tensors, shared tensors) of a normalised target."""
    if target is None:
        return "identity", (), ()
    if target[0] == "lowrank":
        _, a, lc, r = target
        return "lowrank", (a, lc), (r,)
    return "dense", (target[1],), ()


def _phi_derivs(kind, Z, S, wpos=None, wneg=None):
    """(G, H) = (∂φ/∂Z, ∂φ/∂S) in closed form, written in differentiable torch ops (H is None for softplus).

    Autograd of these expressions gives the second derivatives exactly (the double backward of pairsum)."""
    p = torch.sigmoid(Z)
    if kind == "bce":
        sp, sn = softplus(Z), softplus(-Z)  # torch's clamp(max=100) passes the gradient where x <= 100
        G = S * (p - 1) * (sn <= LOG_CLAMP).to(Z.dtype) + (1 - S) * p * (sp <= LOG_CLAMP).to(Z.dtype)
        return G, torch.clamp(sn, max=LOG_CLAMP) - torch.clamp(sp, max=LOG_CLAMP)
    if kind == "wbce":
        W = wbce_weights(S, wpos, wneg)
        q = p * (1 - p)
        G = W * q * ((1 - S) / (1 - p + EPS) - S / (p + EPS))
        return G, W * (torch.log(1 - p + EPS) - torch.log(p + EPS))
    if kind == "mse":
        e = p - S
        return 2 * e * p * (1 - p), -2 * e
    if kind == "softplus":
        return p, None
    raise pair_kind_error(kind)


def _phi_fast(kind, Z, S, wpos, wneg, need_g: bool, need_h: bool):
    """No-grad (Σφ, G, H) of one tile, in as few passes as possible; ``Z`` is consumed (overwritten).

    Returns (phi_sum, G, g_mult, H, h_mult): the true derivatives are g_mult·G and h_mult·H (scalar factors
    are applied to the small products G·V, H·R instead of to the tile). G/H are None when not needed."""
    G = H = None
    if kind == "softplus":
        lsn = F.logsigmoid(-Z)  # softplus(Z) = −log σ(−Z)
        total = -lsn.sum()
        if need_g:
            G = Z.sigmoid_()
        return total, G, 1.0, None, 1.0
    if kind == "bce":
        lsp = F.logsigmoid(Z)  # −softplus(−Z)
        lsn = F.logsigmoid(Z.neg())  # −softplus(Z)
        zmin, zmax = torch.aminmax(Z)
        clamped = bool(zmax > 90.0) or bool(zmin < -90.0)  # softplus(±Z) ≥ 100 needs |Z| > 100
        if clamped:
            cn, cp = (lsp >= -LOG_CLAMP), (lsn >= -LOG_CLAMP)
            lsp.clamp_(min=-LOG_CLAMP)
            lsn.clamp_(min=-LOG_CLAMP)
        Hb = lsn.sub_(lsp)  # H = min(sp(−Z),100) − min(sp(Z),100) = clamp(lsn) − clamp(lsp)
        # φ = S·(−lsp) + (1−S)·(−lsn) = −lsn_clamped + S·(lsn − lsp) → Σφ = −Σ(lsn) + ⟨S, H⟩
        total = -(Hb.sum() + lsp.sum()) + torch.dot(S.reshape(-1), Hb.reshape(-1))
        if need_g:
            p = Z.sigmoid_()
            if clamped:  # G = S·(σ−1)·[sp(−Z) ≤ 100] + (1−S)·σ·[sp(Z) ≤ 100]
                G = S * (p - 1) * cn + (1 - S) * p * cp
            else:
                G = p.sub_(S)
        return total, G, 1.0, (Hb if need_h else None), 1.0
    if kind == "mse":
        p = Z.sigmoid_()
        e = p - S
        total = torch.dot(e.reshape(-1), e.reshape(-1))
        if need_g:
            G = torch.mul(e, p).mul_(p.neg_().add_(1.0))  # e·σ·(1−σ); the factor 2 goes into g_mult
        return total, G, 2.0, (e if need_h else None), -2.0
    if kind == "wbce":
        p = Z.sigmoid_()
        t_pos = torch.add(p, EPS)  # σ + ε
        t_neg = torch.rsub(p, 1.0).add_(EPS)  # (1 − σ) + ε, rounded as the reference rounds it
        D = torch.log(t_pos)
        ln = torch.log(t_neg)
        D.sub_(ln)  # log(σ+ε) − log(1−σ+ε)
        Wn = torch.where(S > 0.5, S.new_tensor(-wpos), S.new_tensor(-wneg))  # −w
        E = ln.addcmul_(S, D)  # log(1−σ+ε) + S·D = −ℓ
        total = torch.dot(E.reshape(-1), Wn.reshape(-1))  # Σ w·ℓ
        del E, ln
        if need_g:
            # G = w·σ(1−σ)·[(1−S)/(1−σ+ε) − S/(σ+ε)] = w·σ(1−σ)·(σ + ε − (1+2ε)S) / ((σ+ε)(1−σ+ε))
            den = t_neg.mul_(t_pos)
            G = t_pos.sub_(S, alpha=1.0 + 2.0 * EPS)  # σ + ε − (1+2ε)S
            G.mul_(p.addcmul_(p, p, value=-1.0)).div_(den).mul_(Wn)  # (−w)·… = −G: g_mult = −1
            del den
        if need_h:
            H = D.mul_(Wn)  # w·(log(1−σ+ε) − log(σ+ε))
        return total, G, -1.0, H, 1.0
    raise pair_kind_error(kind)
