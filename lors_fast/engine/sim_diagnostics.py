"""Diagnostics of the learned similarity S, written into every LoRS run's metrics (issue 18).

Two questions decide whether similarity mining can pay:

* **Does the off-diagonal part learn at a useful rate?** With S = diag(a) + c·L·Rᵀ the parameters are
  factors, so the raw gradients are not comparable. :func:`update_rates` reports the first-order change
  of S that one plain gradient step of unit learning rate makes: ΔS = −(diag(g_a) + c·(g_L·Rᵀ + L·g_Rᵀ))
  (for a dense S, ΔS = −g_S), as the mean |ΔS| over the diagonal vs the off-diagonal entries, and the
  signed off-diagonal mean (> 0: descent raises the off-diagonal entries, i.e. pulls pairs together).
* **Does S agree with what the captions say?** :func:`agreement` compares the mean off-diagonal S over
  pairs whose captions' cosine is above a threshold (pairs that plausibly describe each other) with the
  mean over the other pairs.

Both are O(N²) on the dense S and only run for N ≤ :data:`MAX_N`.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_N", "update_rates", "sim_state", "agreement", "caption_cosine"]

MAX_N = 2048


def _offdiag_mask(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _delta_s(sim, grads) -> torch.Tensor | None:
    """−(first-order change of S per unit learning rate) for a plain gradient step (the descent direction)."""
    if hasattr(sim, "full"):
        (g,) = grads
        return -g.detach().double()
    g_a, g_l, g_r = (g.detach().double() for g in grads)
    c = float(sim.scale)
    left, right = sim.left.detach().double(), sim.right.detach().double()
    return -(torch.diag_embed(g_a) + c * (g_l @ right.T + left @ g_r.T))


def update_rates(sim, grads) -> dict[str, float]:
    """``sim_dS_diag`` / ``sim_dS_offdiag``: mean |ΔS| of a unit-lr gradient step on the diagonal / off the
    diagonal; ``sim_dS_offdiag_signed``: the signed off-diagonal mean; ``sim_dS_ratio``: off / diag."""
    if sim is None or sim.n > MAX_N or any(g is None for g in grads):
        return {}
    d = _delta_s(sim, grads)
    off = _offdiag_mask(d.shape[0], d.device)
    diag = float(d.diagonal().abs().mean())
    offm = float(d[off].abs().mean())
    return {"sim_dS_diag": diag, "sim_dS_offdiag": offm, "sim_dS_offdiag_signed": float(d[off].mean()),
            "sim_dS_ratio": offm / diag if diag > 0 else float("inf") if offm > 0 else 0.0}


def sim_state(S: torch.Tensor) -> dict[str, float]:
    """Diagonal mean, off-diagonal mean / max / min and the mean off-diagonal mass of a row."""
    S = S.detach().double()
    off = _offdiag_mask(S.shape[0], S.device)
    o = S[off]
    return {"sim_diag_mean": float(S.diagonal().mean()), "sim_offdiag_mean": float(o.mean()),
            "sim_offdiag_max": float(o.max()), "sim_offdiag_min": float(o.min()),
            "sim_offdiag_rowmass": float((S.sum(1) - S.diagonal()).mean())}


def caption_cosine(emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N×N) of caption embeddings."""
    e = torch.nn.functional.normalize(emb.detach().double(), dim=1)
    return e @ e.T


def agreement(S: torch.Tensor, cos: torch.Tensor, threshold: float) -> dict[str, float]:
    """``sim_agree_hi`` / ``sim_agree_lo``: mean off-diagonal S over pairs whose captions' cosine is above /
    at most ``threshold`` (NaN when a group is empty); ``sim_agree_n_hi``: the number of such pairs;
    ``sim_agree_corr``: Pearson correlation of the off-diagonal S with the caption cosine."""
    if S.shape != cos.shape:
        raise ValueError(f"S is {tuple(S.shape)} but the caption cosine matrix is {tuple(cos.shape)}")
    S = S.detach().double()
    off = _offdiag_mask(S.shape[0], S.device)
    s, c = S[off], cos.to(S)[off]
    hi = c > threshold
    nan = float("nan")
    out = {"sim_agree_hi": float(s[hi].mean()) if hi.any() else nan,
           "sim_agree_lo": float(s[~hi].mean()) if (~hi).any() else nan,
           "sim_agree_n_hi": int(hi.sum())}
    sc, cc = s - s.mean(), c - c.mean()
    den = float(sc.norm() * cc.norm())
    out["sim_agree_corr"] = float((sc * cc).sum()) / den if den > 0 else 0.0
    return out
