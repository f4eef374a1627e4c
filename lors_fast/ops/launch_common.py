"""Small launch helpers shared by the fused launchers (:mod:`lors_fast.ops.triton_backend`) and the strip
path (:mod:`lors_fast.ops.strip`); no kernels, no state."""

from __future__ import annotations

import math

import torch

__all__ = ["_pow2", "_rp", "_scalar", "_lowrank_parts"]


def _pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _rp(r: int) -> int:
    """The rank padded for tl.dot: the next power of two, at least 16."""
    return max(16, _pow2(r))


def _scalar(x, dtype, device):
    """A 0-dim contiguous tensor of ``dtype`` (zero for None)."""
    if x is None:
        return torch.zeros((), dtype=dtype, device=device)
    return x.detach().reshape(()).to(dtype=dtype, device=device).contiguous()


def _lowrank_parts(target, c):
    """(TGT, a, Lc, R, r) as accumulation-dtype contiguous tensors (dummies for the identity); ``c``: the
    launch context (device, acc, dummy())."""
    if target is None:
        d = c.dummy()
        return 0, d, d, d, 1
    _, a, lc, r_ = target
    cv = lambda t: t.detach().to(device=c.device, dtype=c.acc).contiguous()  # noqa: E731
    return 1, cv(a), cv(lc), cv(r_), lc.shape[1]
