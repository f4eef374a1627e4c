"""The streaming CPU path: pairwise primitives over row chunks, never an N×N tensor.

Memory is O(chunk·N) at every order of differentiation. Three autograd building blocks:

- :func:`chunked_sum` (generic, :mod:`.chunked`): the sum over row chunks k of a row-separable function
  fₖ of (row slices of some inputs, all of other inputs). Its forward keeps nothing but its inputs; its
  backward recomputes each chunk and takes that chunk's vector–Jacobian product under autograd; its double
  backward recomputes each chunk once more and differentiates that product. Used by ``kl``.
- ``_Lse`` / ``_LseGrad`` (``lse``, :mod:`.lse`): an online no-grad forward; a closed-form backward
  G = gr_i·softmax_row + gc_j·softmax_col with in-place tile arithmetic and accumulating GEMMs.
- ``_PairSum`` / ``_PairSumGrad`` (``pairsum``, :mod:`.pairsum`): the forward also computes every first
  derivative from the closed forms G = ∂φ/∂Z, H = ∂φ/∂S (docs/KERNELS_MATHS.md) in the same pass over the tiles, so the
  backward only scales them by the incoming cotangent (one pass in all instead of a forward pass plus a
  recomputing one).

Both closed-form backwards are themselves differentiable: their double backward recomputes each chunk and
lets autograd differentiate the closed-form first derivatives written in plain torch ops
(``_lse_grad_terms``, ``_pair_grad_terms``/``_phi_derivs``), so second derivatives are exact; pairsum's
double backward is by default closed-form as well (``pairsum.CLOSED_FORM_HVP``). Tiles of Z and S and the
elementwise φ maths live in :mod:`.tiles`.

The primitives (docs/DESIGN.md):

- ``lse(U, V, s, b)``: LSEr_i = log Σ_j e^{Z_ij}, LSEc_j = log Σ_i e^{Z_ij}.
- ``pairsum(kind, U, V, s, b, target)``: Σ_ij φ(Z_ij, S_ij), the target tile S[k, :] built per chunk from
  the factors (a, c·L, R) or read from a dense S.
- ``kl(...)``: the KL kind, which needs the softmax of τS in both directions (streaming-only).
- ``count_pos(target, n)``: #{S_ij > 0.5} (wbce's weights), no gradient.
"""

from __future__ import annotations

import torch

from lors_fast.core.kinds import EPS, PAIR_PHIS, pair_kind_error, softplus
from lors_fast.core.streaming.chunked import chunked_sum
from lors_fast.core.streaming.lse import _Lse, _LseSpec, _online_lse
from lors_fast.core.streaming.pairsum import _PairSpec, _PairSum
from lors_fast.core.streaming.tiles import _s_tile, _target_parts, _z_tile

__all__ = ["StreamingPrimitives", "default_chunk", "chunked_sum", "softplus", "DEFAULT_CHUNK_ELEMS", "EPS"]

#: default working-set size of one chunk (rows × N elements per N-wide temporary): 8 MiB in float32.
#: Measured on 2 busy cores (bench/RESULTS_CPU_loss.md): 1M-element tiles were ~1.4× slower (more, smaller
#: parallel ops), 4M-element tiles would exceed 5 % of the reference's fwd+bwd peak memory at N = 8192.
DEFAULT_CHUNK_ELEMS = 1 << 21


def default_chunk(n_cols: int) -> int:
    """Rows per chunk for ``n_cols`` columns: about 2²¹ elements per chunk, at least 8 rows."""
    return max(8, DEFAULT_CHUNK_ELEMS // max(n_cols, 1))


# ----------------------------------------------------------------------------------------------------
# the primitives
# ----------------------------------------------------------------------------------------------------
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
        """Row and column log-sum-exps of Z = scale·U·Vᵀ + bias by column chunks (never N×N), differentiable
        to any order."""
        m, n = U.shape[0], V.shape[0]
        return _Lse.apply(_LseSpec(m, n, self._chunk(n)), U, V, scale, bias)

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        """Σ_ij φ_kind(Z_ij, T_ij) over Z = scale·U·Vᵀ + bias by chunks (``npos``/``nneg``: the wbce weights)."""
        if kind not in PAIR_PHIS:
            raise pair_kind_error(kind)
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
