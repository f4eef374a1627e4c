"""The loss kinds, their constants and the pair-loss function φ — written once, imported everywhere.

Z = s·U·Vᵀ + b (rows: images, columns: texts), target S (identity when None).

Kinds (semantics of the LoRS reference ``MultilabelContrastiveLoss``; :mod:`lors_fast.core.reference`):

- softmax kinds (:data:`LSE_KINDS`): ``infonce`` (soft-target InfoNCE; S = I is the CLIP loss), ``cwcl``
  (its rows / columns divided by their target mass + ε), ``kl`` (KL of softmax(τS) to softmax(Z), both ways);
- pair kinds (:data:`PAIR_KINDS`), a sum over all (i, j) of an elementwise φ(Z_ij, S_ij):

  - ``bce``:  φ = S·min(softplus(−Z), 100) + (1−S)·min(softplus(Z), 100)   (torch BCELoss's −100 log clamp,
    :data:`LOG_CLAMP`), averaged over the N² entries;
  - ``wbce``: φ = w·[−S·log(σ(Z)+ε) − (1−S)·log(1−σ(Z)+ε)], w = ½/(n_pos+ε) where S > 0.5, ½/(n_neg+ε)
    elsewhere (the mask carries no gradient; n_pos, n_neg are constants), summed;
  - ``mse``:  φ = (σ(Z) − S)², averaged;
  - ``siglip``: softplus(Z) − S·Z summed over (i, j), divided by N: the primitive φ is ``softplus`` (target
    ignored) and the −S·Z part is a closed-form low-rank term.

ε = :data:`EPS` = 1e-6 everywhere the reference adds one; softplus(x) = log(1 + eˣ), σ = sigmoid.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "LSE_KINDS", "PAIR_KINDS", "PAIR_PHIS", "TRITON_KINDS", "EPS", "LOG_CLAMP", "phi", "pair_kind_error",
           "softplus", "wbce_weights", "interpreting"]

#: every loss kind of the public API, in the documented order
KINDS = ("infonce", "bce", "wbce", "cwcl", "kl", "mse", "siglip")
#: the kinds built on the row / column log-sum-exp primitive
LSE_KINDS = ("infonce", "cwcl", "kl")
#: the kinds built on the pair-sum primitive
PAIR_KINDS = ("bce", "wbce", "mse", "siglip")
#: the elementwise functions φ of the pair-sum primitive (siglip's is softplus)
PAIR_PHIS = ("bce", "wbce", "mse", "softplus")
#: the kinds the fused Triton kernels serve (kl needs softmax(τS) in both directions: streaming only)
TRITON_KINDS = ("infonce", "bce", "wbce", "cwcl", "mse", "siglip")
#: the reference's ε (wbce's log and counts, cwcl's normalisers)
EPS = 1e-6
#: torch BCELoss clamps each log at −100: bce's φ terms are capped at 100
LOG_CLAMP = 100.0


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + eˣ) without torch's linear cut-off above 20 (exact to the last bit in float64 too)."""
    return -F.logsigmoid(-x)


def wbce_weights(S: torch.Tensor, wpos, wneg) -> torch.Tensor:
    """wbce's w: ``wpos`` = ½/(n_pos+ε) where S > 0.5, ``wneg`` = ½/(n_neg+ε) elsewhere (no gradient through
    the mask); the weights are floats or 0-dim tensors (no host read), cast to S's dtype."""
    def w(x):
        return x.detach().to(S.dtype) if isinstance(x, torch.Tensor) else S.new_tensor(x)

    return torch.where((S > 0.5).detach(), w(wpos), w(wneg))


def phi(kind: str, Z: torch.Tensor, S: torch.Tensor | None, wpos: float | None = None,
        wneg: float | None = None) -> torch.Tensor:
    """φ(Z, S) elementwise, in plain differentiable torch ops (the definition above; S unused for softplus)."""
    if kind == "bce":
        return S * torch.clamp(softplus(-Z), max=LOG_CLAMP) + (1 - S) * torch.clamp(softplus(Z), max=LOG_CLAMP)
    if kind == "wbce":
        p = torch.sigmoid(Z)
        ell = -S * torch.log(p + EPS) - (1 - S) * torch.log(1 - p + EPS)
        return wbce_weights(S, wpos, wneg) * ell
    if kind == "mse":
        return (torch.sigmoid(Z) - S) ** 2
    if kind == "softplus":
        return softplus(Z)
    raise pair_kind_error(kind)


def pair_kind_error(kind) -> ValueError:
    """The error for a pair-sum φ that is not one of :data:`PAIR_PHIS`."""
    return ValueError(f"unknown pairwise kind {kind!r}; expected {', '.join(PAIR_PHIS[:-1])} or {PAIR_PHIS[-1]}")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` turns the Triton interpreter on (kernels on CPU tensors), read exactly as
    Triton reads it: ``1``, ``true``, ``on``, ``yes`` or ``y`` in any case; anything else (unset, ``0``,
    ``false``, ``2``, ...) is off.
    The one reading of the variable in this package."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")
