"""Triton kernels of the fused pairwise primitives (maths: docs/KERNELS_MATHS.md).

Every kernel is a *row pass*: one program owns BM rows of Z = s·A·Bᵀ + b and walks over all column
blocks, recomputing each tile (a GEMM over d in BK steps). The column pass of a primitive is the same
kernel called with the roles swapped (A↔B, L↔R, row stats↔column stats): Zᵀ = s·B·Aᵀ + b and
Sᵀ = diag(a) + R·Lᵀ, so no second kernel is needed. Scalars (∂s, ∂b, ∂g) are written as per-program
partials and reduced in torch; nothing is accumulated with atomics, so every result is deterministic.
The exception is _gtile_kernel, one tile per program: the strip backward writes G = ∂out/∂Z for a strip of
rows and leaves the output GEMMs to library matmuls (O(strip·N) memory, not O(N·d)).

KIND (constexpr): 0 = log-sum-exp, 1 = bce, 2 = wbce, 3 = mse, 4 = softplus.
TGT (constexpr): 0 = identity target (S = I), 1 = low-rank target S = diag(a) + La·Lbᵀ.
WD (constexpr, "whole d"): the row block of A is loaded once, d zero padded to the power of two DP, and stays
resident for the whole column walk; each column tile of B is loaded once (BN × DP) and serves both the Z tile
(A·Bᵀ, one dot with K = DP) and, in the backward passes, the output GEMM G·B (BDO = DP, one d-chunk). The
column walk is then the only loop, so the compiler can prefetch the next B tile during the current tile's
elementwise work (the FlashAttention layout). WD = False: the Z tile is a K-loop of BK steps per column tile
and the output GEMM reloads a d-chunk of B (smaller register and shared-memory footprint; needed for large d).
FLAT (constexpr, K-loop layout): the column walk and the d loop inside it are compiled as one flattened loop
(``tl.range(flatten=True)``, Triton ≥ 3.3), whose software pipeline runs across column tiles: the first d-steps
of the next tile are loaded while the current tile's elementwise epilogue runs, instead of the pipeline
draining and refilling at every tile (an 8-step loop at d = 512, BK = 64). The epilogue becomes a branch inside
the loop; a load inside it (the backward's output-GEMM rows of B) stays synchronous.
UPCAST (constexpr): load every operand as ACC (fp32 or fp64) and run tl.dot in ACC with input precision
PREC; when False (bf16/fp16 on GPU) the GEMM operands stay in the input dtype, accumulation is fp32.
Scale, bias and every other learnable value are runtime arguments (pointers to 0-dim tensors, so no
host sync and no recompile when they change).

This module imports triton: import it lazily (lors_fast.ops.triton_backend does).
"""

import triton
import triton.language as tl

from lors_fast.core.kinds import interpreting

try:  # NVIDIA's libdevice wrappers (fast_logf); absent builds fall back to tl.log
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - non-CUDA triton builds
    _libdevice = None
# like @triton.jit itself, decided when this module is first imported
_FAST_LOG = tl.constexpr(not interpreting() and _libdevice is not None)

