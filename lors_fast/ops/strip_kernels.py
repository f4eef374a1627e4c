"""Epilogue kernels of the strip path (:mod:`lors_fast.ops.strip`): elementwise / reduction passes over one
strip of the logits' GEMM part, X = U[r0:r1]·Vᵀ (fp32, written by a library matmul), never a GEMM.

With Z = s·X + b (the scale and bias applied here), S the target tile (identity, or diag(a) + Lc·Rᵀ built
from the low-rank factors inside the epilogue, ``triton_kernels._s_tile``) and φ, φ_Z, φ_S the pair
function and its partial derivatives (``triton_kernels._phi``, the same maths as the fused kernels):

- ``_strip_fwd_kernel`` (grid: row blocks of the strip), one read of X:
  LSE: lse_r[i] = log Σ_j e^{Z_ij} (online over column tiles) and the column partials of the program's BM
  rows, cmax[p, j] = max_i Z_ij, csum[p, j] = Σ_i e^{Z_ij − cmax[p, j]} (combined over programs and strips
  in torch: LSEc_j = log Σ_p csum[p, j]·e^{cmax[p, j]});
  pair: part[p] = Σ_{i in block p, j} φ(Z_ij, S_ij).
- ``_strip_bwd_kernel`` (grid: row blocks × column blocks), one read of X, one write of G (and H):
  LSE: G_ij = ga_i·e^{Z_ij − lse_a_i} + gb_j·e^{Z_ij − lse_b_j} (the gradient of ⟨ga, LSEr⟩ + ⟨gb, LSEc⟩
  with respect to Z); pair: G = g·φ_Z(Z, S) and, for a low-rank target, H = g·φ_S(Z, S) (fp32) and
  da_i = H_ii. G is stored in G's dtype (16-bit for 16-bit inputs: the operand of the two output GEMMs
  dU = s·G·V, dV = s·Gᵀ·U); the scalars' partials part_s[t] = Σ G⊙X (∂s) and part_b[t] = Σ G (∂b) of each
  tile stay fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lors_fast.ops.triton_kernels import _ld, _phi, _s_tile


@triton.jit
def _load_x(X, ldx, offs_m, offs_n, r0, rmask, cmask, ACC: tl.constexpr):
    return tl.load(X + (offs_m - r0)[:, None].to(tl.int64) * ldx + offs_n[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)


@triton.jit(do_not_specialize=["R", "N", "M", "r0", "r"])
def _strip_fwd_kernel(X, ldx, r0, R, M, N, sc_ptr, bi_ptr, La, Lb, a_ptr, r, w_ptr, lse_r, cmax, csum, part,
                      KIND: tl.constexpr, TGT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      RP: tl.constexpr, ACC: tl.constexpr, LR_PREC: tl.constexpr):
    """Forward epilogue of rows r0 + [pid·BM, pid·BM + BM) ∩ [r0, r0 + R) of the strip (module docstring)."""
    pid = tl.program_id(0)
    offs_m = r0 + pid * BM + tl.arange(0, BM)
    rmask = offs_m < r0 + R
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    tot = tl.zeros((BM,), ACC)
    if TGT == 1:
        la = _ld(La, offs_m, tl.arange(0, RP), M, r, r, True, ACC)
    else:
        la = tl.zeros((BM, RP), ACC)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        cmask = offs_n < N
        z = _load_x(X, ldx, offs_m, offs_n, r0, rmask, cmask, ACC) * s + b
        if KIND == 0:
            zr = tl.where(cmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(zr, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zr - m_new[:, None]), 1)
            m_i = m_new
            zc = tl.where(rmask[:, None], z, float("-inf"))
            cm = tl.max(zc, 0)
            cs = tl.sum(tl.exp(zc - cm[None, :]), 0)
            tl.store(cmax + pid * N + offs_n, cm, mask=cmask)
            tl.store(csum + pid * N + offs_n, cs, mask=cmask)
        else:
            S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, False, ACC)
            f, f1, f2, f11, f12, f22 = _phi(z, S, tl.load(w_ptr).to(ACC), tl.load(w_ptr + 1).to(ACC), KIND)
            tot += tl.sum(tl.where(rmask[:, None] & cmask[None, :], f, 0.0), 1)
    if KIND == 0:
        tl.store(lse_r + offs_m, m_i + tl.log(l_i), mask=rmask)
    else:
        tl.store(part + pid, tl.sum(tot, 0))


@triton.jit(do_not_specialize=["R", "N", "M", "r0", "r"])
def _strip_bwd_kernel(X, ldx, r0, R, M, N, sc_ptr, bi_ptr, La, Lb, a_ptr, r, w_ptr, gout_ptr,
                      lse_a, lse_b, g_a, g_b, G, H, da, part_s, part_b,
                      KIND: tl.constexpr, TGT: tl.constexpr, NEED_H: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, RP: tl.constexpr, ACC: tl.constexpr, LR_PREC: tl.constexpr):
    """Backward epilogue of one (BM × BN) tile of the strip: G (and H, da) and the tile's ∂s, ∂b partials
    (module docstring). G and H have the strip's shape (R × N, row i at (i − r0)·N)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tile = pid_m * tl.num_programs(1) + pid_n
    offs_m = r0 + pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rmask = offs_m < r0 + R
    cmask = offs_n < N
    valid = rmask[:, None] & cmask[None, :]
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    x = _load_x(X, ldx, offs_m, offs_n, r0, rmask, cmask, ACC)
    z = x * s + b
    if KIND == 0:
        lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC)
        ga = tl.load(g_a + offs_m, mask=rmask, other=0.0).to(ACC)
        lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC)
        gb = tl.load(g_b + offs_n, mask=cmask, other=0.0).to(ACC)
        zm = tl.where(valid, z, float("-inf"))  # padding: G = 0, no overflow
        g = ga[:, None] * tl.exp(zm - lra[:, None]) + gb[None, :] * tl.exp(zm - lrb[None, :])
    else:
        if TGT == 1:
            la = _ld(La, offs_m, tl.arange(0, RP), M, r, r, True, ACC)
        else:
            la = tl.zeros((BM, RP), ACC)
        S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, False, ACC)
        f, f1, f2, f11, f12, f22 = _phi(z, S, tl.load(w_ptr).to(ACC), tl.load(w_ptr + 1).to(ACC), KIND)
        gs = tl.load(gout_ptr).to(ACC)
        g = tl.where(valid, gs * f1, 0.0)
        if NEED_H:
            h = tl.where(valid, gs * f2, 0.0)
            tl.store(H + (offs_m - r0)[:, None].to(tl.int64) * N + offs_n[None, :], h, mask=valid)
            dmask = rmask & (offs_m >= pid_n * BN) & (offs_m < pid_n * BN + BN)  # the diagonal's column tile
            tl.store(da + offs_m, tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], h, 0.0), 1), mask=dmask)
    tl.store(G + (offs_m - r0)[:, None].to(tl.int64) * N + offs_n[None, :], g.to(G.dtype.element_ty), mask=valid)
    tl.store(part_s + tile, tl.sum(tl.sum(g * x, 1), 0))
    tl.store(part_b + tile, tl.sum(tl.sum(g, 1), 0))
