"""The LSE primitive of the streaming path (:mod:`lors_fast.core.streaming`).

LSEr_i = log Σ_j e^{Z_ij}, LSEc_j = log Σ_i e^{Z_ij} of Z = s·U·Vᵀ + b, over row chunks:

- forward (``_Lse``): one online no-grad pass (``_online_lse``: exact row LSE per chunk, running column
  max and rescaled column sums);
- backward (``_LseGrad``): closed form G = gr_i·softmax_row(Z)_ij + gc_j·softmax_col(Z)_ij, then
  ∂U = s·G·V, ∂V = s·Gᵀ·U, ∂s = ⟨G·V, U⟩, ∂b = Σgr + Σgc, with in-place tile arithmetic and accumulating
  GEMMs;
- double backward: recomputes each chunk and lets autograd differentiate the same closed form written in
  plain torch ops (``_lse_grad_terms``), so second derivatives are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from lors_fast.core.streaming.chunked import _add_grads
from lors_fast.core.streaming.tiles import _z_tile


# ----------------------------------------------------------------------------------------------------
# lse: online forward, closed-form backward
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LseSpec:
    n_rows: int
    n_cols: int
    chunk: int


def _lse_chunks(spec, chunk=None):
    step = chunk or spec.chunk
    for k0 in range(0, spec.n_rows, step):
        yield k0, min(k0 + step, spec.n_rows)


class _Lse(torch.autograd.Function):
    """(LSEr, LSEc) of Z = s·U·Vᵀ + b: one online no-grad pass; the backward is :class:`_LseGrad`."""

    @staticmethod
    def forward(ctx, spec: _LseSpec, U, V, s, b):
        lr, lc = _online_lse(lambda k0, k1: _z_tile(U[k0:k1], V, s, b), spec.n_rows, spec.n_cols, spec.chunk,
                             U.dtype, U.device)
        ctx.spec = spec
        ctx.save_for_backward(U, V, s, b, lr, lc)  # the outputs too: the double backward differentiates them
        return lr, lc

    @staticmethod
    def backward(ctx, gr, gc):
        U, V, s, b, lr, lc = ctx.saved_tensors
        gr = torch.zeros_like(lr) if gr is None else gr
        gc = torch.zeros_like(lc) if gc is None else gc
        need = tuple(ctx.needs_input_grad[1:5])
        return (None, *_LseGrad.apply(ctx.spec, need, gr, gc, U, V, s, b, lr, lc))


def _lse_grad_terms(k0, Uk, V, s, b, gr_k, gc, lr_k, lc):
    """Gradients of ⟨gr, LSEr⟩ + ⟨gc, LSEc⟩ over rows k0:k1 w.r.t. (U[k0:k1], V, s, b), as differentiable
    expressions: G = gr_i·softmax_row(Z)_ij + gc_j·softmax_col(Z)_ij, ∂U = s·G·V, ∂V = s·Gᵀ·U, ∂s = ⟨G·V, U⟩,
    ∂b = Σgr + Σgc (each softmax sums to one)."""
    Z = _z_tile(Uk, V, s, b)
    G = gr_k[:, None] * torch.exp(Z - lr_k[:, None]) + gc[None, :] * torch.exp(Z - lc[None, :])
    GV = G @ V
    db = gr_k.sum() + (gc.sum() if k0 == 0 else 0.0)
    return [s * GV, s * (G.T @ Uk), (GV * Uk).sum(), db]


class _LseGrad(torch.autograd.Function):
    """(gr, gc, U, V, s, b, LSEr, LSEc) -> (∂U, ∂V, ∂s, ∂b) of ⟨gr, LSEr⟩ + ⟨gc, LSEc⟩, chunk by chunk with
    in-place tile arithmetic; differentiable once more (recomputing each chunk under autograd)."""

    @staticmethod
    def forward(ctx, spec: _LseSpec, need: tuple, gr, gc, U, V, s, b, lr, lc):
        ctx.spec, ctx.need = spec, need
        ctx.save_for_backward(gr, gc, U, V, s, b, lr, lc)
        dU = torch.zeros_like(U) if need[0] else None
        dV = torch.zeros_like(V) if need[1] else None
        ds = torch.zeros_like(s) if need[2] else None
        sd = s.detach()  # a tensor factor: no host read
        if need[0] or need[1] or need[2]:
            for k0, k1 in _lse_chunks(spec):
                Uk = U[k0:k1]
                Z = torch.mm(Uk * s, V.T) if b is None else torch.addmm(b, Uk * s, V.T)
                G = torch.sub(Z, lr[k0:k1, None]).exp_().mul_(gr[k0:k1, None])
                G.add_(Z.sub_(lc[None, :]).exp_().mul_(gc[None, :]))
                del Z
                if need[0] or need[2]:
                    GV = torch.mm(G, V)
                    if need[0]:
                        dU[k0:k1] = GV * sd
                    if need[2]:
                        ds += torch.dot(GV.reshape(-1), Uk.reshape(-1))
                if need[1]:
                    dV.addmm_(G.T, Uk * sd)
                del G
        db = (gr.sum() + gc.sum()) if need[3] else None
        return dU, dV, ds, db

    @staticmethod
    @once_differentiable
    def backward(ctx, cU, cV, cs, cb):
        spec, need = ctx.spec, ctx.need
        inputs = list(ctx.saved_tensors)  # gr, gc, U, V, s, b, lr, lc
        need_in = ctx.needs_input_grad[2:]
        cot = [cU, cV, cs, cb]
        row_pos = {0, 2, 6}
        acc = [torch.zeros_like(x) if (w and x is not None) else None for x, w in zip(inputs, need_in)]
        if not any(need_in):
            return (None, None, *acc)
        for k0, k1 in _lse_chunks(spec):
            leaves = [None if x is None else (x[k0:k1] if i in row_pos else x).detach().requires_grad_(need_in[i])
                      for i, x in enumerate(inputs)]
            gr_k, gc, Uk, V, s, b, lr_k, lc = leaves
            with torch.enable_grad():
                terms = _lse_grad_terms(k0, Uk, V, s, b, gr_k, gc, lr_k, lc)
                total = None
                for i, (t, c) in enumerate(zip(terms, cot)):
                    if c is None or not need[i] or not isinstance(t, torch.Tensor):
                        continue
                    term = (t * (c[k0:k1] if i == 0 else c)).sum()
                    total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    continue
                want = [w and x is not None for x, w in zip(leaves, need_in)]
                d = torch.autograd.grad(total, [x for x, w in zip(leaves, want) if w], allow_unused=True)
            _add_grads(acc, d, want, row_pos, k0, k1)
        return (None, None, *acc)


def _online_lse(tile_fn, m: int, n: int, chunk: int, dtype, device):
    """No-grad pass: exact row and column log-sum-exp of the matrix whose rows k0:k1 are tile_fn(k0, k1)."""
    lse_r = torch.empty(m, dtype=dtype, device=device)
    cmax = torch.full((n,), -math.inf, dtype=dtype, device=device)
    csum = torch.zeros(n, dtype=dtype, device=device)
    with torch.no_grad():
        for k0 in range(0, m, chunk):
            k1 = min(k0 + chunk, m)
            T = tile_fn(k0, k1)
            lse_r[k0:k1] = torch.logsumexp(T, dim=1)
            new_max = torch.maximum(cmax, T.max(0).values)
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            csum = csum * torch.exp(cmax - safe) + torch.exp(T - safe).sum(0)
            cmax = new_max
        lse_c = torch.log(csum) + torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax))
    return lse_r, lse_c
