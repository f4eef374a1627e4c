"""The materialised reference: every loss kind written directly from its maths on the full N×N matrices.

This is the specification and the test oracle of the fast paths (streaming, Triton), and the benchmark
baseline. Semantics are those of the LoRS reference ``MultilabelContrastiveLoss`` (silicx/LoRS_Distill,
docs/LORS_NOTES.md §2.3; docs/KERNELS_MATHS.md), with its epsilons and clamps:

Z = s·U·Vᵀ + b (rows: images, columns: texts), target S (identity when None), N = batch size.

- infonce: ½[(1/N)Σ_i(rs_i·LSEr_i − Σ_j S_ij Z_ij) + (1/N)Σ_j(cs_j·LSEc_j − Σ_i S_ij Z_ij)], rs = S1, cs = Sᵀ1
  (−Σ S·log_softmax in both directions; S = I is the CLIP loss).
- cwcl: as infonce with row i divided by (rs_i + 1e-6) and column j by (cs_j + 1e-6).
- bce: mean_ij[−S·max(log σ(Z), −100) − (1−S)·max(log σ(−Z), −100)] (torch BCELoss's clamp; logs computed
  stably, which is where we differ from BCELoss on an fp32 sigmoid that saturated to 0 or 1).
- wbce: ℓ = −S log(σ(Z)+1e-6) − (1−S) log(1−σ(Z)+1e-6); pos = S > 0.5 (no gradient through the mask);
  ½[Σ_pos ℓ/(n_pos+1e-6) + Σ_neg ℓ/(n_neg+1e-6)] (the counts exact integers).

The pair kinds evaluate φ of :mod:`lors_fast.core.kinds` (the one definition) on the full matrix.
- kl: ½[KL(softmax(τS) ‖ softmax(Z)) over rows + the same over columns], each divided by N² (torch
  ``kl_div(reduction="mean")``); τ = 10 (the reference's hidden ``label * 10``, named ``kl_temperature``).
- mse: mean (σ(Z) − S)².
- siglip: (1/N)Σ_ij[softplus(Z_ij) − S_ij·Z_ij]; with S = I this is open_clip's SigLIP loss
  (1/N)Σ softplus(−y·Z), y = 2I − 1, and for any S ∈ {0,1} the same; for soft S it is sigmoid
  cross-entropy with soft labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lors_fast.core.kinds import EPS, KINDS, phi
from lors_fast.core.targets import LowRankTarget

__all__ = ["reference_loss", "dense_target", "reference_lse", "reference_pairsum"]


def dense_target(target, n: int, like: torch.Tensor) -> torch.Tensor:
    """The target as a dense n×n tensor in ``like``'s dtype and device (the identity when ``target`` is None)."""
    if target is None:
        return torch.eye(n, dtype=like.dtype, device=like.device)
    if isinstance(target, LowRankTarget):
        return target.dense().to(like.dtype)
    return target.to(like.dtype)


def reference_loss(image_features, text_features, logit_scale, target=None, *, kind="infonce", logit_bias=None,
                   kl_temperature: float = 10.0, upcast: bool = False) -> torch.Tensor:
    """Materialised loss (no input validation: the public API validates). ``upcast`` computes in float32
    (or float64 when the inputs are float64) and returns that dtype."""
    U, V = image_features, text_features
    if upcast and U.dtype in (torch.float16, torch.bfloat16):
        U, V = U.float(), V.float()
    Z = (U @ V.T) * logit_scale
    if logit_bias is not None:
        Z = Z + logit_bias
    n = Z.shape[0]
    S = dense_target(target, n, Z)
    if kind in ("infonce", "cwcl"):
        lr = F.log_softmax(Z, dim=1)
        lc = F.log_softmax(Z, dim=0)
        row = (S * lr).sum(1)
        col = (S * lc).sum(0)
        if kind == "cwcl":
            row = row / (S.sum(1) + EPS)
            col = col / (S.sum(0) + EPS)
        return -0.5 * (row.mean() + col.mean())
    if kind == "bce":
        return phi("bce", Z, S).mean()
    if kind == "wbce":
        n_pos = (S > 0.5).detach().sum().to(torch.float64)  # exact counts, no host read
        return phi("wbce", Z, S, 0.5 / (n_pos + EPS), 0.5 / (Z.numel() - n_pos + EPS)).sum()
    if kind == "kl":
        qr = F.softmax(kl_temperature * S, dim=1)
        qc = F.softmax(kl_temperature * S, dim=0)
        # torch's kl_div(reduction="mean") (what the reference calls), spelled out: Σ q(log q − log p) / N²
        kr = (torch.xlogy(qr, qr) - qr * F.log_softmax(Z, dim=1)).sum() / Z.numel()
        kc = (torch.xlogy(qc, qc) - qc * F.log_softmax(Z, dim=0)).sum() / Z.numel()
        return 0.5 * (kr + kc)
    if kind == "mse":
        return phi("mse", Z, S).mean()
    if kind == "siglip":
        return (phi("softplus", Z, None) - S * Z).sum() / n
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")


# ------------------------------------------------------------------------------- primitive-level oracles
def reference_lse(U, V, scale, bias=None):
    """(row LSE, column LSE) of Z = s·U·Vᵀ + b, materialised: the oracle of the ``lse`` primitive."""
    Z = scale * U @ V.T + (0.0 if bias is None else bias)
    return torch.logsumexp(Z, 1), torch.logsumexp(Z, 0)


def reference_pairsum(kind, U, V, scale, bias, target, npos=None, nneg=None):
    """Σ_ij φ_kind(Z_ij, S_ij) materialised: the oracle of the ``pairsum`` primitive. ``target`` in the
    primitives' form: None (identity) | ("lowrank", a, c·L, R) | ("dense", S); wbce's weights from the counts
    ``npos`` / ``nneg`` (floats or 0-dim tensors)."""
    Z = scale * U @ V.T + (0.0 if bias is None else bias)
    if kind == "softplus":
        return phi("softplus", Z, None).sum()
    if target is None:
        S = torch.eye(U.shape[0], V.shape[0], dtype=Z.dtype, device=Z.device)
    elif target[0] == "lowrank":
        S = torch.diag(target[1]) + target[2] @ target[3].T
    else:
        S = target[1]
    S = S.to(Z.dtype)
    w = (None, None) if kind != "wbce" else (0.5 / (npos + EPS), 0.5 / (nneg + EPS))
    return phi(kind, Z, S, *w).sum()
