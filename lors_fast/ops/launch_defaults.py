"""The default launch configs of the fused kernels: one row per (stage, dtype class, architecture), each with
its one-line reason. ``triton_backend._config`` starts from the row, then applies the tuned tables
(:mod:`lors_fast.ops.tuned_tables`) and the options' overrides (:mod:`lors_fast.ops.options`).

Stages: "fwd", "bwd", "pre", "dbl" (the LSE kernels) and "fwd_pair", "bwd_pair", "dbl_pair" (bce / wbce / mse /
softplus, whose elementwise tiles hold more live registers). Dtype class: "16bit" (bf16, fp16) or "32bit"
(fp32 / TF32). Architecture: "sm90" (Hopper and later, wgmma) or "sm80" (before). BDO values are capped at
the padded feature dimension DP by ``_config``.

Provenance: the 16-bit LSE rows are the best of bench/gpu_check.py's sweep on an H200 (bench/RESULTS_GPU.md);
the others were chosen from sm_90a / sm_80 builds by bench/aot_check.py (bench/RESULTS_AOT.md: register
spills per thread, GEMM work) and are not yet timed on a GPU — ``lors-fast tune-kernels`` times the
alternatives. FLAT (a flattened column × d loop: the next tile's loads in flight during the current tile's
epilogue) is on for fwd, fwd_pair, pre and bwd (spill-free on sm_90a there; the pair backward and the double
backwards spill more flattened, so there it is a tuning candidate only). QFAST (the column softmax from the
row one's exponentials) is off in the 16-bit bwd and dbl, whose register-bound tiles spill more with its
fallback branch (sm_90a: bwd 0 → 88, dbl 264 → 336 B per thread), on elsewhere.
"""

from __future__ import annotations

__all__ = ["INTERPRETER", "DEFAULTS", "default_config"]


def _c(BM, BN, BK, BDO, num_warps, num_stages):
    return dict(BM=BM, BN=BN, BK=BK, BDO=BDO, num_warps=num_warps, num_stages=num_stages)


#: the interpreter (CPU): few, big programs, every stage
INTERPRETER = _c(64, 64, 32, 32, 4, 1)

#: (stage, dtype class, arch) -> (config, reason)
DEFAULTS: dict = {
    ("fwd", "16bit", "sm90"): (_c(128, 128, 64, 16, 8, 4), "H200 sweep: BM 128 within 3 % of BM 64, half the column partials"),
    ("fwd", "16bit", "sm80"): (_c(128, 128, 64, 16, 8, 4), "as sm90 (no sm80-specific measurement)"),
    ("fwd", "32bit", "sm90"): (_c(128, 64, 32, 16, 8, 3), "fp32 operands: half the column tile of the 16-bit one"),
    ("fwd", "32bit", "sm80"): (_c(128, 64, 32, 16, 8, 3), "as sm90"),
    ("fwd_pair", "16bit", "sm90"): (_c(128, 64, 64, 16, 8, 4), "sm_90a build: 128×128 spills 708 B, 128×64 none"),
    ("fwd_pair", "16bit", "sm80"): (_c(128, 64, 64, 16, 8, 4), "as sm90"),
    ("fwd_pair", "32bit", "sm90"): (_c(128, 64, 32, 16, 8, 3), "as the fp32 LSE forward"),
    ("fwd_pair", "32bit", "sm80"): (_c(128, 64, 32, 16, 8, 3), "as sm90"),
    ("bwd", "16bit", "sm90"): (_c(64, 64, 64, 512, 8, 2), "H200 sweep of the LSE backward"),
    ("bwd", "16bit", "sm80"): (_c(64, 32, 64, 512, 8, 2), "sm_80 build: BN 32 takes spills 60 → 0 B, 24 % fewer instructions"),
    ("bwd", "32bit", "sm90"): (_c(64, 32, 32, 512, 8, 2), "d-chunks of 512: Z recomputed once, not 4× (BDO 128), no spills"),
    ("bwd", "32bit", "sm80"): (_c(64, 32, 32, 512, 8, 2), "as sm90"),
    ("bwd_pair", "16bit", "sm90"): (_c(64, 32, 64, 512, 8, 2), "sm_90a build: BN 64 spills 1228 B, BN 32 156 B"),
    ("bwd_pair", "16bit", "sm80"): (_c(64, 32, 32, 256, 8, 2), "sm_80 (no wgmma): the 64×512 accumulator spills 6584 B, BDO 256 24 B"),
    ("bwd_pair", "32bit", "sm90"): (_c(64, 32, 32, 256, 8, 2), "fp32 pair backward: d-chunks of 256 without spills"),
    ("bwd_pair", "32bit", "sm80"): (_c(64, 32, 32, 128, 8, 2), "sm_80: 584 B of spills at BDO 256"),
    ("pre", "16bit", "sm90"): (_c(64, 64, 64, 16, 4, 2), "the double backward's row pre-pass: a forward-like sweep"),
    ("pre", "16bit", "sm80"): (_c(64, 64, 64, 16, 4, 2), "as sm90"),
    ("pre", "32bit", "sm90"): (_c(64, 64, 32, 16, 4, 2), "fp32 operands: BK 32"),
    ("pre", "32bit", "sm80"): (_c(64, 64, 32, 16, 4, 2), "as sm90"),
    ("dbl", "16bit", "sm90"): (_c(64, 64, 64, 256, 8, 2), "sm_90a build of the LSE double backward"),
    ("dbl", "16bit", "sm80"): (_c(64, 32, 64, 256, 8, 2), "sm_80 build: BN 32 takes spills 592 → 20 B, 54 % fewer instructions"),
    ("dbl", "32bit", "sm90"): (_c(64, 32, 32, 256, 8, 2), "fp32: BDO 256 halves the Z/T recomputes of 128, spills 8 → 0 B"),
    ("dbl", "32bit", "sm80"): (_c(64, 32, 32, 256, 8, 2), "as sm90"),
    ("dbl_pair", "16bit", "sm90"): (_c(64, 32, 64, 256, 8, 2), "sm_90a build: BN 64 spills 3528 B, BN 32 568 B"),
    ("dbl_pair", "16bit", "sm80"): (_c(64, 32, 64, 256, 8, 2), "as sm90"),
    ("dbl_pair", "32bit", "sm90"): (_c(64, 32, 32, 128, 8, 2), "fp32 operands: BK 32, d-chunks of 128"),
    ("dbl_pair", "32bit", "sm80"): (_c(64, 32, 32, 128, 8, 2), "as sm90"),
}

_FLAT = ("fwd", "fwd_pair", "pre", "bwd")


def default_config(stage: str, sixteen_bit: bool, cc: int | None, on_gpu: bool) -> dict:
    """The default row (a fresh dict, with FLAT and QFAST) for a stage; ``cc`` the compute capability × 10."""
    if not on_gpu:
        c = dict(INTERPRETER)
    else:
        key = (stage, "16bit" if sixteen_bit else "32bit", "sm90" if (cc or 90) >= 90 else "sm80")
        if key not in DEFAULTS:
            raise ValueError(f"unknown kernel stage {stage!r}")
        c = dict(DEFAULTS[key][0])
    c["FLAT"] = stage in _FLAT
    c["QFAST"] = not (stage in ("bwd", "dbl") and on_gpu and sixteen_bit)
    return c