KIND_LSE = 0
KIND_BCE = 1
KIND_WBCE = 2
KIND_MSE = 3
KIND_SOFTPLUS = 4


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _ld(ptr, rows, cols, nr, nc, ld, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Load a (rows × cols) tile of a row-major (nr × nc) matrix with leading dimension ld, zero padded."""
    msk = (rows[:, None] < nr) & (cols[None, :] < nc)
    x = tl.load(ptr + rows[:, None].to(tl.int64) * ld + cols[None, :], mask=msk, other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def _ld_t(ptr, rows, cols, nr, nc, ld, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Load the transpose (cols × rows) of a (rows × cols) tile, zero padded."""
    msk = (rows[None, :] < nr) & (cols[:, None] < nc)
    x = tl.load(ptr + rows[None, :].to(tl.int64) * ld + cols[:, None], mask=msk, other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def _ld_pairs(B, Bb, n0, cols, N, D, BN: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """The (2·BN × len(cols)) tile whose row 2j is B[n0 + j, cols] and row 2j + 1 is B̄[n0 + j, cols] (zero
    padded): the right operand matching tl.join(c1, c2).reshape(BM, 2·BN)."""
    r2 = tl.arange(0, 2 * BN)
    rows = n0 + (r2 // 2).to(tl.int64)
    base = tl.where(r2 % 2 == 0, B, Bb)
    msk = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(base[:, None] + rows[:, None] * D + cols[None, :], mask=msk, other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def _x_tile(A, B, offs_m, offs_n, M, N, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """X = A[offs_m] · B[offs_n]ᵀ, looping over d."""
    x = tl.zeros((BM, BN), ACC)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = _ld(A, offs_m, ks, M, D, D, UPCAST, ACC)
        bt = _ld_t(B, offs_n, ks, N, D, D, UPCAST, ACC)
        x = _dot(a, bt, x, UPCAST, PREC)
    return x


@triton.jit
def _xt_tiles(A, B, Ab, Bb, offs_m, offs_n, M, N, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """X = A·Bᵀ and T = Ā·Bᵀ + A·B̄ᵀ over the same (BM × BN) tile."""
    x = tl.zeros((BM, BN), ACC)
    t = tl.zeros((BM, BN), ACC)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = _ld(A, offs_m, ks, M, D, D, UPCAST, ACC)
        ab = _ld(Ab, offs_m, ks, M, D, D, UPCAST, ACC)
        bt = _ld_t(B, offs_n, ks, N, D, D, UPCAST, ACC)
        bbt = _ld_t(Bb, offs_n, ks, N, D, D, UPCAST, ACC)
        x = _dot(a, bt, x, UPCAST, PREC)
        t = _dot(ab, bt, t, UPCAST, PREC)
        t = _dot(a, bbt, t, UPCAST, PREC)
    return x, t


@triton.jit
def _xb_tile(a, B, offs_n, N, D, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, UPCAST: tl.constexpr,
             PREC: tl.constexpr, ACC: tl.constexpr):
    """WD: X = a·B[offs_n]ᵀ for a resident (BM × DP) row block a, and the loaded (BN × DP) rows of B."""
    bw = _ld(B, offs_n, tl.arange(0, DP), N, D, D, UPCAST, ACC)
    x = _dot(a, tl.trans(bw), tl.zeros((BM, BN), ACC), UPCAST, PREC)
    return x, bw


@triton.jit
def _xt_tiles_wd(a, ab, B, Bb, offs_n, N, D, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """WD: X = a·Bᵀ and T = ā·Bᵀ + a·B̄ᵀ for resident row blocks a, ā, and the loaded rows of B and B̄."""
    bw = _ld(B, offs_n, tl.arange(0, DP), N, D, D, UPCAST, ACC)
    bbw = _ld(Bb, offs_n, tl.arange(0, DP), N, D, D, UPCAST, ACC)
    x = _dot(a, tl.trans(bw), tl.zeros((BM, BN), ACC), UPCAST, PREC)
    t = _dot(ab, tl.trans(bw), tl.zeros((BM, BN), ACC), UPCAST, PREC)
    t = _dot(a, tl.trans(bbw), t, UPCAST, PREC)
    return x, t, bw, bbw


@triton.jit
def _ln(x):
    """Natural log of an fp32 tile. Compiled: libdevice's fast_logf (the hardware lg2.approx times ln 2: one MUFU
    op; error ≤ ~2⁻²² relative, ~1e-7 absolute near 1 — below the fp32 rounding of its argument 1 + e^{-|z|})
    instead of the polynomial logf (~15 instructions), which made the pair kinds' elementwise work outweigh
    their tile GEMMs (bench/RESULTS_AOT.md). The interpreter (no extern calls; fp64 tests) uses tl.log."""
    if _FAST_LOG:
        return _libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def _row_scale(lra, rmask, lmin_ptr, QFAST: tl.constexpr):
    """(c, ea, fast) for _col_softmax: c the row block's largest row LSE (log2 units), ea_i = 2^(lra_i − c) (0 on
    masked rows), and whether every column's 2^(c − lrb_j) ≤ 2^60 (lmin_ptr: the smallest column LSE, natural
    units) — decided once per program, so the tile loop holds no per-tile branch."""
    c = tl.max(tl.where(rmask, lra, float("-inf")), 0)
    ea = tl.exp2(tl.where(rmask, lra - c, float("-inf")))
    if QFAST:
        fast = c - tl.load(lmin_ptr).to(c.dtype) * 1.4426950408889634 <= 60.0
    else:
        fast = c != c  # False (unread: _col_softmax compiles the exact form only)
    return c, ea, fast


@triton.jit
def _col_softmax(x, s2, b2, p, ea, c, lrb, cmask, fast, QFAST: tl.constexpr):
    """The column softmax q_ij = 2^(z2_ij − lrb_j) (log2 units, z2 = x·s2 + b2) from the row softmax
    p_ij = 2^(z2_ij − lra_i) of the same tile: with `fast` (see _row_scale), q = p·ea_i·2^(c − lrb_j) — one exp
    per column instead of one per element; 2^(c − lrb_j) ≤ 2^60 cannot overflow, and an underflow of ea_i only
    drops q < 2^-66. Otherwise (logit ranges of > 60 binary orders, or QFAST off) the exact exp."""
    if QFAST:
        if fast:
            q = p * (ea[:, None] * tl.exp2(tl.where(cmask, c - lrb, float("-inf")))[None, :])
        else:
            q = tl.exp2(x * s2 + (b2 - lrb)[None, :])
    else:
        q = tl.exp2(x * s2 + (b2 - lrb)[None, :])
    return q


@triton.jit
def _phi(z, S, wpos, wneg, KIND: tl.constexpr):
    """φ(z, S) and its partial derivatives (f, f_z, f_S, f_zz, f_zS, f_SS), elementwise."""
    e = tl.exp(-tl.abs(z))  # e^{-|z|} in (0, 1]
    sp = tl.maximum(z, 0.0) + _ln(1.0 + e)  # softplus(z)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(z >= 0, inv, e * inv)  # σ(z)
    sigm = tl.where(z >= 0, e * inv, inv)  # 1 − σ(z) = σ(−z), no cancellation
    t = sig * sigm  # σ'
    tp = t * (sigm - sig)  # σ''
    zero = tl.zeros_like(z)
    if KIND == 1:  # bce with torch's −100 log clamp
        spn = sp - z  # softplus(−z)
        c1 = tl.where(spn < 100.0, 1.0, 0.0)
        c2 = tl.where(sp < 100.0, 1.0, 0.0)
        f = S * tl.minimum(spn, 100.0) + (1.0 - S) * tl.minimum(sp, 100.0)
        f1 = -S * sigm * c1 + (1.0 - S) * sig * c2
        f2 = tl.minimum(spn, 100.0) - tl.minimum(sp, 100.0)
        f11 = t * (S * c1 + (1.0 - S) * c2)
        f12 = -sigm * c1 - sig * c2
        f22 = zero
    elif KIND == 2:  # wbce
        w = tl.where(S > 0.5, zero + wpos, zero + wneg)
        pa = sig + 1e-6
        pb = sigm + 1e-6
        la = _ln(pa)
        lb = _ln(pb)
        f = w * (-S * la - (1.0 - S) * lb)
        f1 = w * (-S * t / pa + (1.0 - S) * t / pb)
        f2 = w * (lb - la)
        f11 = w * (-S * (tp / pa - t * t / (pa * pa)) + (1.0 - S) * (tp / pb + t * t / (pb * pb)))
        f12 = -w * (t / pa + t / pb)
        f22 = zero
    elif KIND == 3:  # mse
        dd = sig - S
        f = dd * dd
        f1 = 2.0 * dd * t
        f2 = -2.0 * dd
        f11 = 2.0 * t * t + 2.0 * dd * tp
        f12 = -2.0 * t
        f22 = zero + 2.0
    else:  # softplus
        f = sp
        f1 = sig
        f2 = zero
        f11 = t
        f12 = zero
        f22 = zero
    return f, f1, f2, f11, f12, f22


@triton.jit
def _lrdot(a, b, acc, LR16: tl.constexpr, LR_PREC: tl.constexpr, LDT: tl.constexpr):
    """Rank-r tile products (fp32 operands): in fp32 with LR_PREC, or (LR16, opt-in) in the 16-bit input
    dtype LDT (tensor cores in any operand layout; the rounding of the bf16/fp16 GEMM operands)."""
    if LR16:
        return tl.dot(a.to(LDT), b.to(LDT), acc)
    else:
        return tl.dot(a, b, acc, input_precision=LR_PREC)


@triton.jit
def _lrdot3(a, b, acc, LR16: tl.constexpr, LR_PREC: tl.constexpr, LDT: tl.constexpr):
    """Like _lrdot, but the 16-bit variant uses a hi/lo split (3 products, ~2⁻¹⁶ relative error): the
    target tile S decides the wbce mask S > 0.5, so it is kept close to fp32."""
    if not LR16:
        return tl.dot(a, b, acc, input_precision=LR_PREC)
    else:
        ah = a.to(LDT)
        al = (a - ah.to(tl.float32)).to(LDT)
        bh = b.to(LDT)
        bl = (b - bh.to(tl.float32)).to(LDT)
        acc = tl.dot(ah, bh, acc)
        acc = tl.dot(ah, bl, acc)
        return tl.dot(al, bh, acc)


@triton.jit
def _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP: tl.constexpr, TGT: tl.constexpr,
            LR_PREC: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            LR16: tl.constexpr, LDT: tl.constexpr):
    """Target tile S and the loaded (BN × RP) tile of Lb (zeros for the identity target)."""
    diag = offs_m[:, None] == offs_n[None, :]
    rs = tl.arange(0, RP)
    if TGT == 0:
        S = tl.where(diag, 1.0, 0.0).to(ACC)
        lb = tl.zeros((BN, RP), ACC)
    else:
        lb = _ld(Lb, offs_n, rs, N, r, r, True, ACC)
        S = _lrdot3(la, tl.trans(lb), tl.zeros((BM, BN), ACC), LR16, LR_PREC, LDT)
        av = tl.load(a_ptr + offs_m, mask=offs_m < M, other=0.0).to(ACC)
        S = S + tl.where(diag, av[:, None], 0.0)
    return S, lb


@triton.jit(do_not_specialize=["M", "N", "r"])
def _fwd_kernel(A, B, M, N, D, sc_ptr, bi_ptr, La, Lb, a_ptr, r, w_ptr,
                out_row, cpart, part,
                KIND: tl.constexpr, TGT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                LR_PREC: tl.constexpr, ACC: tl.constexpr, LDT: tl.constexpr, FUSE_COLS: tl.constexpr, LR16: tl.constexpr,
                WD: tl.constexpr, DP: tl.constexpr, FLAT: tl.constexpr):
    """Forward row pass. LSE: row LSE (natural log) and, with FUSE_COLS, the per-(row block, column) partial
    column LSE in log2 units (one fp32 per row block and column, reduced in torch). Pair kinds:
    per-program partial Σ φ."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BM + tl.arange(0, BM)
    rmask = offs_m < M
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    rs = tl.arange(0, RP)
    if TGT == 1:
        la = _ld(La, offs_m, rs, M, r, r, True, ACC)
    else:
        la = tl.zeros((BM, RP), ACC)
    s2 = s * 1.4426950408889634
    b2 = b * 1.4426950408889634
    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    accf = tl.zeros((BM,), ACC)
    wpos = tl.load(w_ptr).to(ACC)
    wneg = tl.load(w_ptr + 1).to(ACC)
    if WD:
        a_res = _ld(A, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
    for n0 in tl.range(0, N, BN, flatten=FLAT):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        cmask = offs_n < N
        if WD:
            x, bw = _xb_tile(a_res, B, offs_n, N, D, BM, BN, DP, UPCAST, PREC, ACC)
        else:
            x = _x_tile(A, B, offs_m, offs_n, M, N, D, BM, BN, BK, UPCAST, PREC, ACC)
        if KIND == 0:
            z2 = x * s2 + b2
            z2 = tl.where(cmask[None, :], z2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z2, 1))
            e = tl.exp2(z2 - m_new[:, None])
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(e, 1)
            m_i = m_new
            if FUSE_COLS:
                # the row pass's exponentials serve the columns: Σ_i 2^z_ij = 2^mx · Σ_i e_ij·2^(m_i − mx), mx the
                # largest row max of the block (one exp per row, not per element). A column sum below 2^-60
                # (the column 60 binary orders below mx, where flushed terms could count) takes the exact form.
                mr = tl.where(rmask, m_new, float("-inf"))
                mx = tl.max(mr, 0)
                cs = tl.sum(e * tl.exp2(mr - mx)[:, None], 0)
                cs = tl.where(cmask, cs, 1.0)
                cb = tl.zeros((BN,), ACC) + mx
                if tl.min(cs, 0) < 8.673617379884035e-19:  # 2^-60
                    zc = tl.where(rmask[:, None], z2, float("-inf"))
                    cb = tl.where(cmask, tl.max(zc, 0), 0.0)
                    cs = tl.sum(tl.exp2(zc - cb[None, :]), 0)  # ≥ 1 for a valid column
                    cs = tl.where(cmask, cs, 1.0)
                tl.store(cpart + pid * N + offs_n, cb + tl.log2(cs), mask=cmask)
        else:
            z = x * s + b
            S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, LR16, LDT)
            f, f1, f2, f11, f12, f22 = _phi(z, S, wpos, wneg, KIND)
            valid = rmask[:, None] & cmask[None, :]
            accf += tl.sum(tl.where(valid, f, 0.0), 1)  # row sums: in-quad shuffles only
    if KIND == 0:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(out_row + offs_m, lse, mask=rmask)
    else:
        tl.store(part + pid, tl.sum(accf, 0))


@triton.jit(do_not_specialize=["M", "N", "r"])
def _bwd_kernel(A, B, M, N, D, sc_ptr, bi_ptr, La, Lb, a_ptr, r, w_ptr,
                lse_a, lse_b, lmin_b, g_a, g_b, gout_ptr,
                dA, dLa, da, part_s, part_b,
                KIND: tl.constexpr, TGT: tl.constexpr, PRIMARY: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDO: tl.constexpr,
                RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, LR_PREC: tl.constexpr,
                ACC: tl.constexpr, LDT: tl.constexpr, LR16: tl.constexpr, WD: tl.constexpr, DP: tl.constexpr,
                FLAT: tl.constexpr, QFAST: tl.constexpr):
    """Backward row pass, grid (row blocks, d-chunks of BDO; WD: one chunk, BDO = DP): dA = s·G·B with G = ∂out/∂Z;
    low-rank: dLa = H·Lb (H = ∂out/∂S), da = diag(H); PRIMARY: partials of ∂s = ΣG⊙X, ∂b = ΣG."""
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_do = pid_d * BDO + tl.arange(0, BDO)
    rmask = offs_m < M
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    s2 = s * 1.4426950408889634
    b2 = b * 1.4426950408889634
    rs = tl.arange(0, RP)
    if TGT == 1:
        la = _ld(La, offs_m, rs, M, r, r, True, ACC)
    else:
        la = tl.zeros((BM, RP), ACC)
    wpos = tl.load(w_ptr).to(ACC)
    wneg = tl.load(w_ptr + 1).to(ACC)
    g = tl.load(gout_ptr).to(ACC)
    if KIND == 0:  # (the pair kinds get 2-element dummies for the LSE vectors: never index them)
        lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC) * 1.4426950408889634
        ga = tl.load(g_a + offs_m, mask=rmask, other=0.0).to(ACC)
        c, ea, fast = _row_scale(lra, rmask, lmin_b, QFAST)
    acc = tl.zeros((BM, BDO), ACC)
    accL = tl.zeros((BM, RP), ACC)
    accd = tl.zeros((BM,), ACC)
    accs = tl.zeros((BM,), ACC)
    accb = tl.zeros((BM,), ACC)
    if WD:
        a_res = _ld(A, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
    for n0 in tl.range(0, N, BN, flatten=FLAT):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        cmask = offs_n < N
        valid = rmask[:, None] & cmask[None, :]
        if WD:
            x, bv = _xb_tile(a_res, B, offs_n, N, D, BM, BN, DP, UPCAST, PREC, ACC)
        else:
            x = _x_tile(A, B, offs_m, offs_n, M, N, D, BM, BN, BK, UPCAST, PREC, ACC)
        if KIND == 0:
            z2 = x * s2 + b2
            lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC) * 1.4426950408889634
            gb = tl.load(g_b + offs_n, mask=cmask, other=0.0).to(ACC)
            p = tl.exp2(z2 - lra[:, None])
            q = _col_softmax(x, s2, b2, p, ea, c, lrb, cmask, fast, QFAST)
            G = tl.where(valid, ga[:, None] * p + gb[None, :] * q, 0.0)
        else:
            z = x * s + b
            S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, LR16, LDT)
            f, f1, f2, f11, f12, f22 = _phi(z, S, wpos, wneg, KIND)
            G = tl.where(valid, g * f1, 0.0)
            if TGT == 1:
                H = tl.where(valid, g * f2, 0.0)
                accL = _lrdot(H, lb, accL, LR16, LR_PREC, LDT)
                if PRIMARY:
                    accd += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], H, 0.0), 1)
        if not WD:  # (loaded here, after the tile's elementwise work: fewer live registers)
            bv = _ld(B, offs_n, offs_do, N, D, D, UPCAST, ACC)
        if UPCAST:
            acc = _dot(G, bv, acc, UPCAST, PREC)
        else:
            acc = _dot(G.to(B.dtype.element_ty), bv, acc, UPCAST, PREC)
        if PRIMARY:
            accs += tl.sum(G * x, 1)
            accb += tl.sum(G, 1)
    first = pid_d == 0
    omask = rmask[:, None] & (offs_do[None, :] < D)
    tl.store(dA + offs_m[:, None] * D + offs_do[None, :], (acc * s).to(dA.dtype.element_ty), mask=omask)
    if PRIMARY:
        tl.store(part_s + pid, tl.sum(accs, 0), mask=first)
        tl.store(part_b + pid, tl.sum(accb, 0), mask=first)
    if TGT == 1:
        lmask = rmask[:, None] & (rs[None, :] < r) & first
        tl.store(dLa + offs_m[:, None] * r + rs[None, :], accL, mask=lmask)
        if PRIMARY:
            tl.store(da + offs_m, accd, mask=rmask & first)


@triton.jit(do_not_specialize=["M", "N", "r", "r0", "r1"])
def _gtile_kernel(A, B, M, N, D, r0, r1, sc_ptr, bi_ptr, La, Lb, a_ptr, r, w_ptr, gout_ptr,
                  lse_a, lse_b, g_a, g_b, G, ldg, part_s, part_b, partL, da,
                  KIND: tl.constexpr, TGT: tl.constexpr, PRIMARY: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  LR_PREC: tl.constexpr, ACC: tl.constexpr, LDT: tl.constexpr, LR16: tl.constexpr):
    """Strip backward, grid (row tiles of the strip r0:r1 of A, column tiles of B): one (BM × BN) tile of s·G,
    G = ∂out/∂Z, stored in G's dtype at rows (i − r0) with row stride ldg — a plain tiled GEMM with an
    elementwise epilogue; the output GEMM (s·G)·B runs as a library matmul (triton_backend._backward_strips),
    and the column strips (roles swapped) give (s·Gᵀ)·A. LSE: G = ga_i·p_ij + gb_j·q_ij (p, q the row and
    column softmax, from the forward's LSEs). Pair kinds: G = g·φ_z(Z, S); with the low-rank target also
    H = g·φ_S, whose H·Lb this tile contributes to partL[tile] (BM × RP, summed over column tiles in torch) and
    whose diagonal goes to da (PRIMARY). PRIMARY: the tile's Σ G⊙X (∂s) and Σ G (∂b) in part_s / part_b."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    tile = pid_m * tl.num_programs(1) + pid_n
    offs_m = r0 + pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rmask = offs_m < r1
    cmask = offs_n < N
    valid = rmask[:, None] & cmask[None, :]
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    x = _x_tile(A, B, offs_m, offs_n, M, N, D, BM, BN, BK, UPCAST, PREC, ACC)
    if KIND == 0:
        lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC) * 1.4426950408889634
        ga = tl.load(g_a + offs_m, mask=rmask, other=0.0).to(ACC)
        lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC) * 1.4426950408889634
        gb = tl.load(g_b + offs_n, mask=cmask, other=0.0).to(ACC)
        z2 = tl.where(valid, (x * s + b) * 1.4426950408889634, float("-inf"))  # padding: G = 0, no overflow
        g = ga[:, None] * tl.exp2(z2 - lra[:, None]) + gb[None, :] * tl.exp2(z2 - lrb[None, :])
    else:
        rs = tl.arange(0, RP)
        if TGT == 1:
            la = _ld(La, offs_m, rs, M, r, r, True, ACC)
        else:
            la = tl.zeros((BM, RP), ACC)
        S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, LR16, LDT)
        f, f1, f2, f11, f12, f22 = _phi(x * s + b, S, tl.load(w_ptr).to(ACC), tl.load(w_ptr + 1).to(ACC), KIND)
        gs = tl.load(gout_ptr).to(ACC)
        g = tl.where(valid, gs * f1, 0.0)
        if TGT == 1:
            H = tl.where(valid, gs * f2, 0.0)
            hl = _lrdot(H, lb, tl.zeros((BM, RP), ACC), LR16, LR_PREC, LDT)
            tl.store(partL + (tile * BM + tl.arange(0, BM))[:, None] * RP + rs[None, :], hl)
            if PRIMARY:  # each row's diagonal entry lies in exactly one column tile
                dmask = rmask & (offs_m >= pid_n * BN) & (offs_m < pid_n * BN + BN)
                tl.store(da + offs_m, tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], H, 0.0), 1),
                         mask=dmask)
    tl.store(G + (offs_m - r0)[:, None] * ldg + offs_n[None, :], (g * s).to(G.dtype.element_ty), mask=valid)
    if PRIMARY:
        tl.store(part_s + tile, tl.sum(tl.sum(g * x, 1), 0))
        tl.store(part_b + tile, tl.sum(tl.sum(g, 1), 0))


@triton.jit(do_not_specialize=["M", "N"])
def _dbl_pre_kernel(A, B, Ab, Bb, M, N, D, sc_ptr, bi_ptr, sbar_ptr, bbar_ptr, lse_a, rho, lse_b, lmin_b, cpart,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr, ACC: tl.constexpr, WD: tl.constexpr, DP: tl.constexpr,
                    FLAT: tl.constexpr, QFAST: tl.constexpr, FUSE_COLS: tl.constexpr):
    """LSE double backward pre-pass: ρ_i = Σ_j p_ij W_ij, W = s(Ā·Bᵀ + A·B̄ᵀ) + s̄·A·Bᵀ + b̄, p the row
    softmax. FUSE_COLS: also the column quantity κ_j = Σ_i q_ij W_ij (q the column softmax, from the column
    LSE lse_b) as per-(row block, column) partial sums in cpart, summed in torch — one pass instead of a
    second one with the roles swapped."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BM + tl.arange(0, BM)
    rmask = offs_m < M
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    sbar = tl.load(sbar_ptr).to(ACC)
    bbar = tl.load(bbar_ptr).to(ACC)
    s2 = s * 1.4426950408889634
    b2 = b * 1.4426950408889634
    lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC) * 1.4426950408889634
    if FUSE_COLS:
        c, ea, fast = _row_scale(lra, rmask, lmin_b, QFAST)
    acc = tl.zeros((BM,), ACC)
    if WD:
        a_res = _ld(A, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
        ab_res = _ld(Ab, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
    for n0 in tl.range(0, N, BN, flatten=FLAT):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        cmask = offs_n < N
        valid = rmask[:, None] & cmask[None, :]
        if WD:
            x, t, bw, bbw = _xt_tiles_wd(a_res, ab_res, B, Bb, offs_n, N, D, BM, BN, DP, UPCAST, PREC, ACC)
        else:
            x, t = _xt_tiles(A, B, Ab, Bb, offs_m, offs_n, M, N, D, BM, BN, BK, UPCAST, PREC, ACC)
        z2 = x * s2 + b2
        p = tl.exp2(z2 - lra[:, None])
        W = s * t + sbar * x + bbar
        acc += tl.sum(tl.where(valid, p * W, 0.0), 1)
        if FUSE_COLS:
            lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC) * 1.4426950408889634
            q = _col_softmax(x, s2, b2, p, ea, c, lrb, cmask, fast, QFAST)
            tl.store(cpart + pid * N + offs_n, tl.sum(tl.where(valid, q * W, 0.0), 0), mask=cmask)
    tl.store(rho + offs_m, acc, mask=rmask)


@triton.jit(do_not_specialize=["M", "N", "r"])
def _dbl_kernel(A, B, Ab, Bb, M, N, D, sc_ptr, bi_ptr, sbar_ptr, bbar_ptr,
                La, Lb, Lab, Lbb, a_ptr, abar_ptr, r, w_ptr,
                lse_a, lse_b, lmin_b, g_a, g_b, rho_a, rho_b, gout_ptr,
                gA, gLa, ga_out, part_s, part_b, part_g,
                KIND: tl.constexpr, TGT: tl.constexpr, PRIMARY: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDO: tl.constexpr,
                RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, LR_PREC: tl.constexpr,
                ACC: tl.constexpr, LDT: tl.constexpr, LR16: tl.constexpr, WD: tl.constexpr, DP: tl.constexpr,
                FLAT: tl.constexpr, QFAST: tl.constexpr):
    """Double backward row pass, grid (row blocks, d-chunks; WD: one chunk). With W the cotangent of G and Y that of H:
    δZ = (∂G/∂Z)ᵀW + (∂H/∂Z)ᵀY, δS likewise; gA = Σ_j (s·δZ + s̄·G) B_j + s·Σ_j G B̄_j,
    gLa = δS·Lb + H·L̄b, ga = diag(δS); PRIMARY: partials of ∂s, ∂b and ∂g (pair kinds)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_do = pid_d * BDO + tl.arange(0, BDO)
    rmask = offs_m < M
    s = tl.load(sc_ptr).to(ACC)
    b = tl.load(bi_ptr).to(ACC)
    sbar = tl.load(sbar_ptr).to(ACC)
    bbar = tl.load(bbar_ptr).to(ACC)
    s2 = s * 1.4426950408889634
    b2 = b * 1.4426950408889634
    rs = tl.arange(0, RP)
    if TGT == 1:
        la = _ld(La, offs_m, rs, M, r, r, True, ACC)
        lab = _ld(Lab, offs_m, rs, M, r, r, True, ACC)
        abar = tl.load(abar_ptr + offs_m, mask=rmask, other=0.0).to(ACC)
    else:
        la = tl.zeros((BM, RP), ACC)
        lab = tl.zeros((BM, RP), ACC)
        abar = tl.zeros((BM,), ACC)
    wpos = tl.load(w_ptr).to(ACC)
    wneg = tl.load(w_ptr + 1).to(ACC)
    g = tl.load(gout_ptr).to(ACC)
    if KIND == 0:  # (the pair kinds get 2-element dummies for the LSE vectors: never index them)
        lra = tl.load(lse_a + offs_m, mask=rmask, other=0.0).to(ACC) * 1.4426950408889634
        ga = tl.load(g_a + offs_m, mask=rmask, other=0.0).to(ACC)
        rha = tl.load(rho_a + offs_m, mask=rmask, other=0.0).to(ACC)
        c, ea, fast = _row_scale(lra, rmask, lmin_b, QFAST)
    acc = tl.zeros((BM, BDO), ACC)
    accL = tl.zeros((BM, RP), ACC)
    accd = tl.zeros((BM,), ACC)
    accs = tl.zeros((BM,), ACC)
    accb = tl.zeros((BM,), ACC)
    accg = tl.zeros((BM,), ACC)
    if WD:
        a_res = _ld(A, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
        ab_res = _ld(Ab, offs_m, tl.arange(0, DP), M, D, D, UPCAST, ACC)
    for n0 in tl.range(0, N, BN, flatten=FLAT):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        cmask = offs_n < N
        valid = rmask[:, None] & cmask[None, :]
        if WD:
            x, t, bv, bbv = _xt_tiles_wd(a_res, ab_res, B, Bb, offs_n, N, D, BM, BN, DP, UPCAST, PREC, ACC)
        else:
            x, t = _xt_tiles(A, B, Ab, Bb, offs_m, offs_n, M, N, D, BM, BN, BK, UPCAST, PREC, ACC)
        W = s * t + sbar * x + bbar
        if KIND == 0:
            z2 = x * s2 + b2
            lrb = tl.load(lse_b + offs_n, mask=cmask, other=0.0).to(ACC) * 1.4426950408889634
            gb = tl.load(g_b + offs_n, mask=cmask, other=0.0).to(ACC)
            rhb = tl.load(rho_b + offs_n, mask=cmask, other=0.0).to(ACC)
            p = tl.exp2(z2 - lra[:, None])
            pg = ga[:, None] * p
            qg = gb[None, :] * _col_softmax(x, s2, b2, p, ea, c, lrb, cmask, fast, QFAST)
            G = tl.where(valid, pg + qg, 0.0)
            dZ = tl.where(valid, pg * (W - rha[:, None]) + qg * (W - rhb[None, :]), 0.0)
        else:
            z = x * s + b
            S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, M, N, r, RP, TGT, LR_PREC, ACC, BM, BN, LR16, LDT)
            f, f1, f2, f11, f12, f22 = _phi(z, S, wpos, wneg, KIND)
            if TGT == 1:
                lbb = _ld(Lbb, offs_n, rs, N, r, r, True, ACC)
                Y = _lrdot(lab, tl.trans(lb), tl.zeros((BM, BN), ACC), LR16, LR_PREC, LDT)
                Y = _lrdot(la, tl.trans(lbb), Y, LR16, LR_PREC, LDT)
                Y = Y + tl.where(offs_m[:, None] == offs_n[None, :], abar[:, None], 0.0)
                dZ = tl.where(valid, g * (f11 * W + f12 * Y), 0.0)
                dS = tl.where(valid, g * (f12 * W + f22 * Y), 0.0)
                H = tl.where(valid, g * f2, 0.0)
                accL = _lrdot(dS, lb, accL, LR16, LR_PREC, LDT)
                accL = _lrdot(H, lbb, accL, LR16, LR_PREC, LDT)
                accd += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], dS, 0.0), 1)
                if PRIMARY:
                    accg += tl.sum(tl.where(valid, f1 * W + f2 * Y, 0.0), 1)
            else:
                dZ = tl.where(valid, g * f11 * W, 0.0)
                if PRIMARY:
                    accg += tl.sum(tl.where(valid, f1 * W, 0.0), 1)
            G = tl.where(valid, g * f1, 0.0)
        c1 = s * dZ + sbar * G
        c2 = s * G
        if WD:
            if UPCAST:
                acc = _dot(c1, bv, acc, UPCAST, PREC)
                acc = _dot(c2, bbv, acc, UPCAST, PREC)
            else:
                acc = _dot(c1.to(B.dtype.element_ty), bv, acc, UPCAST, PREC)
                acc = _dot(c2.to(Bb.dtype.element_ty), bbv, acc, UPCAST, PREC)
        else:
            # c1·B + c2·B̄ as ONE dot with K = 2·BN (two chained dots into one accumulator made the compiler
            # keep a second copy of it: thousands of bytes of spills per thread on sm_90a, see aot_check.py)
            cc = tl.join(c1, c2).reshape(BM, 2 * BN)  # column 2j = c1[:, j], column 2j + 1 = c2[:, j]
            bb2 = _ld_pairs(B, Bb, n0, offs_do, N, D, BN, UPCAST, ACC)
            if UPCAST:
                acc = _dot(cc, bb2, acc, UPCAST, PREC)
            else:
                acc = _dot(cc.to(B.dtype.element_ty), bb2, acc, UPCAST, PREC)
        if PRIMARY:
            accs += tl.sum(dZ * x + G * t, 1)
            accb += tl.sum(dZ, 1)
    first = pid_d == 0
    omask = rmask[:, None] & (offs_do[None, :] < D)
    tl.store(gA + offs_m[:, None] * D + offs_do[None, :], acc.to(gA.dtype.element_ty), mask=omask)
    if PRIMARY:
        tl.store(part_s + pid, tl.sum(accs, 0), mask=first)
        tl.store(part_b + pid, tl.sum(accb, 0), mask=first)
        tl.store(part_g + pid, tl.sum(accg, 0), mask=first)
    if TGT == 1:
        lmask = rmask[:, None] & (rs[None, :] < r) & first
        tl.store(gLa + offs_m[:, None] * r + rs[None, :], accL, mask=lmask)
        if PRIMARY:
            tl.store(ga_out + offs_m, accd, mask=rmask & first)


@triton.jit(do_not_specialize=["N", "r"])
def _count_kernel(La, Lb, a_ptr, N, r, part, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
                  LR_PREC: tl.constexpr, ACC: tl.constexpr):
    """Per-row-block count of S_ij > 0.5 for S = diag(a) + La·Lbᵀ."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BM + tl.arange(0, BM)
    rmask = offs_m < N
    rs = tl.arange(0, RP)
    la = _ld(La, offs_m, rs, N, r, r, True, ACC)
    cnt = tl.zeros((BM,), tl.int32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        cmask = offs_n < N
        S, lb = _s_tile(la, Lb, a_ptr, offs_m, offs_n, N, N, r, RP, 1, LR_PREC, ACC, BM, BN, False, ACC)
        cnt += tl.sum(tl.where((S > 0.5) & rmask[:, None] & cmask[None, :], 1, 0), 1)
    tl.store(part + pid, tl.sum(cnt, 0))
