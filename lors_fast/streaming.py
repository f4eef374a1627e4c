"""The streaming CPU path: pairwise primitives over row chunks, never an N×N tensor.

Memory is O(chunk·N) at every order of differentiation. Three autograd building blocks:

- :func:`chunked_sum` (generic): the sum over row chunks k of a row-separable function fₖ of (row slices of
  some inputs, all of other inputs). Its forward keeps nothing but its inputs; its backward recomputes each
  chunk and takes that chunk's vector–Jacobian product under autograd; its double backward recomputes each
  chunk once more and differentiates that product. Used by ``kl``.
- ``_Lse`` / ``_LseGrad`` (``lse``): an online no-grad forward; a closed-form backward
  G = gr_i·softmax_row + gc_j·softmax_col with in-place tile arithmetic and accumulating GEMMs.
- ``_PairSum`` / ``_PairSumGrad`` (``pairsum``): the forward also computes every first derivative from the
  closed forms G = ∂φ/∂Z, H = ∂φ/∂S (KERNELS.md) in the same pass over the tiles, so the backward only
  scales them by the incoming cotangent (one pass in all instead of a forward pass plus a recomputing one).

Both closed-form backwards are themselves differentiable: their double backward recomputes each chunk and
lets autograd differentiate the closed-form first derivatives written in plain torch ops
(``_lse_grad_terms``, ``_pair_grad_terms``/``_phi_derivs``), so second derivatives are exact.

The primitives (docs/DESIGN.md):

- ``lse(U, V, s, b)``: LSEr_i = log Σ_j e^{Z_ij}, LSEc_j = log Σ_i e^{Z_ij}.
- ``pairsum(kind, U, V, s, b, target)``: Σ_ij φ(Z_ij, S_ij), the target tile S[k, :] built per chunk from
  the factors (a, c·L, R) or read from a dense S.
- ``kl(...)``: the KL kind, which needs the softmax of τS in both directions (streaming-only).
- ``count_pos(target, n)``: #{S_ij > 0.5} (wbce's weights), no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

EPS = 1e-6
#: default working-set size of one chunk (rows × N elements per N-wide temporary): 8 MiB in float32.
#: Measured on 2 busy cores (bench/RESULTS_CPU_loss.md): 1M-element tiles were ~1.4× slower (more, smaller
#: parallel ops), 4M-element tiles would exceed 5 % of the reference's fwd+bwd peak memory at N = 8192.
DEFAULT_CHUNK_ELEMS = 1 << 21


def default_chunk(n_cols: int) -> int:
    return max(8, DEFAULT_CHUNK_ELEMS // max(n_cols, 1))


# ----------------------------------------------------------------------------------------------------
# chunked_sum: the one autograd Function of the streaming path
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    fn: Callable  # fn(k0, k1, *row_slices, *shared) -> (tuple of row outputs, tuple of summed outputs)
    n_row: int  # number of row inputs (sliced along dim 0); the rest are shared
    n_rows: int  # rows in total
    chunk: int
    n_row_out: int
    known: tuple | None  # forward values known in advance (skip the forward pass)


def _chunks(spec: _Spec):
    for k0 in range(0, spec.n_rows, spec.chunk):
        yield k0, min(k0 + spec.chunk, spec.n_rows)


def _slice_inputs(spec: _Spec, inputs, k0, k1):
    return [x[k0:k1] if (i < spec.n_row and x is not None) else x for i, x in enumerate(inputs)]


def _leaf(x, want: bool):
    if x is None or not want:
        return x.detach() if isinstance(x, torch.Tensor) else x
    return x.detach().requires_grad_(True)


def _accumulate(spec: _Spec, acc: list, grads, k0, k1, row_count: int):
    """Add chunk gradients into full-size accumulators; the first ``row_count`` entries are row-sliced."""
    for i, g in enumerate(grads):
        if g is None or acc[i] is None:
            continue
        if i < row_count:
            acc[i][k0:k1] += g
        else:
            acc[i] += g


def _add_grads(acc: list, grads, want, row_pos, k0, k1):
    """Add one chunk's gradients (``grads``: one per True in ``want``, maybe None) into the full-size
    accumulators; positions in ``row_pos`` are row-sliced inputs."""
    it = iter(grads)
    for i, w in enumerate(want):
        if not w:
            continue
        g = next(it)
        if g is None:
            continue
        if i in row_pos:
            acc[i][k0:k1] += g
        else:
            acc[i] += g


class _ChunkedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, *inputs):
        ctx.spec = spec
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in inputs])
        ctx.non_tensor = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        if spec.known is not None:
            return tuple(t.clone() for t in spec.known)
        rows, sums = None, None
        with torch.no_grad():
            for k0, k1 in _chunks(spec):
                r, s = spec.fn(k0, k1, *_slice_inputs(spec, inputs, k0, k1))
                if rows is None:
                    rows = [[] for _ in r]
                    sums = [t.clone() for t in s]
                else:
                    for acc, t in zip(sums, s):
                        acc += t
                for lst, t in zip(rows, r):
                    lst.append(t)
        return tuple(torch.cat(lst) for lst in rows) + tuple(sums)

    @staticmethod
    def backward(ctx, *grad_outs):
        spec = ctx.spec
        saved = ctx.saved_tensors
        inputs = [s if s is not None else nt for s, nt in zip(saved, ctx.non_tensor)]
        need = ctx.needs_input_grad[1:]
        grads = _ChunkedSumGrad.apply(spec, tuple(need), *inputs, *grad_outs)
        return (None, *grads)


class _ChunkedSumGrad(torch.autograd.Function):
    """(inputs, cotangents of the outputs) -> gradients of the inputs, chunk by chunk; differentiable once."""

    @staticmethod
    def forward(ctx, spec: _Spec, need: tuple, *args):
        n_in = len(need)
        inputs, gouts = list(args[:n_in]), list(args[n_in:])
        ctx.spec, ctx.need, ctx.n_in = spec, need, n_in
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in args])
        ctx.non_tensor = [None if isinstance(x, torch.Tensor) else x for x in args]
        acc = [torch.zeros_like(x) if (w and x is not None) else None for x, w in zip(inputs, need)]
        for k0, k1 in _chunks(spec):
            leaves = [_leaf(x, w) for x, w in zip(_slice_inputs(spec, inputs, k0, k1), need)]
            wrt = [x for x, w in zip(leaves, need) if w and x is not None]
            if not wrt:
                break
            with torch.enable_grad():
                r, s = spec.fn(k0, k1, *leaves)
                outs, gos = _pair_outputs(r, s, gouts, k0, k1)
                g = torch.autograd.grad(outs, wrt, gos, allow_unused=True)
            _accumulate(spec, acc, _expand(g, leaves, need), k0, k1, spec.n_row)
        return tuple(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, *cot):
        spec, need, n_in = ctx.spec, ctx.need, ctx.n_in
        args = [s if s is not None else nt for s, nt in zip(ctx.saved_tensors, ctx.non_tensor)]
        inputs, gouts = args[:n_in], args[n_in:]
        need2 = ctx.needs_input_grad[2:]
        need_in, need_go = need2[:n_in], need2[n_in:]
        acc_in = [torch.zeros_like(x) if (w and x is not None) else None for x, w in zip(inputs, need_in)]
        acc_go = [torch.zeros_like(x) if (w and x is not None) else None for x, w in zip(gouts, need_go)]
        for k0, k1 in _chunks(spec):
            want_in = [a or b for a, b in zip(need, need_in)]
            leaves = [_leaf(x, w) for x, w in zip(_slice_inputs(spec, inputs, k0, k1), want_in)]
            go_chunks = [g[k0:k1] if i < spec.n_row_out else g for i, g in enumerate(gouts)]
            go_leaves = [_leaf(g, w) for g, w in zip(go_chunks, need_go)]
            with torch.enable_grad():
                r, s = spec.fn(k0, k1, *leaves)
                outs, gos = _pair_outputs(r, s, go_leaves, None, None)
                wrt = [x for x, w in zip(leaves, need) if w and x is not None]
                g = torch.autograd.grad(outs, wrt, gos, create_graph=True, allow_unused=True)
                g_full = _expand(g, leaves, need)
                total = None
                for i, (gi, ci, w) in enumerate(zip(g_full, cot, need)):
                    if not w or gi is None or ci is None:
                        continue
                    c = ci[k0:k1] if i < spec.n_row else ci
                    term = (gi * c).sum()
                    total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    continue
                targets = [x for x, w in zip(leaves, need_in) if w and x is not None]
                targets += [x for x, w in zip(go_leaves, need_go) if w and x is not None]
                d = torch.autograd.grad(total, targets, allow_unused=True)
            d = list(d)
            d_in = [d.pop(0) if (w and x is not None) else None for x, w in zip(leaves, need_in)]
            d_go = [d.pop(0) if (w and x is not None) else None for x, w in zip(go_leaves, need_go)]
            _accumulate(spec, acc_in, d_in, k0, k1, spec.n_row)
            _accumulate(spec, acc_go, d_go, k0, k1, spec.n_row_out)
        return (None, None, *acc_in, *acc_go)


def _pair_outputs(r, s, gouts, k0, k1):
    """Match outputs of one chunk with their cotangents (row cotangents sliced when k0 is given)."""
    outs, gos = [], []
    for i, t in enumerate(list(r) + list(s)):
        g = gouts[i]
        if g is None:
            continue
        if i < len(r) and k0 is not None:
            g = g[k0:k1]
        outs.append(t)
        gos.append(g)
    return outs, gos


def _expand(g, leaves, need):
    """Scatter the grads of the differentiated leaves back to the positions of all inputs."""
    it = iter(g)
    return [next(it) if (w and x is not None) else None for x, w in zip(leaves, need)]


def chunked_sum(fn, row_inputs, shared_inputs, n_rows: int, chunk: int, n_row_out: int, known=None):
    """Σ over row chunks of ``fn``. ``fn(k0, k1, *row_slices, *shared)`` returns (row outputs, summed
    outputs); row outputs are concatenated over chunks, summed outputs added. ``known``: the forward values,
    when they are known without a pass."""
    spec = _Spec(fn, len(row_inputs), n_rows, max(1, int(chunk)), n_row_out, known)
    return _ChunkedSum.apply(spec, *row_inputs, *shared_inputs)


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


def softplus(x):
    """log(1 + eˣ) without torch's linear cut-off above 20 (exact to the last bit in float64 too)."""
    return -F.logsigmoid(-x)


