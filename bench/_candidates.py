"""Candidate launch configs per kernel stage, shared by bench/gpu_check.py (times them on a GPU and keeps the
fastest) and bench/aot_check.py (builds them for sm_90a without a GPU: resources, spills, pipelining).

Keys are the backend's config stages (`lors_fast.ops.triton_backend._config`): "fwd", "bwd", "dbl" (the LSE
kernels: infonce, cwcl, kl) and "fwd_pair", "bwd_pair", "dbl_pair" (the pair kinds bce / wbce / mse and
siglip's softplus). Values: bf16 launch configs, None = the backend's default, "old" = the default before the
sm_90a analysis of bench/RESULTS_AOT.md, WD = the resident-row-block layout of triton_kernels. Every
candidate compiles for sm_90a, fits shared memory and spills little (tests/test_triton_aot.py checks two).
"""

SWEEP = {
    "fwd": [None,  # LSE forward alone (infonce)
            dict(BM=128, BN=32, num_warps=8, num_stages=2, WD=True),
            dict(BM=64, BN=64, num_warps=4, num_stages=2, WD=True),
            dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)],
    "bwd": [None,  # infonce fwd+bwd
            dict(BM=64, BN=32, num_warps=8, num_stages=3, WD=True),
            dict(BM=64, BN=64, num_warps=8, num_stages=2, WD=True),
            dict(BM=64, BN=32, BK=64, BDO=512, num_warps=8, num_stages=2)],
    "fwd_pair": [None,  # wbce (low-rank target) forward alone
                 dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),  # old
                 dict(BM=128, BN=32, num_warps=8, num_stages=2, WD=True),
                 dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)],
    "bwd_pair": [None,  # wbce fwd+bwd
                 dict(BM=64, BN=64, BK=64, BDO=512, num_warps=8, num_stages=2),  # old
                 dict(BM=64, BN=16, BK=64, BDO=512, num_warps=8, num_stages=2),
                 dict(BM=64, BN=16, num_warps=8, num_stages=3, WD=True)],
    "dbl": [None,  # infonce double backward, N = 8192 (spills: default 272 B, the others none)
            dict(BM=64, BN=32, BK=64, BDO=256, num_warps=8, num_stages=2),
            dict(BM=64, BN=16, BK=64, BDO=512, num_warps=8, num_stages=2)],  # one d-chunk: 5 GEMMs/pass, not 8
    "dbl_pair": [None,  # wbce double backward, N = 8192 (spills: default 320 B, old 3528 B before the merged dot)
                 dict(BM=64, BN=64, BK=64, BDO=256, num_warps=8, num_stages=2),  # old
                 dict(BM=64, BN=16, BK=64, BDO=256, num_warps=8, num_stages=2)],
}
