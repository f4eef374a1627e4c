"""The fused Triton backend of the loss core (docs/DESIGN.md): launch configs, and the launchers of the
kernels in :mod:`triton_kernels`. The public face, ``TritonPrimitives`` (re-exported here), and the custom
operators that give the launchers their autograd and ``torch.compile`` support live in :mod:`triton_ops`.

* ``lse(U, V, scale, bias)`` → (row LSE (M,), column LSE (N,)) of Z = scale·U·Vᵀ + bias.
* ``pairsum(kind, U, V, scale, bias, target, npos, nneg)`` → Σ_ij φ_kind(Z_ij, S_ij) (0-dim).
* ``count_pos(target, n)`` → #{S_ij > 0.5} (float64 0-dim, no grad).

Each primitive has a forward, a backward and a hand-written fused double backward launcher, so
``torch.autograd.grad(..., create_graph=True)`` followed by a second grad is exact w.r.t. U, V, scale, bias and
the low-rank factors. The forward saves only O(N) statistics (row/column LSE); its fused column LSE uses a
transient (M/BM)·N fp32 buffer of per-row-block partials (option ``fwd_fused_columns``; False: a second row pass
instead, no buffer). The backward and double backward recompute N×N tiles in a row-block pass and a
column-block pass (the column pass is the row kernel with the roles of U and V swapped). No N×N buffer, no
atomics: scalar gradients are per-program partials summed in torch (deterministic).

Launch configs are heuristics per stage, kernel family (LSE or pair kinds) and dtype (the 16-bit LSE ones: the
best of bench/gpu_check.py's sweep on an H200; the pair kinds' tiles: the non-spilling ones of an sm_90a build by
bench/aot_check.py), not ``triton.autotune``: every (kind, target, pass) is its own kernel specialisation,
and autotuning each would cost minutes of compilation; M and N are not specialised on (no recompile when the batch changes).
Tuned tables (``lors-fast tune-kernels``, :mod:`triton_tuning`) replace them per GPU model, and
``lors_fast.ops.options.override(configs=...)`` replaces both (benchmarks, tests).

Dense targets are not fused: they are delegated to the chunked torch backend
(:class:`lors_fast.core.streaming.StreamingPrimitives`), which is O(N²) in memory anyway because of S itself.

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first
imported (tests). Triton itself is imported lazily, at the first call.

Precision: inputs fp32/bf16/fp16 (and fp64 in the interpreter, for exact tests; on CUDA fp64 goes to the
streaming path) with fp32 (fp64) accumulation. The option ``fp32_precision`` (:mod:`lors_fast.ops.options`)
selects the ``tl.dot`` input precision for fp32 inputs ("tf32" by default on GPU, "ieee" for exact tests; the
argument ``fp32_precision=`` of ``TritonPrimitives`` overrides it); ``lowrank_precision`` that of the rank-r
target tiles (default: "ieee" when the main GEMMs are exact, "tf32" otherwise). ``count_pos`` is always exact.
"""

from __future__ import annotations

import functools
import math

import torch

from lors_fast.core.kinds import interpreting
from lors_fast.ops.launch_common import _lowrank_parts, _pow2, _rp, _scalar  # noqa: F401 (used here and by tests)
from lors_fast.ops.launch_defaults import default_config
from lors_fast.ops.options import current as _opts

__all__ = ["WD_MAX_DP"]

# The whole-d layout (WD) keeps a (BM × DP) row block resident: beyond DP = 512 (d > 512) it cannot fit the
# 227 KiB of shared memory of an H100/H200 next to its column tiles (bench/aot_check.py), so configs asking
# for WD fall back to the K-loop layout there (a hardware limit, not a setting).
WD_MAX_DP = 512

_KINDS = {"lse": 0, "bce": 1, "wbce": 2, "mse": 3, "softplus": 4}
_K = None


def _kernels():
    global _K
    if _K is None:
        from lors_fast.ops import triton_kernels

        _K = triton_kernels
    return _K


def _interpreting() -> bool:
    return interpreting()