def _phi(kind, Z, S, wpos=None, wneg=None):
    """φ(Z, S) elementwise, in plain differentiable torch ops (the definition; DESIGN.md)."""
    if kind == "bce":
        return S * torch.clamp(softplus(-Z), max=100.0) + (1 - S) * torch.clamp(softplus(Z), max=100.0)
    if kind == "wbce":
        p = torch.sigmoid(Z)
        ell = -S * torch.log(p + EPS) - (1 - S) * torch.log(1 - p + EPS)
        return _wbce_weights(S, wpos, wneg) * ell
    if kind == "mse":
        return (torch.sigmoid(Z) - S) ** 2
    if kind == "softplus":
        return softplus(Z)
    raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")


def _wbce_weights(S, wpos, wneg):
    """½/(n_pos+ε) where S > 0.5, ½/(n_neg+ε) elsewhere (no gradient through the mask)."""
    return torch.where((S > 0.5).detach(), S.new_tensor(wpos), S.new_tensor(wneg))


def _phi_derivs(kind, Z, S, wpos=None, wneg=None):
    """(G, H) = (∂φ/∂Z, ∂φ/∂S) in closed form, written in differentiable torch ops (H is None for softplus).

    Autograd of these expressions gives the second derivatives exactly (the double backward of pairsum)."""
    p = torch.sigmoid(Z)
    if kind == "bce":
        sp, sn = softplus(Z), softplus(-Z)  # torch's clamp(max=100) passes the gradient where x <= 100
        G = S * (p - 1) * (sn <= 100).to(Z.dtype) + (1 - S) * p * (sp <= 100).to(Z.dtype)
        return G, torch.clamp(sn, max=100.0) - torch.clamp(sp, max=100.0)
    if kind == "wbce":
        W = _wbce_weights(S, wpos, wneg)
        q = p * (1 - p)
        G = W * q * ((1 - S) / (1 - p + EPS) - S / (p + EPS))
        return G, W * (torch.log(1 - p + EPS) - torch.log(p + EPS))
    if kind == "mse":
        e = p - S
        return 2 * e * p * (1 - p), -2 * e
    if kind == "softplus":
        return p, None
    raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")


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
            cn, cp = (lsp >= -100), (lsn >= -100)
            lsp.clamp_(min=-100.0)
            lsn.clamp_(min=-100.0)
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
    raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")


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
        sval = float(s.detach())
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
                        dU[k0:k1] = GV * sval
                    if need[2]:
                        ds += torch.dot(GV.reshape(-1), Uk.reshape(-1))
                if need[1]:
                    dV.addmm_(G.T, Uk, alpha=sval)
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
    sval = float(s.detach())
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
                acc[0][k0:k1] = GV * (gm * sval)
            if need[1]:
                acc[1].addmm_(G.T, Uk, alpha=gm * sval)
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


