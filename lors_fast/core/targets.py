"""Soft image–text targets: the learned similarity matrix S of LoRS.

S = diag(a) + c·L·Rᵀ with a ∈ ℝᴺ, L, R ∈ ℝᴺˣʳ, c = α/r (the LoRA-style scale). S is never materialised
except by :meth:`LowRankTarget.dense`; a minibatch's target S[idx, idx] is the target built from the row
slices (a[idx], L[idx], R[idx]).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRankTarget", "LowRankSimilarity", "FullSimilarity"]


def _check_indices(indices, n: int) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
    return idx.long()


class LowRankTarget:
    """S = diag(diag) + scale·left·rightᵀ, kept as factors.

    Args:
        diag: (N,) tensor a.
        left: (N, r) tensor L.
        right: (N, r) tensor R.
        scale: c = α/r, a float or a 0-dim tensor (gradients flow to it when it is a tensor).
    """

    def __init__(self, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale=1.0):
        for name, t in (("diag", diag), ("left", left), ("right", right)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"LowRankTarget.{name} must be a torch.Tensor, got {type(t).__name__}")
        if diag.dim() != 1:
            raise ValueError(f"LowRankTarget.diag must be 1-D (N,), got shape {tuple(diag.shape)}")
        n = diag.shape[0]
        if left.dim() != 2 or left.shape[0] != n:
            raise ValueError(f"LowRankTarget.left must have shape ({n}, r), got {tuple(left.shape)}")
        if right.shape != left.shape:
            raise ValueError(
                f"LowRankTarget.right must have the shape of left {tuple(left.shape)}, got {tuple(right.shape)}"
            )
        if left.shape[1] < 1:
            raise ValueError(f"LowRankTarget rank must be >= 1, got left of shape {tuple(left.shape)}")
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"LowRankTarget.scale must be a scalar, got shape {tuple(scale.shape)}")
            scale = scale.reshape(())
        elif not isinstance(scale, (int, float)):
            raise ValueError(f"LowRankTarget.scale must be a float or 0-dim tensor, got {type(scale).__name__}")
        self.diag, self.left, self.right, self.scale = diag, left, right, scale

    @property
    def n(self) -> int:
        """Number of pairs N (S is N×N)."""
        return self.diag.shape[0]

    @property
    def rank(self) -> int:
        """Rank r of the low-rank term."""
        return self.left.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)``, the shape of the dense S."""
        return (self.n, self.n)

    def scaled_left(self) -> torch.Tensor:
        """c·L (differentiable in c and L)."""
        return self.left * self.scale

    def select(self, indices) -> LowRankTarget:
        """The target of a minibatch: S[idx][:, idx] as factors (no N×N work)."""
        idx = _check_indices(indices, self.n).to(self.diag.device)
        return LowRankTarget(self.diag[idx], self.left[idx], self.right[idx], self.scale)

    def dense(self) -> torch.Tensor:
        """Materialise S (N×N). For tests, references and small N only."""
        return torch.diag_embed(self.diag) + self.scaled_left() @ self.right.T

    def row_sums(self) -> torch.Tensor:
        """S·1 = a + c·L(Rᵀ1), O(N·r)."""
        return self.diag + self.scaled_left() @ self.right.sum(0)

    def col_sums(self) -> torch.Tensor:
        """Sᵀ·1 = a + c·R(Lᵀ1), O(N·r)."""
        return self.diag + self.right @ self.scaled_left().sum(0)

    def to(self, *args, **kwargs) -> LowRankTarget:
        """The same target with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        s = self.scale.to(*args, **kwargs) if isinstance(self.scale, torch.Tensor) else self.scale
        return LowRankTarget(self.diag.to(*args, **kwargs), self.left.to(*args, **kwargs),
                             self.right.to(*args, **kwargs), s)

    def __repr__(self) -> str:
        return f"LowRankTarget(n={self.n}, rank={self.rank}, scale={float(self.scale):.4g})"


def _positive_int(name: str, v) -> int:
    """``v`` as a Python int if it is an integer >= 1 (numpy / torch integers too, never a bool)."""
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise ValueError(f"LowRankSimilarity {name} must be a positive int, got {v!r}")
    return int(v)


class LowRankSimilarity(nn.Module):
    """Learnable S = diag(a) + (α/r)·L·Rᵀ, initialised as the reference: a = 1, L ~ N(0, 1), R = 0 (so S = I).

    Args:
        n: number of synthetic pairs N.
        rank: r ≥ 1.
        alpha: α (LoRA scale numerator); the factor applied is α/r.
        generator: optional torch.Generator for the initialisation of L.
    """

    def __init__(self, n: int, rank: int, alpha: float = 1.0, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        n, rank = _positive_int("n", n), _positive_int("rank", rank)
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise ValueError(f"LowRankSimilarity alpha must be finite, got {alpha!r}")
        self.n, self.rank, self.alpha = n, rank, alpha
        self.diag = nn.Parameter(torch.ones(n, dtype=dtype))
        self.left = nn.Parameter(torch.randn(n, rank, generator=generator, dtype=dtype))
        self.right = nn.Parameter(torch.zeros(n, rank, dtype=dtype))

    @property
    def scale(self) -> float:
        """The factor α/r of the low-rank term."""
        return self.alpha / self.rank

    def target(self, indices=None) -> LowRankTarget:
        """The current S as a :class:`LowRankTarget` (rows/columns ``indices`` only when given)."""
        t = LowRankTarget(self.diag, self.left, self.right, self.scale)
        return t if indices is None else t.select(indices)

    def dense(self) -> torch.Tensor:
        """The current S as a dense N×N tensor (tests, pictures; O(N²) memory)."""
        return self.target().dense()

    def extra_repr(self) -> str:
        """``n``, ``rank`` and ``alpha`` for the module's repr."""
        return f"n={self.n}, rank={self.rank}, alpha={self.alpha}"

    @torch.no_grad()
    def init_right_(self, std: float, *, generator: torch.Generator | None = None, nonneg: bool = False) -> None:
        """R ~ std·N(0, 1) (|·| when ``nonneg``) instead of 0, so the off-diagonal part has a gradient
        through L from the first step (with R = 0, ∂/∂L = c·G·R = 0)."""
        std = float(std)
        if not (std >= 0 and torch.isfinite(torch.tensor(std))):
            raise ValueError(f"init_right_ std must be a finite number >= 0, got {std!r}")
        r = torch.randn(self.right.shape, generator=generator, dtype=self.right.dtype) * std
        self.right.copy_(r.abs() if nonneg else r)

    @torch.no_grad()
    def init_from_(self, K: torch.Tensor, *, iters: int = 300, generator: torch.Generator | None = None) -> None:
        """Start from S ≈ I + K for a non-negative off-diagonal K (e.g. caption–caption similarity).

        c·L·Rᵀ is fitted to K off the diagonal by non-negative matrix factorisation (Lee–Seung
        multiplicative updates with the diagonal imputed from the current fit, so L, R ≥ 0 and the start is
        feasible under a non-negativity constraint), then a = max(1 − diag(c·L·Rᵀ), 0) so the diagonal of
        S stays ≈ 1. K's diagonal is ignored.
        """
        n = self.n
        if K.shape != (n, n):
            raise ValueError(f"init_from_ K must have shape ({n}, {n}), got {tuple(K.shape)}")
        if not torch.isfinite(K).all() or (K < 0).any():
            raise ValueError("init_from_ K must be finite and non-negative")
        K = K.detach().double().clone()
        K.fill_diagonal_(0)
        c = self.scale
        w = torch.rand(n, self.rank, generator=generator, dtype=torch.float64) + 0.1
        h = torch.rand(n, self.rank, generator=generator, dtype=torch.float64) + 0.1
        tiny = 1e-12
        eye = torch.eye(n, dtype=torch.bool)
        for _ in range(iters):  # K ≈ w·hᵀ off the diagonal (w = c·L, h = R); the diagonal is imputed
            Kf = torch.where(eye, w @ h.T, K)
            h *= (Kf.T @ w) / (h @ (w.T @ w) + tiny)
            w *= (Kf @ h) / (w @ (h.T @ h) + tiny)
        self.left.copy_((w / c).to(self.left.dtype))
        self.right.copy_(h.to(self.right.dtype))
        self.diag.copy_((1.0 - (w * h).sum(1)).clamp(min=0).to(self.diag.dtype))


class FullSimilarity(nn.Module):
    """Learnable dense S (N×N), initialised to the identity. ``target(idx)`` is the block S[idx][:, idx]."""

    def __init__(self, n: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"FullSimilarity n must be a positive int, got {n!r}")
        self.n = n
        self.full = nn.Parameter(torch.eye(n, dtype=dtype))

    def target(self, indices=None) -> torch.Tensor:
        """The current dense S, or its ``indices`` × ``indices`` block when given."""
        if indices is None:
            return self.full
        idx = _check_indices(indices, self.n).to(self.full.device)
        return self.full[idx[:, None], idx]

    def dense(self) -> torch.Tensor:
        """The learned dense N×N S itself."""
        return self.full

    def extra_repr(self) -> str:
        """``n`` for the module's repr."""
        return f"n={self.n}"
