"""The materialised reference: every loss kind written directly from its maths on the full N×N matrices.

This is the specification and the test oracle of the fast paths (streaming, Triton), and the benchmark
baseline. Semantics are those of the LoRS reference ``MultilabelContrastiveLoss`` (silicx/LoRS_Distill,
LORS_SPEC §2.3; KERNELS.md), with its epsilons and clamps:

Z = s·U·Vᵀ + b (rows: images, columns: texts), target S (identity when None), N = batch size.

- infonce: ½[(1/N)Σ_i(rs_i·LSEr_i − Σ_j S_ij Z_ij) + (1/N)Σ_j(cs_j·LSEc_j − Σ_i S_ij Z_ij)], rs = S1, cs = Sᵀ1
  (−Σ S·log_softmax in both directions; S = I is the CLIP loss).
- cwcl: as infonce with row i divided by (rs_i + 1e-6) and column j by (cs_j + 1e-6).
- bce: mean_ij[−S·max(log σ(Z), −100) − (1−S)·max(log σ(−Z), −100)] (torch BCELoss's clamp; logs computed
  stably, which is where we differ from BCELoss on an fp32 sigmoid that saturated to 0 or 1).
- wbce: ℓ = −S log(σ(Z)+1e-6) − (1−S) log(1−σ(Z)+1e-6); pos = S > 0.5 (no gradient through the mask);
  ½[Σ_pos ℓ/(n_pos+1e-6) + Σ_neg ℓ/(n_neg+1e-6)] (counts kept in float64).
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

from .targets import LowRankTarget

__all__ = ["reference_loss", "KINDS", "EPS"]

KINDS = ("infonce", "bce", "wbce", "cwcl", "kl", "mse", "siglip")
EPS = 1e-6


def dense_target(target, n: int, like: torch.Tensor) -> torch.Tensor:
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
        lp = torch.clamp(F.logsigmoid(Z), min=-100.0)
        ln = torch.clamp(F.logsigmoid(-Z), min=-100.0)
        return -(S * lp + (1 - S) * ln).mean()
    if kind == "wbce":
        p = torch.sigmoid(Z)
        ell = -S * torch.log(p + EPS) - (1 - S) * torch.log(1 - p + EPS)
        pos = (S > 0.5).detach()
        n_pos = pos.sum().to(torch.float64)
        n_neg = (~pos).sum().to(torch.float64)
        lpos = (ell * pos).sum() / (n_pos + EPS).to(ell.dtype)
        lneg = (ell * ~pos).sum() / (n_neg + EPS).to(ell.dtype)
        return 0.5 * (lpos + lneg)
    if kind == "kl":
        qr = F.softmax(kl_temperature * S, dim=1)
        qc = F.softmax(kl_temperature * S, dim=0)
        # torch's kl_div(reduction="mean") (what the reference calls), spelled out: Σ q(log q − log p) / N²
        kr = (torch.xlogy(qr, qr) - qr * F.log_softmax(Z, dim=1)).sum() / Z.numel()
        kc = (torch.xlogy(qc, qc) - qc * F.log_softmax(Z, dim=0)).sum() / Z.numel()
        return 0.5 * (kr + kc)
    if kind == "mse":
        return ((torch.sigmoid(Z) - S) ** 2).mean()
    if kind == "siglip":
        return (-F.logsigmoid(-Z) - S * Z).sum() / n
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
