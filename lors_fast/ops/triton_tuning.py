"""Launch-config tuning of the fused kernels: time candidate configs per kernel stage on *this* GPU, keep the
fastest, save them (:mod:`lors_fast.ops.tuned_tables`), and let the backend use them from then on.

Where the backend takes a config from (defaults < packaged table < user table < ``override``) and the tables'
format: :mod:`lors_fast.ops.tuned_tables`. Candidates are timed per stage of :data:`STAGES`.
"""

from __future__ import annotations

import os
import time

import torch

from lors_fast.ops.tuned_tables import (  # noqa: F401  (re-exported: the tuning's public face)
    CONFIG_KEYS,
    ENV,
    PACKAGED,
    VERSION,
    _entry_key,
    device_key,
    load_table,
    lookup,
    reset_cache,
    save,
    user_table_path,
)

__all__ = ["CANDIDATES", "STAGES", "device_key", "lookup", "precompile", "reset_cache", "save", "tune",
           "user_table_path"]

# The kernel stages of triton_backend._config and what each is timed on: (kind, low-rank target, what runs).
# "fwd"/"fwd_pair": the forward alone; "bwd"/"bwd_pair": forward + backward; "dbl"/"dbl_pair": forward +
# backward(create_graph) + double backward (at min(n, 8192) rows).
STAGES = {"bwd": ("infonce", False), "bwd_pair": ("wbce", True), "fwd_pair": ("wbce", True),
          "dbl": ("infonce", False), "dbl_pair": ("wbce", True), "fwd": ("infonce", False)}

# 16-bit candidates per stage (None = the backend's default; a candidate's keys replace the default's; "old" =
# the default before the sm_90a analysis of bench/RESULTS_AOT.md; WD = the resident-row-block layout of
# triton_kernels; FLAT = the flattened column × d loop, on by default in fwd, fwd_pair and bwd, so toggled
# right after the default; QFAST = the column softmax from the row one's exponentials, off by default in the
# 16-bit bwd and dbl; STRIP = the backward by strips of rows, see triton_backend._backward_strips).
# Each compiles for sm_90a, fits its shared memory and spills little
# (bench/aot_check.py --candidates). Ordered by how much the stage weighs in a training step; a time budget
# cuts the tail.
CANDIDATES: dict[str, list] = {
    "bwd": [None,
            dict(FLAT=False),
            dict(QFAST=True),  # one exp per tile element instead of two (88 B of spills on sm_90a)
            dict(BN=32, QFAST=True),  # the same with a spill-free tile
            dict(BM=64, BN=32, num_warps=8, num_stages=3, WD=True),
            dict(BM=64, BN=64, num_warps=8, num_stages=2, WD=True),
            dict(BM=64, BN=32, BK=64, BDO=512, num_warps=8, num_stages=2),
            # by strips: G tiles (a GEMM with an elementwise epilogue) + library matmuls; O(STRIP·N) memory
            dict(STRIP=1024, BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
            dict(STRIP=512, BM=128, BN=128, BK=64, num_warps=8, num_stages=4)],
    "bwd_pair": [None,
                 dict(FLAT=True),
                 dict(BM=64, BN=64, BK=64, BDO=512, num_warps=8, num_stages=2),  # old
                 dict(BM=64, BN=16, BK=64, BDO=512, num_warps=8, num_stages=2),
                 dict(BM=64, BN=16, num_warps=8, num_stages=3, WD=True),
                 dict(STRIP=1024, BM=128, BN=64, BK=64, num_warps=8, num_stages=4),  # by strips (spill-free tiles)
                 dict(STRIP=1024, BM=64, BN=64, BK=64, num_warps=4, num_stages=4)],
    "fwd_pair": [None,
                 dict(FLAT=False),
                 dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),  # old
                 dict(BM=128, BN=32, num_warps=8, num_stages=2, WD=True),
                 dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)],
    "dbl": [None,  # spills: default 264 B, the others none
            dict(FLAT=True),
            dict(QFAST=True),  # one exp per tile element instead of two (336 B of spills)
            dict(BM=64, BN=32, BK=64, BDO=256, num_warps=8, num_stages=2),
            dict(BM=64, BN=16, BK=64, BDO=512, num_warps=8, num_stages=2)],  # one d-chunk: 5 GEMMs/pass, not 8
    "dbl_pair": [None,  # spills: default 320 B, old 3224 B
                 dict(FLAT=True),
                 dict(BM=64, BN=64, BK=64, BDO=256, num_warps=8, num_stages=2),  # old
                 dict(BM=64, BN=16, BK=64, BDO=256, num_warps=8, num_stages=2)],
    "fwd": [None,
            dict(FLAT=False),
            dict(BM=128, BN=32, num_warps=8, num_stages=2, WD=True),
            dict(BM=64, BN=64, num_warps=4, num_stages=2, WD=True),
            dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)],  # the fastest of the first H200 sweep
}

