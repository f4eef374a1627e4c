"""The streaming CPU path: pairwise primitives over row chunks, never an N×N tensor.

Everything here is built on one autograd Function, :func:`chunked_sum`: the sum over row chunks k of a
row-separable function fₖ of (row slices of some inputs, all of other inputs). Its forward keeps nothing
but its inputs; its backward recomputes each chunk and takes that chunk's vector–Jacobian product; its
double backward recomputes each chunk once more and differentiates that product. Memory is O(chunk·N)
at every order, and the derivatives are exactly autograd's derivatives of fₖ.

The primitives (docs/DESIGN.md):

- ``lse(U, V, s, b)``: LSEr_i = log Σ_j e^{Z_ij}, LSEc_j = log Σ_i e^{Z_ij}. A no-grad online pass gives
  the values m; the differentiable part is LSE = m + log C with C_i = Σ_j e^{Z_ij − m_i} (value 1, known
  without a pass), so ∂LSEr_i/∂Z_ij = softmax and every higher derivative follows from autograd.
- ``pairsum(kind, U, V, s, b, target)``: Σ_ij φ(Z_ij, S_ij), the target tile S[k, :] built per chunk from
  the factors (a, c·L, R) or read from a dense S.
- ``kl(...)``: the KL kind, which needs the softmax of τS in both directions (streaming-only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

EPS = 1e-6
#: default working-set size of one chunk (rows × N elements per N-wide temporary)
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
    if kind == "bce":
        return S * torch.clamp(softplus(-Z), max=100.0) + (1 - S) * torch.clamp(softplus(Z), max=100.0)
    if kind == "wbce":
        p = torch.sigmoid(Z)
        ell = -S * torch.log(p + EPS) - (1 - S) * torch.log(1 - p + EPS)
        w = torch.where((S > 0.5).detach(), Z.new_tensor(wpos), Z.new_tensor(wneg))
        return w * ell
    if kind == "mse":
        return (torch.sigmoid(Z) - S) ** 2
    if kind == "softplus":
        return softplus(Z)
    raise ValueError(f"unknown pairwise kind {kind!r}; expected bce, wbce, mse or softplus")


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
        chunk = self._chunk(n)
        Ud, Vd = U.detach(), V.detach()
        sd = scale.detach()
        bd = None if bias is None else bias.detach()
        m_r, m_c = _online_lse(lambda k0, k1: _z_tile(Ud[k0:k1], Vd, sd, bd), m, n, chunk, U.dtype, U.device)

        def fn(k0, k1, Uk, mr_k, V_, s_, b_, mc):
            Z = _z_tile(Uk, V_, s_, b_)
            return (torch.exp(Z - mr_k[:, None]).sum(1),), (torch.exp(Z - mc[None, :]).sum(0),)

        ones_r = torch.ones(m, dtype=U.dtype, device=U.device)
        ones_c = torch.ones(n, dtype=U.dtype, device=U.device)
        c_r, c_c = chunked_sum(fn, (U, m_r), (V, scale, bias, m_c), m, chunk, 1, known=(ones_r, ones_c))
        return m_r + torch.log(c_r), m_c + torch.log(c_c)

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        m, n = U.shape[0], V.shape[0]
        chunk = self._chunk(n)
        tkind, t_rows, t_shared = _target_parts(target)
        n_tr = len(t_rows)
        wpos = wneg = None
        if kind == "wbce":
            wpos = 0.5 / (float(npos) + EPS)
            wneg = 0.5 / (float(nneg) + EPS)

        def fn(k0, k1, Uk, *rest):
            row_t = rest[:n_tr]
            V_, s_, b_ = rest[n_tr:n_tr + 3]
            shared_t = rest[n_tr + 3:]
            Z = _z_tile(Uk, V_, s_, b_)
            S = None if kind == "softplus" else _s_tile(k0, k1, n, tkind, row_t, shared_t, Z)
            return (), (_phi(kind, Z, S, wpos, wneg).sum(),)

        (out,) = chunked_sum(fn, (U, *t_rows), (V, scale, bias, *t_shared), m, chunk, 0)
        return out

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