def _check_device(*ts):
    dev = ts[0].device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(
            f"TritonPrimitives needs CUDA tensors (got device {dev}); set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels on CPU tensors in the interpreter, or use backend='streaming'"
        )
    for t in ts:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")


class _Cfg:
    """A launch config. WD ("whole d", see triton_kernels): the row block stays resident with d padded to
    DP = the next power of two, each column tile of the other side is loaded once and used by both GEMMs
    (the backward's d-chunk becomes BDO = DP, one chunk); BK is then unused."""

    __slots__ = ("BM", "BN", "BK", "BDO", "num_warps", "num_stages", "WD", "DP", "FLAT", "QFAST", "STRIP")

    def __init__(self, BM, BN, BK, BDO, num_warps, num_stages, WD=False, DP=16, FLAT=False, QFAST=True, STRIP=0):
        self.BM, self.BN, self.BK, self.BDO = BM, BN, BK, BDO
        self.num_warps, self.num_stages = num_warps, num_stages
        self.WD, self.DP, self.FLAT, self.QFAST = bool(WD), DP, bool(FLAT), bool(QFAST)
        self.STRIP = int(STRIP)


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch(device) -> int:
    """Compute capability ×10 of a CUDA device (90 for H100/H200); 90 when there is no GPU to ask (offline
    builds, the interpreter)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 90
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _config(stage: str, D: int, dtype: torch.dtype, device, cc: int | None = None) -> _Cfg:
    """Launch config of a stage: "fwd", "bwd", "pre", "dbl" (the LSE kernels) or "fwd_pair", "bwd_pair",
    "dbl_pair" (the pair kinds bce/wbce/mse/softplus, whose elementwise tiles hold more live registers), for a
    GPU of compute capability ``cc`` (default: the device's)."""
    dp = max(16, _pow2(D))
    cuda = device.type == "cuda"
    c = default_config(stage, dtype in (torch.bfloat16, torch.float16), (cc or _arch(device)) if cuda else None,
                       cuda)  # the defaults table (launch_defaults: one reason per row)
    c.update(_tuned(device, stage, dtype, dp))  # lors-fast tune-kernels / packaged tables
    c.update(_opts().config_for(stage, str(dtype).replace("torch.", "")))
    if c.get("WD") and dp > WD_MAX_DP:  # the resident row block would not fit: K-loop layout, same tiles
        c["WD"] = False
    c["BK"] = min(c["BK"], dp)
    c["BDO"] = dp if c.get("WD") else min(c["BDO"], dp)
    return _Cfg(**c, DP=dp)


def _tuned(device, stage, dtype, dp):
    from lors_fast.ops import tuned_tables

    return tuned_tables.lookup(device, stage, dtype, dp)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flags(dtype, prec):
    """(UPCAST, PREC, ACC triton dtype) for an input dtype."""
    import triton.language as tl

    if dtype == torch.float64:
        return True, "ieee", tl.float64
    if dtype == torch.float32:
        return True, prec, tl.float32
    if _interpreting() and not _opts().interpret_native_16bit:
        # bf16/fp16 arithmetic in the interpreter is unreliable: upcast everything (tests can opt out to
        # run the GPU code path, where GEMM operands stay 16-bit)
        return True, "ieee", tl.float32
    return False, "ieee", tl.float32


def _lr_prec(dtype, prec="ieee"):
    """Precision of the rank-r target tiles: exact ("ieee") whenever the main GEMMs are exact, else
    options' lowrank_precision or, when that is None, "tf32" (an fp32 FMA dot of K = 16 would cost ~40 % of a bf16
    d = 512 tile; TF32's 2⁻¹¹ relative error on S is below the bf16 error of Z)."""
    if dtype == torch.float64 or _interpreting() or prec == "ieee":
        return "ieee"
    return _opts().lowrank_precision or "tf32"


def _launch_kw(cfg):
    """Launch keywords and the layout constexprs every kernel but the count kernel takes."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, WD=cfg.WD, DP=cfg.DP, FLAT=cfg.FLAT)


class _Ctx:
    """Everything a launch needs, prepared once per call."""

    def __init__(self, U, V, scale, bias, prec):
        self.device = U.device
        self.dtype = U.dtype
        self.acc = _acc_dtype(U.dtype)
        self.U = U.detach().contiguous()
        self.V = V.detach().to(U.dtype).contiguous()
        self.M, self.D = self.U.shape
        self.N = self.V.shape[0]
        self.s = _scalar(scale, self.acc, self.device)
        self.b = _scalar(bias, self.acc, self.device)
        self.upcast, self.prec, self.ACC = _flags(U.dtype, prec)
        self.lr_prec = _lr_prec(U.dtype, prec if U.dtype == torch.float32 else "lowp")
        import triton.language as tl

        self.LDT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(U.dtype, self.ACC)
        self.LR16 = bool(_opts().experimental_lowrank_16bit and not self.upcast)

    def cfg(self, stage, pair=False):
        return _config(stage + "_pair" if pair else stage, self.D, self.dtype, self.device)

    def dummy(self):
        return torch.zeros(2, dtype=self.acc, device=self.device)

    def pass_setup(self, cfg, kind: int = 0, tgt: int = 0, rp: int = 16):
        """What every row/column-pass launch (backward, double backward) shares: the grids' row blocks of
        U (nbm) and of V (nbn), the d-chunks (nd), zeroed per-row-block partials of ∂s and ∂b, and the
        constexpr/launch keywords."""
        nbm = triton_cdiv(self.M, cfg.BM)
        common = dict(KIND=kind, TGT=tgt, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BDO=cfg.BDO, RP=rp,
                      UPCAST=self.upcast, PREC=self.prec, LR_PREC=self.lr_prec, ACC=self.ACC, LDT=self.LDT,
                      LR16=self.LR16, QFAST=cfg.QFAST, **_launch_kw(cfg))
        return (nbm, triton_cdiv(self.N, cfg.BM), triton_cdiv(self.D, cfg.BDO), self.partial(nbm),
                self.partial(nbm), common)

    def partial(self, n: int):
        return torch.zeros(n, dtype=self.acc, device=self.device)


def _guard(device):
    if device.type == "cuda":
        return torch.cuda.device(device.index)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- LSE
def _lse_forward(c: _Ctx):
    from lors_fast.ops import strip

    if strip.choose(c, "lse", lambda: strip.gpu_timer(lambda: _lse_fused_forward(c),
                                                      lambda: strip.lse_forward(c))) == "strip":
        return strip.lse_forward(c)
    return _lse_fused_forward(c)


def _lse_fused_forward(c: _Ctx):
    K = _kernels()
    cfg = c.cfg("fwd")
    nbm = triton_cdiv(c.M, cfg.BM)
    lr = torch.empty(c.M, dtype=c.acc, device=c.device)
    d = c.dummy()
    kw = dict(KIND=0, TGT=0, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, RP=16, UPCAST=c.upcast, PREC=c.prec,
              LR_PREC=c.lr_prec, ACC=c.ACC, LDT=c.LDT, LR16=c.LR16, **_launch_kw(cfg))
    if not _opts().fwd_fused_columns:
        lc = torch.empty(c.N, dtype=c.acc, device=c.device)
        with _guard(c.device):
            K._fwd_kernel[(nbm,)](c.U, c.V, c.M, c.N, c.D, c.s, c.b, d, d, d, 1, d, lr, d, d,
                                  FUSE_COLS=False, **kw)
            K._fwd_kernel[(triton_cdiv(c.N, cfg.BM),)](c.V, c.U, c.N, c.M, c.D, c.s, c.b, d, d, d, 1, d, lc,
                                                        d, d, FUSE_COLS=False, **kw)
        return lr, lc
    # per-(row block, column) partial column LSE (log2 units): a transient (M/BM)·N fp32 buffer
    cp = torch.empty(nbm, c.N, dtype=c.acc, device=c.device)
    with _guard(c.device):
        K._fwd_kernel[(nbm,)](c.U, c.V, c.M, c.N, c.D, c.s, c.b, d, d, d, 1, d, lr, cp, d,
                              FUSE_COLS=True, **kw)
    lc = torch.logsumexp(cp.mul_(math.log(2.0)), 0)
    return lr, lc


def triton_cdiv(a, b):
    return (a + b - 1) // b


def _lse_backward(c: _Ctx, lr, lc, glr, glc):
    """(dU, dV, ds, db) of ⟨glr, lse_row⟩ + ⟨glc, lse_col⟩."""
    from lors_fast.ops import strip

    K = _kernels()
    cfg = c.cfg("bwd")
    glr = glr.detach().to(c.acc).contiguous()
    glc = glc.detach().to(c.acc).contiguous()
    if strip.choose(c, "lse") == "strip":
        return strip.backward(c, 0, lse=(lr.detach().contiguous(), lc.detach().contiguous(), glr, glc))[:4]
    if cfg.STRIP:
        return _backward_strips(c, cfg, 0, lse=(lr, lc, glr, glc))[:4]
    d = c.dummy()
    dU = torch.empty_like(c.U)
    dV = torch.empty_like(c.V)
    nbm, nbn, nd, ps, pb, common = c.pass_setup(cfg)
    with _guard(c.device):
        lmin_r, lmin_c = lr.min(), lc.min()  # (the column-softmax shortcut's range check, _row_scale)
        K._bwd_kernel[(nbm, nd)](c.U, c.V, c.M, c.N, c.D, c.s, c.b, d, d, d, 1, d, lr, lc, lmin_c, glr, glc, d,
                                 dU, d, d, ps, pb, PRIMARY=True, **common)
        K._bwd_kernel[(nbn, nd)](c.V, c.U, c.N, c.M, c.D, c.s, c.b, d, d, d, 1, d, lc, lr, lmin_r, glc, glr, d,
                                 dV, d, d, d, d, PRIMARY=False, **common)
    return dU, dV, ps.sum(), pb.sum()


def _backward_strips(c: _Ctx, cfg, kind: int, lse=None, target=None, w=None, g=None):
    """The backward by strips of ``cfg.STRIP`` rows (a launch option, see _config): ``_gtile_kernel`` (a tiled
    GEMM with an elementwise epilogue) writes s·G, G = ∂out/∂Z, for a strip of rows of U against all of V, and
    the output GEMM dU[strip] = (s·G)·V runs as a library matmul (cuBLAS on a GPU); then the same for strips of
    V (Gᵀ, the roles swapped) into dV. Memory O(STRIP·N) instead of O(N·d); each output row is written once by
    one matmul (deterministic, no cross-strip accumulation); ∂s, ∂b from per-tile partials. ``lse`` = (lr, lc,
    glr, glc) for the LSE primitive; pair kinds: ``target`` (low-rank: H·Lb per tile, summed over column
    tiles, and diag(H)), ``w`` (wbce weights) and ``g`` (upstream scalar). (fp32 inputs: the matmuls follow
    torch's fp32 matmul precision, not fp32_precision; the tuned candidates are 16-bit.)
    Returns (dU, dV, ds, db, da, dL, dR), the last three None without a low-rank target."""
    K = _kernels()
    d = c.dummy()
    lr, lc, glr, glc = lse if lse is not None else (d, d, d, d)
    tgt, a, Lc, R, r = _lowrank_parts(target, c)
    rp = _rp(r)
    w = d if w is None else w
    g = _scalar(g, c.acc, c.device) if g is not None else d
    rows = max(cfg.BM, cfg.STRIP // cfg.BM * cfg.BM)
    dU = torch.empty_like(c.U)
    dV = torch.empty_like(c.V)
    da = torch.zeros(c.M, dtype=c.acc, device=c.device) if tgt else d
    dL = torch.empty(c.M, r, dtype=c.acc, device=c.device) if tgt else None
    dR = torch.empty(c.N, r, dtype=c.acc, device=c.device) if tgt else None
    G = torch.empty(max(min(rows, c.M) * c.N, min(rows, c.N) * c.M), dtype=c.dtype, device=c.device)
    ps, pb = [], []
    kw = dict(KIND=kind, TGT=tgt, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, RP=rp, UPCAST=c.upcast, PREC=c.prec,
              LR_PREC=c.lr_prec, ACC=c.ACC, LDT=c.LDT, LR16=c.LR16, num_warps=cfg.num_warps,
              num_stages=cfg.num_stages)
    passes = ((c.U, c.V, c.M, c.N, Lc, R, lr, lc, glr, glc, dU, dL, True),
              (c.V, c.U, c.N, c.M, R, Lc, lc, lr, glc, glr, dV, dR, False))
    with _guard(c.device):
        for A, B, M, N, La, Lb, la, lb, ga, gb, out, outL, primary in passes:
            for r0 in range(0, M, rows):
                r1 = min(r0 + rows, M)
                grid = (triton_cdiv(r1 - r0, cfg.BM), triton_cdiv(N, cfg.BN))
                ntile = grid[0] * grid[1]
                gs = G[:(r1 - r0) * N].view(r1 - r0, N)
                part_s, part_b = (c.partial(ntile), c.partial(ntile)) if primary else (d, d)
                partL = torch.empty(ntile * cfg.BM * rp, dtype=c.acc, device=c.device) if tgt else d
                K._gtile_kernel[grid](A, B, M, N, c.D, r0, r1, c.s, c.b, La, Lb, a, r, w, g, la, lb, ga, gb,
                                      gs, N, part_s, part_b, partL, da, PRIMARY=primary, **kw)
                torch.mm(gs, B, out=out[r0:r1])
                if tgt:
                    hl = partL.view(grid[0], grid[1], cfg.BM, rp).sum(1).reshape(grid[0] * cfg.BM, rp)
                    outL[r0:r1] = hl[:r1 - r0, :r]
                if primary:
                    ps.append(part_s.sum())
                    pb.append(part_b.sum())
    return dU, dV, torch.stack(ps).sum(), torch.stack(pb).sum(), (da if tgt else None), dL, dR


def _lse_double(c: _Ctx, lr, lc, glr, glc, Ub, Vb, sbar, bbar):
    """Grads of F = ⟨Ū, dU⟩ + ⟨V̄, dV⟩ + s̄·ds + b̄·db w.r.t. (U, V, s, b, glr, glc)."""
    from lors_fast.ops import strip

    K = _kernels()
    cfg = c.cfg("dbl")
    pcfg = c.cfg("pre")
    d = c.dummy()
    glr = glr.detach().to(c.acc).contiguous()
    glc = glc.detach().to(c.acc).contiguous()
    if strip.choose(c, "lse") == "strip":
        return strip.double(c, 0, Ub, Vb, sbar, bbar, lse=(lr.detach().contiguous(), lc.detach().contiguous(),
                                                           glr, glc))
    Ub = Ub.detach().to(c.dtype).contiguous()
    Vb = Vb.detach().to(c.dtype).contiguous()
    sb = _scalar(sbar, c.acc, c.device)
    bb = _scalar(bbar, c.acc, c.device)
    rho = torch.empty(c.M, dtype=c.acc, device=c.device)
    pre = dict(BM=pcfg.BM, BN=pcfg.BN, BK=pcfg.BK, UPCAST=c.upcast, PREC=c.prec, ACC=c.ACC, QFAST=pcfg.QFAST,
               **_launch_kw(pcfg))
    lmin_r, lmin_c = lr.min(), lc.min()
    gU = torch.empty_like(c.U)
    gV = torch.empty_like(c.V)
    nbm, nbn, nd, ps, pb, common = c.pass_setup(cfg)
    pbm = triton_cdiv(c.M, pcfg.BM)
    o = _opts()
    fused = o.dbl_fused_pre and pbm * c.N * 4 <= o.dbl_fused_pre_max_bytes
    with _guard(c.device):
        if fused:  # ρ and κ in one row pass; κ from per-row-block partials
            cp = torch.empty(pbm, c.N, dtype=c.acc, device=c.device)
            K._dbl_pre_kernel[(pbm,)](c.U, c.V, Ub, Vb, c.M, c.N, c.D, c.s, c.b, sb, bb, lr, rho, lc, lmin_c, cp,
                                      FUSE_COLS=True, **pre)
            kap = cp.sum(0)
        else:
            kap = torch.empty(c.N, dtype=c.acc, device=c.device)
            K._dbl_pre_kernel[(pbm,)](c.U, c.V, Ub, Vb, c.M, c.N, c.D, c.s, c.b, sb, bb, lr, rho, d, d, d,
                                      FUSE_COLS=False, **pre)
            K._dbl_pre_kernel[(triton_cdiv(c.N, pcfg.BM),)](c.V, c.U, Vb, Ub, c.N, c.M, c.D, c.s, c.b, sb, bb,
                                                             lc, kap, d, d, d, FUSE_COLS=False, **pre)
        K._dbl_kernel[(nbm, nd)](c.U, c.V, Ub, Vb, c.M, c.N, c.D, c.s, c.b, sb, bb, d, d, d, d, d, d, 1, d,
                                 lr, lc, lmin_c, glr, glc, rho, kap, d, gU, d, d, ps, pb, d, PRIMARY=True, **common)
        K._dbl_kernel[(nbn, nd)](c.V, c.U, Vb, Ub, c.N, c.M, c.D, c.s, c.b, sb, bb, d, d, d, d, d, d, 1, d,
                                 lc, lr, lmin_r, glc, glr, kap, rho, d, gV, d, d, d, d, d, PRIMARY=False, **common)
    return gU, gV, ps.sum(), pb.sum(), rho, kap


# ------------------------------------------------------------------------------------------ pairsum
def _pair_forward(c: _Ctx, kind, target, w):
    from lors_fast.ops import strip

    if strip.choose(c, "pair", lambda: strip.gpu_timer(lambda: _pair_fused_forward(c, kind, target, w),
                                                       lambda: strip.pair_forward(c, _KINDS[kind], target, w))
                    ) == "strip":
        return strip.pair_forward(c, _KINDS[kind], target, w)
    return _pair_fused_forward(c, kind, target, w)


def _pair_fused_forward(c: _Ctx, kind, target, w):
    K = _kernels()
    cfg = c.cfg("fwd", pair=True)
    tgt, a, lc, r_, r = _lowrank_parts(target, c)
    nbm = triton_cdiv(c.M, cfg.BM)
    part = torch.zeros(nbm, dtype=c.acc, device=c.device)
    d = c.dummy()
    with _guard(c.device):
        K._fwd_kernel[(nbm,)](
            c.U, c.V, c.M, c.N, c.D, c.s, c.b, lc, r_, a, r, w, d, d, part,
            KIND=_KINDS[kind], TGT=tgt, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, RP=_rp(r), UPCAST=c.upcast,
            PREC=c.prec, LR_PREC=c.lr_prec, ACC=c.ACC, LDT=c.LDT, LR16=c.LR16, FUSE_COLS=False, **_launch_kw(cfg))
    return part.sum()


def _pair_backward(c: _Ctx, kind, target, w, g):
    """(dU, dV, ds, db, da, dLc, dR) of g·Σφ."""
    from lors_fast.ops import strip

    if strip.choose(c, "pair") == "strip":
        return strip.backward(c, _KINDS[kind], target=target, w=w, g=g)
    K = _kernels()
    cfg = c.cfg("bwd", pair=True)
    if cfg.STRIP:
        return _backward_strips(c, cfg, _KINDS[kind], target=target, w=w, g=g)
    tgt, a, lc, r_, r = _lowrank_parts(target, c)
    d = c.dummy()
    g = _scalar(g, c.acc, c.device)
    dU = torch.empty_like(c.U)
    dV = torch.empty_like(c.V)
    nbm, nbn, nd, ps, pb, common = c.pass_setup(cfg, _KINDS[kind], tgt, _rp(r))
    if tgt:
        da = torch.empty(c.M, dtype=c.acc, device=c.device)
        dL = torch.empty(c.M, r, dtype=c.acc, device=c.device)
        dR = torch.empty(c.N, r, dtype=c.acc, device=c.device)
    else:
        da = dL = dR = d
    with _guard(c.device):
        K._bwd_kernel[(nbm, nd)](c.U, c.V, c.M, c.N, c.D, c.s, c.b, lc, r_, a, r, w, d, d, d, d, d, g,
                                 dU, dL, da, ps, pb, PRIMARY=True, **common)
        K._bwd_kernel[(nbn, nd)](c.V, c.U, c.N, c.M, c.D, c.s, c.b, r_, lc, a, r, w, d, d, d, d, d, g,
                                 dV, dR, d, d, d, PRIMARY=False, **common)
    if not tgt:
        da = dL = dR = None
    return dU, dV, ps.sum(), pb.sum(), da, dL, dR


def _pair_double(c: _Ctx, kind, target, w, g, Ub, Vb, sbar, bbar, abar, Lbar, Rbar):
    from lors_fast.ops import strip

    if strip.choose(c, "pair") == "strip":
        return strip.double(c, _KINDS[kind], Ub, Vb, sbar, bbar, target=target, w=w, g=g,
                            tbar=(abar, Lbar, Rbar))
    K = _kernels()
    cfg = c.cfg("dbl", pair=True)
    tgt, a, lc, r_, r = _lowrank_parts(target, c)
    d = c.dummy()
    g = _scalar(g, c.acc, c.device)
    Ub = Ub.detach().to(c.dtype).contiguous()
    Vb = Vb.detach().to(c.dtype).contiguous()
    sb = _scalar(sbar, c.acc, c.device)
    bb = _scalar(bbar, c.acc, c.device)
    gU = torch.empty_like(c.U)
    gV = torch.empty_like(c.V)
    nbm, nbn, nd, ps, pb, common = c.pass_setup(cfg, _KINDS[kind], tgt, _rp(r))
    pg = c.partial(nbm)
    if tgt:
        cv = lambda t, like: (torch.zeros_like(like) if t is None else  # noqa: E731
                              t.detach().to(device=c.device, dtype=c.acc).contiguous())
        ab, Lb_, Rb_ = cv(abar, a), cv(Lbar, lc), cv(Rbar, r_)
        ga = torch.empty(c.M, dtype=c.acc, device=c.device)
        gL = torch.empty(c.M, r, dtype=c.acc, device=c.device)
        gR = torch.empty(c.N, r, dtype=c.acc, device=c.device)
    else:
        ab = Lb_ = Rb_ = ga = gL = gR = d
    with _guard(c.device):
        K._dbl_kernel[(nbm, nd)](c.U, c.V, Ub, Vb, c.M, c.N, c.D, c.s, c.b, sb, bb,
                                 lc, r_, Lb_, Rb_, a, ab, r, w, d, d, d, d, d, d, d, g,
                                 gU, gL, ga, ps, pb, pg, PRIMARY=True, **common)
        K._dbl_kernel[(nbn, nd)](c.V, c.U, Vb, Ub, c.N, c.M, c.D, c.s, c.b, sb, bb,
                                 r_, lc, Rb_, Lb_, a, ab, r, w, d, d, d, d, d, d, d, g,
                                 gV, gR, d, d, d, d, PRIMARY=False, **common)
    if not tgt:
        ga = gL = gR = None
    return gU, gV, ps.sum(), pb.sum(), pg.sum(), ga, gL, gR


def _count_pos(a, lc, r_, n: int):
    """#{S_ij > 0.5} for S = diag(a) + Lc·Rᵀ, exact (fp32/fp64 target tiles in IEEE precision), float64 0-dim."""
    K = _kernels()
    acc = _acc_dtype(lc.dtype)
    _, _, ACC = _flags(acc, "ieee")
    cv = lambda t: t.detach().to(acc).contiguous()  # noqa: E731
    BM = 64
    BN = 64 if a.device.type != "cuda" else 128
    nb = triton_cdiv(n, BM)
    part = torch.zeros(nb, dtype=torch.int32, device=a.device)
    r = lc.shape[1]
    with _guard(a.device):
        K._count_kernel[(nb,)](cv(lc), cv(r_), cv(a), n, r, part, BM=BM, BN=BN, RP=_rp(r), LR_PREC=_lr_prec(acc),
                               ACC=ACC)
    return part.to(torch.float64).sum()

