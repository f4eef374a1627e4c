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
def _tile2d(r0, R, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's (BM × BN) tile of the strip (grid: row blocks × column blocks): its linear index, the
    global row and column offsets, the row / column masks and the tile's mask."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = r0 + pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rmask = offs_m < r0 + R
    cmask = offs_n < N
    return pid_m * tl.num_programs(1) + pid_n, offs_m, offs_n, rmask, cmask, rmask[:, None] & cmask[None, :]


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
    pid_n = tl.program_id(1)
    tile, offs_m, offs_n, rmask, cmask, valid = _tile2d(r0, R, N, BM, BN)
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


@triton.jit(do_not_specialize=["R", "N", "M", "r0"])
def _strip_dbl_pre_kernel(X, Mt, r0, R, M, N, sc_ptr, bi_ptr, sbar_ptr, bbar_ptr, lse_a, lse_b, rho, kpart,
                          BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    """LSE double backward, pass 1 over a strip (grid: row blocks). With the strip's X = U·Vᵀ and
    Mt = Ū·Vᵀ + U·V̄ᵀ (library GEMMs), the tangent of Z is W = s·Mt + s̄·X + b̄ and, p = e^{Z − lse_a} (row
    softmax), q = e^{Z − lse_b} (column softmax): ρ_i = Σ_j p_ij W_ij (stored), and the column partials
    kpart[p, j] = Σ_{i in block p} q_ij W_ij (κ_j = their sum over blocks and strips, in torch)."""
    pid = tl.program_id(0)
    offs_m = r0 + pid * BM + tl.arange(0, BM)
    rmask = offs_m < r0 + R
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    sb = tl.load(sbar_ptr).to(ACC)
    bb = tl.load(bbar_ptr).to(ACC)
    la = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros((BM,), ACC)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        cmask = offs_n < N
        valid = rmask[:, None] & cmask[None, :]
        x = _load_x(X, N, offs_m, offs_n, r0, rmask, cmask, ACC)
        mt = _load_x(Mt, N, offs_m, offs_n, r0, rmask, cmask, ACC)
        z = tl.where(valid, x * s + b, float("-inf"))
        w = mt * s + x * sb + bb
        lb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC)
        acc += tl.sum(tl.exp(z - la[:, None]) * w, 1)
        tl.store(kpart + pid * N + offs_n, tl.sum(tl.exp(z - lb[None, :]) * w, 0), mask=cmask)
    tl.store(rho + offs_m, acc, mask=rmask)


@triton.jit(do_not_specialize=["R", "N", "M", "r0", "r"])
def _strip_dbl_kernel(X, Mt, r0, R, M, N, sc_ptr, bi_ptr, sbar_ptr, bbar_ptr, La, Lb, a_ptr, r, w_ptr, gout_ptr,
                      Lbar, Rbar, abar, lse_a, lse_b, g_a, g_b, rho, kap, A, G, DS, H, ga, part_s, part_b, part_g,
                      KIND: tl.constexpr, TGT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
                      ACC: tl.constexpr, LR_PREC: tl.constexpr):
    """Double backward epilogue of one (BM × BN) tile of a strip (grid: row blocks × column blocks).

    T = ⟨Ū, ∂U⟩ + ⟨V̄, ∂V⟩ + s̄·∂s + b̄·∂b (+ ⟨ā, ∂a⟩ + ⟨L̄, ∂Lc⟩ + ⟨R̄, ∂R⟩) = ⟨G, W⟩ (+ ⟨H, W_S⟩), with
    G = ∂out/∂Z of the backward, W = s·Mt + s̄·X + b̄ (Mt = Ū·Vᵀ + U·V̄ᵀ), W_S = diag(ā) + L̄·Rᵀ + Lc·R̄ᵀ.
    Cotangent of Z, δZ:
      LSE: G = ga_i·p_ij + gb_j·q_ij, δZ = ga_i·p_ij·(W_ij − ρ_i) + gb_j·q_ij·(W_ij − κ_j) (ρ, κ: pass 1);
      pair: G = g·φ_Z, H = g·φ_S, δZ = g·(φ_ZZ·W + φ_ZS·W_S), δS = g·(φ_ZS·W + φ_SS·W_S), and
      part_g = Σ (φ_Z·W + φ_S·W_S) (∂T/∂g).
    Stored: A = s·δZ + s̄·G and G (for ∂U = A·V + s·G·V̄, ∂V = Aᵀ·U + s·Gᵀ·Ū, library GEMMs), δS and H
    (low-rank: ∂Lc = δS·R + H·R̄, ∂R = δSᵀ·Lc + Hᵀ·L̄, ∂a = diag(δS) → ga), part_s = Σ δZ⊙X + G⊙Mt (∂s),
    part_b = Σ δZ (∂b)."""
    pid_n = tl.program_id(1)
    tile, offs_m, offs_n, rmask, cmask, valid = _tile2d(r0, R, N, BM, BN)
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    sb = tl.load(sbar_ptr).to(ACC)
    bb = tl.load(bbar_ptr).to(ACC)
    x = _load_x(X, N, offs_m, offs_n, r0, rmask, cmask, ACC)
    mt = _load_x(Mt, N, offs_m, offs_n, r0, rmask, cmask, ACC)
    z = x * s + b
    w = tl.where(valid, mt * s + x * sb + bb, 0.0)
    if KIND == 0:
        lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC)
        gra = tl.load(g_a + offs_m, mask=rmask, other=0.0).to(ACC)
        rh = tl.load(rho + offs_m, mask=rmask, other=0.0).to(ACC)
        lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC)
        grb = tl.load(g_b + offs_n, mask=cmask, other=0.0).to(ACC)
        kp = tl.load(kap + offs_n, mask=cmask, other=0.0).to(ACC)
        zm = tl.where(valid, z, float("-inf"))
        p = gra[:, None] * tl.exp(zm - lra[:, None])
        q = grb[None, :] * tl.exp(zm - lrb[None, :])
        g = p + q
        dz = p * (w - rh[:, None]) + q * (w - kp[None, :])
    else:
        rs = tl.arange(0, RP)
        if TGT == 1:
            la = _ld(La, offs_m, rs, M, r, r, True, ACC)
        else:
            la = tl.zeros((BM, RP), ACC)
        S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, False, ACC)
        f, f1, f2, f11, f12, f22 = _phi(z, S, tl.load(w_ptr).to(ACC), tl.load(w_ptr + 1).to(ACC), KIND)
        gs = tl.load(gout_ptr).to(ACC)
        if TGT == 1:
            lbar = _ld(Lbar, offs_m, rs, M, r, r, True, ACC)
            ws, rb = _s_tile(lbar, Lb, abar, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, False, ACC)
            rbar = _ld(Rbar, offs_n, rs, N, r, r, True, ACC)
            ws = tl.where(valid, tl.dot(la, tl.trans(rbar), ws, input_precision=LR_PREC), 0.0)
        else:
            ws = tl.zeros((BM, BN), ACC)
        f1 = tl.where(valid, f1, 0.0)
        g = gs * f1
        dz = tl.where(valid, gs * (f11 * w + f12 * ws), 0.0)
        tl.store(part_g + tile, tl.sum(tl.sum(f1 * w + tl.where(valid, f2, 0.0) * ws, 1), 0))
        if TGT == 1:
            h = tl.where(valid, gs * f2, 0.0)
            ds_ = tl.where(valid, gs * (f12 * w + f22 * ws), 0.0)
            off = (offs_m - r0)[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.store(H + off, h, mask=valid)
            tl.store(DS + off, ds_, mask=valid)
            dmask = rmask & (offs_m >= pid_n * BN) & (offs_m < pid_n * BN + BN)
            tl.store(ga + offs_m, tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], ds_, 0.0), 1), mask=dmask)
    off = (offs_m - r0)[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(A + off, (s * dz + sb * g).to(A.dtype.element_ty), mask=valid)
    tl.store(G + off, g.to(G.dtype.element_ty), mask=valid)
    tl.store(part_s + tile, tl.sum(tl.sum(dz * x + g * mt, 1), 0))
    tl.store(part_b + tile, tl.sum(tl.sum(dz, 1), 0))