# ------------------------------------------------------------------------------------------- timing
def problem(n, d, dtype, kind, lowrank, device, r=10, seed=0):
    """Benchmark inputs: unit-norm features (n × d, dtype), scale 1/0.07, a low-rank target of rank r (diag 1,
    factors 0.1·N(0, 1)) when ``lowrank``, a bias −10 for siglip; all leaves require grad. Returns
    (img, txt, scale, target, bias, leaves)."""
    from lors_fast.core.targets import LowRankTarget

    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=-1)
    img, txt = img.to(dtype).requires_grad_(True), txt.to(dtype).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, dtype=dtype, requires_grad=True)
    leaves, tgt, bias = [img, txt, scale], None, None
    if lowrank:
        a = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
        L = (torch.randn(n, r, generator=g, device=device) * 0.1).to(dtype).requires_grad_(True)
        R = (torch.randn(n, r, generator=g, device=device) * 0.1).to(dtype).requires_grad_(True)
        tgt = LowRankTarget(a, L, R, 1.0 / r)
        leaves += [a, L, R]
    if kind == "siglip":
        bias = torch.tensor(-10.0, device=device, dtype=dtype, requires_grad=True)
        leaves.append(bias)
    return img, txt, scale, tgt, bias, leaves


def _workload(stage, n, d, dtype, device):
    """A closure running what `stage`'s config governs (see STAGES)."""
    from lors_fast.core.functional import contrastive_loss

    kind, lowrank = STAGES[stage]
    if stage.startswith("dbl"):
        n = min(n, 8192)
    img, txt, scale, tgt, _, leaves = problem(n, d, dtype, kind, lowrank, device)
    if stage.startswith("fwd"):
        def run():
            with torch.no_grad():
                return contrastive_loss(img, txt, scale, tgt, kind=kind, backend="triton")
    elif stage.startswith("bwd"):
        def run():
            return torch.autograd.grad(contrastive_loss(img, txt, scale, tgt, kind=kind, backend="triton"), leaves)
    else:
        cot = [torch.randn_like(x) for x in leaves]

        def run():
            loss = contrastive_loss(img, txt, scale, tgt, kind=kind, backend="triton")
            gs = torch.autograd.grad(loss, leaves, create_graph=True)
            return torch.autograd.grad(sum((c * x).sum() for c, x in zip(cot, gs)), leaves)
    return run


# ---------------------------------------------------------------------------------- parallel compiles
def _warm(job):
    """One candidate's workload at a tiny size, in a worker process: it compiles the kernels (the same
    specialisations as at full size: M, N are not specialised, d is the same) into Triton's on-disk cache."""
    stage, cfg, dname, d, n, device = job
    from lors_fast.ops.options import override

    t0 = time.time()
    try:
        with override(configs={(stage, dname): dict(cfg or {})}):
            _workload(stage, n, d, getattr(torch, dname), torch.device(device))()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return dict(stage=stage, config=cfg or "default", s=time.time() - t0)
    except Exception as e:  # noqa: BLE001 - reported, the timing run records the failure again
        return dict(stage=stage, config=cfg or "default", s=time.time() - t0, error=f"{type(e).__name__}: {e}"[:300])