#: double backward of pairsum: closed-form second derivatives (True) or autograd of _pair_grad_terms (False)
CLOSED_FORM_HVP = True


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
        W = _wbce_weights(S, wpos, wneg)
        d2 = d1 * (1 - 2 * p)
        ia, ib = 1 / (p + EPS), 1 / (1 - p + EPS)
        G = W * d1 * ((1 - S) * ib - S * ia)
        H = W * (torch.log(1 - p + EPS) - torch.log(p + EPS))
        fzz = W * (-S * (d2 - d1 * d1 * ia) * ia + (1 - S) * (d2 + d1 * d1 * ib) * ib)
        return G, H, fzz, -W * d1 * (ia + ib), 0.0
    raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")


def _pair_hvp(spec: _PairSpec, gout, inputs, cot, need, need_in):
    """Closed-form double backward of pairsum: ∂/∂inputs of gout·Σ_i ⟨cot_i, ∇_i Σφ⟩ (KERNELS.md).

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
            acc[1].addmm_(dZ.T, Uk, alpha=float(sd))
            if cU is not None:
                acc[1].addmm_(G.T, cU[k0:k1], alpha=float(sd))
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


# ----------------------------------------------------------------------------------------------------
# the primitives
# ----------------------------------------------------------------------------------------------------
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


class StreamingPrimitives:
    """Pairwise primitives over row chunks of ``chunk`` rows (default: about 2M elements per tile)."""

    name = "streaming"

    def __init__(self, chunk: int | None = None):
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.chunk = chunk

    def _chunk(self, n_cols):
        return self.chunk or default_chunk(n_cols)

    def lse(self, U, V, scale, bias):
        m, n = U.shape[0], V.shape[0]
        return _Lse.apply(_LseSpec(m, n, self._chunk(n)), U, V, scale, bias)

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        if kind not in ("bce", "wbce", "mse", "softplus"):
            raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")
        m, n = U.shape[0], V.shape[0]
        tkind, t_rows, t_shared = _target_parts(None if kind == "softplus" else target)
        wpos = wneg = None
        if kind == "wbce":
            wpos = 0.5 / (float(npos) + EPS)
            wneg = 0.5 / (float(nneg) + EPS)
        spec = _PairSpec(kind, tkind, m, n, self._chunk(n), wpos, wneg, bias is not None)
        inputs = (U, V, scale) + (() if bias is None else (bias,)) + tuple(t_rows) + tuple(t_shared)
        return _PairSum.apply(spec, torch.is_grad_enabled(), *inputs)

    def count_pos(self, target, n):
        """Number of entries S_ij > 0.5 (no gradient), as a float64 0-dim tensor."""
        tkind, t_rows, t_shared = _target_parts(target)
        if tkind == "identity":
            return torch.tensor(float(n), dtype=torch.float64)
        if tkind == "dense":
            return (t_rows[0].detach() > 0.5).sum().to(torch.float64)
        chunk = self._chunk(n)
        total = 0
        with torch.no_grad():
            for k0 in range(0, n, chunk):
                k1 = min(k0 + chunk, n)
                rows = [t[k0:k1] for t in t_rows]
                S = _s_tile(k0, k1, n, tkind, rows, t_shared, t_rows[0])
                total += int((S > 0.5).sum())
        return torch.tensor(float(total), dtype=torch.float64)

    def kl(self, U, V, scale, bias, target, n, tau: float):
        """½[KL(softmax(τS)‖softmax(Z)) rows + columns] / N² (torch ``kl_div(reduction="mean")``)."""
        chunk = self._chunk(n)
        tkind, t_rows, t_shared = _target_parts(target)
        n_tr = len(t_rows)
        like = U

        def s_tile_det(k0, k1):
            rows = [t.detach()[k0:k1] for t in t_rows]
            return tau * _s_tile(k0, k1, n, tkind, rows, [t.detach() for t in t_shared], like)

        t_r0, t_c0 = _online_lse(s_tile_det, n, n, chunk, U.dtype, U.device)

        # differentiable LSE of τS in both directions (same "known value" construction as lse())
        def fn_t(k0, k1, *args):
            row_t, mr_k = args[:n_tr], args[n_tr]
            shared_t, mc = args[n_tr + 1:-1], args[-1]
            T = tau * _s_tile(k0, k1, n, tkind, row_t, shared_t, like)
            return (torch.exp(T - mr_k[:, None]).sum(1),), (torch.exp(T - mc[None, :]).sum(0),)

        ones = torch.ones(n, dtype=U.dtype, device=U.device)
        if t_rows or t_shared:
            c_r, c_c = chunked_sum(fn_t, (*t_rows, t_r0), (*t_shared, t_c0), n, chunk, 1, known=(ones, ones))
            tl_r, tl_c = t_r0 + torch.log(c_r), t_c0 + torch.log(c_c)
        else:
            tl_r, tl_c = t_r0, t_c0
        lse_r, lse_c = self.lse(U, V, scale, bias)

        def fn_x(k0, k1, Uk, *args):
            row_t, tlr_k = args[:n_tr], args[n_tr]
            V_, s_, b_ = args[n_tr + 1:n_tr + 4]
            shared_t, tlc = args[n_tr + 4:-1], args[-1]
            Z = _z_tile(Uk, V_, s_, b_)
            T = tau * _s_tile(k0, k1, n, tkind, row_t, shared_t, Z)
            qr = torch.exp(T - tlr_k[:, None])
            qc = torch.exp(T - tlc[None, :])
            return (), ((qr * (T - tlr_k[:, None] - Z)).sum() + (qc * (T - tlc[None, :] - Z)).sum(),)

        (cross,) = chunked_sum(fn_x, (U, *t_rows, tl_r), (V, scale, bias, *t_shared, tl_c), n, chunk, 0)
        return 0.5 * (cross + lse_r.sum() + lse_c.sum()) / (n * n)
