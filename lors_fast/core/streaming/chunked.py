"""The generic chunked-sum autograd machinery of the streaming path (:mod:`lors_fast.core.streaming`).

:func:`chunked_sum` is the sum over row chunks k of a row-separable function fₖ of (row slices of some inputs,
all of other inputs): Σₖ fₖ(X[k0:k1], Y). Row outputs are concatenated over the chunks, summed outputs added.
Memory is O(chunk·N) at every order of differentiation:

- forward (``_ChunkedSum``): keeps nothing but its inputs (or returns values known in advance);
- backward (``_ChunkedSumGrad``): recomputes each chunk and takes that chunk's vector–Jacobian product
  under autograd, accumulating the row gradients into their slices and the shared ones by addition;
- double backward: recomputes each chunk once more and differentiates that product.

Used by ``kl``; ``_add_grads`` is also the accumulation helper of the LSE and pair-sum double backwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


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
