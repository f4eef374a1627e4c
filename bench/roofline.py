"""Roofline predictions of the Triton backend's fwd+bwd time from two measured rates of the card: its dense
matmul rate R (FLOP/s, the library GEMM) and its memory bandwidth B (bytes/s).

Each kernel of a path costs max(FLOPs / R, bytes / B) (a GEMM writing or reading a logit-sized operand
overlaps that traffic with its arithmetic; an epilogue has no GEMM); the kernels run one after another, so
their costs add. With N² logits, d features, r the target rank, e the accumulation bytes (4; 8 for fp64) and
g the bytes of G (2 for 16-bit inputs, else e), per fwd+bwd of the strip path (lors_fast.ops.strip):

    forward   X = U·Vᵀ        2N²d FLOPs, writes e·N²
              epilogue        reads e·N² (+ e·N²/32 of column partials)
    backward  X again         2N²d, writes e·N²
              epilogue        reads e·N², writes g·N² (G) [+ e·N² (H), low-rank pair kinds]
              dU = s·G·V      2N²d, reads g·N²
              dV = s·Gᵀ·U     2N²d, reads g·N²
              [dLc = H·R, dR = Hᵀ·Lc: 2N²r each, read e·N² each (low-rank pair kinds)]

The fused kernels are modelled by their FLOPs only (forward 2N²d, backward two passes that each recompute Z:
8N²d; a lower bound: what they reach depends on their tiles, bench/RESULTS_GPU.md). Rows of other
providers get no prediction.
"""

from __future__ import annotations

__all__ = ["strip_ms", "fused_ms", "predict_ms"]


def _k(flops, nbytes, rate, bw):
    return max(flops / rate, nbytes / bw)


def strip_ms(N: int, d: int, r: int, dtype: str, pair_lowrank: bool, rate_tflops: float, bw_tbs: float) -> float:
    """Predicted fwd+bwd ms of the strip path (module docstring)."""
    rate, bw = rate_tflops * 1e12, bw_tbs * 1e12
    L = float(N) * N
    e = 8 if dtype == "float64" else 4
    g = 2 if dtype in ("bfloat16", "float16") else e
    gemm = 2 * L * d
    t = _k(gemm, e * L, rate, bw) + _k(0, e * L * (1 + 1 / 32), rate, bw)  # forward
    t += _k(gemm, e * L, rate, bw) + _k(0, (e + g + (e if pair_lowrank else 0)) * L, rate, bw)
    t += 2 * _k(gemm, g * L, rate, bw)
    if pair_lowrank:
        t += 2 * _k(2 * L * r, e * L, rate, bw)
    return 1e3 * t


def fused_ms(N: int, d: int, rate_tflops: float) -> float:
    """The fused kernels' FLOP bound (10·N²·d at the matmul rate)."""
    return 1e3 * 10.0 * N * N * d / (rate_tflops * 1e12)


def predict_ms(provider: str, kind: str, lowrank: bool, N: int, d: int, r: int, dtype: str, rate_tflops,
               bw_tbs):
    """The prediction for a timing row (None when the provider or the rates have none)."""
    if not rate_tflops or not bw_tbs:
        return None
    if provider == "triton-strip":
        pair_lowrank = lowrank and kind in ("bce", "wbce", "mse")
        return strip_ms(N, d, r, dtype, pair_lowrank, rate_tflops, bw_tbs)
    if provider in ("triton", "triton-fused"):
        return fused_ms(N, d, rate_tflops)
    return None


if __name__ == "__main__":  # the predictions written into bench/RESULTS_GPU.md (H200: 700 TFLOP/s, 4.8 TB/s)
    for kind, lr in (("infonce", False), ("wbce", True)):
        s = strip_ms(32768, 512, 10 if lr else 0, "bfloat16", lr, 700, 4.8)
        print(f"{kind:8s} N=32768 d=512 bf16 fwd+bwd: strip {s:.2f} ms, fused bound {fused_ms(32768, 512, 700):.2f} ms")