def precompile(device="cuda", dtype=torch.bfloat16, d: int = 512, stages=None, candidates=None,
               workers: int | None = None, n: int = 256, wait: bool = True):
    """Compile every candidate config of ``stages`` in ``workers`` spawned processes (default: up to 8, one
    per two CPU cores) by running each workload once at ``n`` rows; :func:`tune` in this process then finds
    the kernels in Triton's on-disk cache instead of compiling them one after another (compilation dominates
    a tuning run). ``wait=False`` returns ``(executor, futures)`` to overlap the compiles with other work;
    call ``executor.shutdown()`` when done."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stages = list(stages or STAGES)
    cands = candidates or CANDIDATES
    dname = str(dtype).replace("torch.", "")
    jobs = [(st, cfg, dname, d, n, str(device)) for st in stages for cfg in cands.get(st, [None])]
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2, len(jobs)))
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [ex.submit(_warm, j) for j in jobs]
    if not wait:
        return ex, futures
    try:
        return [f.result() for f in futures]
    finally:
        ex.shutdown()


def _time_ms(fn, device, rep_ms):
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=rep_ms))
    t = time.perf_counter()  # the interpreter: one call (smoke tests only)
    fn()
    return (time.perf_counter() - t) * 1e3


def tune(device="cuda", dtype=torch.bfloat16, d: int = 512, n: int = 16384, stages=None, candidates=None,
         budget_s: float | None = None, rep_ms: int = 30, margin: float = 0.03, log=None) -> dict:
    """Time each candidate config of each stage (forward / backward / double backward of the LSE and pair
    kernels) on ``n`` × ``d`` inputs of ``dtype`` and keep the fastest per stage. Stages run in the order of
    ``stages`` (default: :data:`STAGES`); each stage's winner stays applied (an options override) while the
    later ones are timed; nothing stays applied afterwards. ``budget_s``: stop starting new candidates after that
    many seconds. A candidate replaces the stage's default only when it is faster by more than ``margin``
    (timing noise must not move the defaults). Returns ``{"device", "entries": [{"stage", "key", "config", "ms",
    "table", ...}]}`` for :func:`save`; a candidate that fails (compile error, out of memory) is recorded and
    skipped."""
    from lors_fast.ops.options import override

    log = log or (lambda *a: None)
    device = torch.device(device)
    stages = list(stages or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stages {bad}; expected some of {tuple(STAGES)}")
    if d < 1 or n < 1:
        raise ValueError(f"d and n must be >= 1, got d={d}, n={n}")
    cands = candidates or CANDIDATES
    import triton

    t0 = time.time()
    dname = str(dtype).replace("torch.", "")
    dp = max(16, 1 << max(0, (d - 1).bit_length()))
    entries = []
    won: dict = {}  # the winners so far, applied while the later stages are timed
    for stage in stages:
        key = (stage, dname)
        run = _workload(stage, n, d, dtype, device)
        table = []
        for cfg in cands.get(stage, [None]):
            if budget_s is not None and time.time() - t0 > budget_s:
                log(f"tune {stage}: time budget spent, skipping the rest")
                break
            shown = "default" if cfg is None else cfg
            try:
                with override(configs={**won, key: dict(cfg or {})}):
                    run()  # compile
                    ms = _time_ms(run, device, rep_ms)
                table.append(dict(config=shown, ms=ms))
                log(f"tune {stage} {shown}: {ms:.3f} ms")
            except Exception as e:  # noqa: BLE001 - a failing candidate is data, not a crash
                table.append(dict(config=shown, error=f"{type(e).__name__}: {str(e)[:300]}"))
                log(f"tune {stage} {shown}: {type(e).__name__}: {str(e)[:200]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        timed = [t for t in table if "ms" in t]
        if not timed:
            continue
        best = min(timed, key=lambda t: t["ms"])
        default = next((t for t in timed if t["config"] == "default"), None)
        if default is not None and best["ms"] > default["ms"] * (1.0 - margin):
            best = default
        cfg = {} if best["config"] == "default" else dict(best["config"])
        if cfg:
            won[key] = dict(cfg)
        entries.append(dict(stage=stage, key=_entry_key(stage, dtype, dp), config=cfg, ms=best["ms"], n=n,
                            d=d, triton=triton.__version__, table=table,
                            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))
    return dict(device=device_key(device), dtype=dname, d=d, n=n, entries=entries)
