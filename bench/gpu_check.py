#!/usr/bin/env python
"""One prepared GPU run for the fused Triton backend: correctness sweep, config sweep, timings, memory.

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python bench/gpu_check.py 2>&1 | tee $OUT/log.txt

Sections (each guarded by a time budget and its own try/except, so the whole run ends by ~280 s):
  1. meta + the card's own dense matmul rate (bf16, tf32, fp16) as the ceiling;
  2. correctness of the primitives (lse, pairsum φ × target) vs a float64 oracle: values, first derivatives
     and second derivatives, fp32 (ieee and tf32), bf16, fp16; low precision judged by the flash-attention
     rule: err ≤ 2·err(torch eager in that dtype) + floor;
  3. the launch-config tuning of `lors-fast tune-kernels` (lors_fast.ops.triton_tuning: per kernel stage, LSE
     and pair kinds, forward, backward and double backward, bf16; candidates pre-screened by bench/aot_check.py's
     sm_90a build; the table goes to $OUT/tuned_configs.json), then the experimental 16-bit rank-r tiles and the fp32 backward's
     d-chunk; each stage keeps its fastest, used by every later section; a correctness post-check of the
     chosen configs at N = 4097;
  4. timings (median, p20, p80 via triton.testing.do_bench) of lors_fast.contrastive_loss fwd+bwd for
     triton, eager reference, our streaming path (targets only), torch.compile(reference) and ours inside
     torch.compile(fullgraph=True) ("triton-compiled"), TFLOP/s by the FLOP model 8·N²·(d+r), peak memory;
     double backward at N = 8192;
  5. other providers (a ~20 s slice before the grid): Inf-CL (`inf_cl.cal_flash_loss`, both directions averaged)
     and open_clip `ClipLoss` on the symmetric hard-label CLIP loss (our infonce, identity target) at N = 32768,
     d = 512, bf16: loss and gradient agreement with ours, fwd+bwd timing rows (provider column), ratio
     ours/theirs. Each is skipped with a logged reason when not importable (Inf-CL also off CUDA);
  6. the grid (N × d × dtype × kind, triton and eager) with what time is left.
Writes $OUT/gpu_results.json and $OUT/gpu_results.md (bench/ when OUT is unset).

Inf-CL and open_clip on a machine without internet: this script installs nothing. Fetch the wheels beforehand
with `bash bench/fetch_wheels.sh` (bench/wheels/, gitignored, ≈ 28 MiB, carried to the device with the tree),
then on the device, from the repository root (keeps the installed torch/triton/numpy; torchvision is not
needed, open_clip/loss.py is loaded alone when `import open_clip` fails):

    python -m pip install -q --no-index --no-deps --find-links bench/wheels inf-cl open_clip_torch timm; \
    python -m pip install -q --no-index --find-links bench/wheels ftfy regex tqdm huggingface_hub safetensors \
        pyyaml numpy; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python bench/gpu_check.py 2>&1 | tee $OUT/log.txt

(`;`, not `&&`: a failed install only turns the two provider rows into logged skips.)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lors_fast.core.kinds import interpreting  # noqa: E402  (torch only: triton is not imported yet)

T0 = time.time()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET", "280"))
# GPU_CHECK_DRYRUN=1: a CPU smoke run of the script's own code under the Triton interpreter (tiny sizes)
DRY = os.environ.get("GPU_CHECK_DRYRUN", "0") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
elif interpreting():
    print("TRITON_INTERPRET=1 is set: this script needs the real GPU compiler; unsetting it", flush=True)
    os.environ["TRITON_INTERPRET"] = "0"
DEV = "cpu" if DRY else "cuda"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _gpu_correctness  # noqa: E402
import _gpu_providers  # noqa: E402
from roofline import predict_ms  # noqa: E402

OUT = os.environ.get("OUT") or os.path.dirname(os.path.abspath(__file__))
# the run's option overrides (the sweep's winners), entered for the rest of the run and closed by main()
_RUN = contextlib.ExitStack()
RES: dict = {"meta": {}, "ceiling": {}, "correctness": [], "sweep": [], "timing": [], "double_backward": [],
             "providers": [], "errors": []}
F64 = torch.float64


def _sz(n, cap=40):
    """Sizes shrink in a dry run (the interpreter's cost grows with the number of programs)."""
    return min(n, cap) if DRY else n


def el():
    return time.time() - T0


def log(*a):
    print(f"[{el():6.1f}s]", *a, flush=True)


def run_section(name, fn, until):
    if el() > until:
        log(f"SKIP section {name}: past its time budget")
        RES["errors"].append({"section": name, "error": "skipped: no time left"})
        return
    log(f"== {name} (until {until:.0f}s)")
    try:
        fn(until)
    except Exception as e:  # report and continue
        log(f"ERROR in {name}: {type(e).__name__}: {e}")
        RES["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                              "trace": traceback.format_exc()[-3000:]})
    if not DRY:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench(fn, warmup=5, rep=40):
    if DRY:
        t = time.time()
        fn()
        return [(time.time() - t) * 1e3] * 3
    import triton.testing as tt

    q = tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return [float(x) for x in q]


def peak_mem(fn):
    if DRY:
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------- meta
def sec_meta(until):
    import triton

    import lors_fast

    if DRY:
        RES["meta"] = dict(gpu="dry run (CPU interpreter)", torch=torch.__version__, triton=triton.__version__)
        return
    p = torch.cuda.get_device_properties(0)
    RES["meta"] = dict(gpu=p.name, sm=f"{p.major}.{p.minor}", mem_gib=round(p.total_memory / 2**30, 1),
                       sms=p.multi_processor_count, torch=torch.__version__, cuda=torch.version.cuda,
                       triton=triton.__version__, lors_fast=lors_fast.__version__, python=platform.python_version(),
                       date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    log(RES["meta"])


def sec_ceiling(until):
    if DRY:
        return
    n = 8192
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                           ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=DEV, dtype=dt)
        b = torch.randn(n, n, device=DEV, dtype=dt)
        ms = bench(lambda a=a, b=b: a @ b, warmup=10, rep=100)
        RES["ceiling"][name] = dict(ms=ms[0], tflops=2 * n**3 / ms[0] / 1e9)
        log(f"matmul {name} {n}^3: {ms[0]:.3f} ms, {RES['ceiling'][name]['tflops']:.0f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(2**28, device=DEV, dtype=torch.float32)  # 1 GiB read + 1 GiB written per copy
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), warmup=5, rep=50)
    RES["ceiling"]["bandwidth_tbs"] = 2 * x.numel() * 4 / ms[0] / 1e9
    log(f"copy 1 GiB: {ms[0]:.3f} ms, {RES['ceiling']['bandwidth_tbs']:.2f} TB/s")


# ------------------------------------------------------------------------------------ correctness
def correctness_case(*args, **kw):
    """One primitive case vs the float64 oracle (bench/_gpu_correctness.py), recorded in RES."""
    return _gpu_correctness.correctness_case(*args, dev=DEV, sz=_sz, log=log, record=RES["correctness"].append,
                                             **kw)


def sec_correctness(until):
    cases = [  # most important first: the budget cuts the tail
        ("pair", "wbce", "lowrank", 1000, 1000, 512, "bf16", True),
        ("pair", "mse", "lowrank", 1000, 1000, 512, "bf16", True),
        ("lse", "lse", "identity", 4097, 4097, 512, "bf16", True),
        ("lse", "lse", "identity", 1000, 1000, 512, "fp32-ieee", True),
        # wide logit ranges: the LSE kernels derive the column softmax from the row one (one exp per element)
        # unless a column's LSE lies > 60 binary orders below a row block's largest; at s = 100 (CLIP's cap)
        # they stay on that shortcut, at s = 400 (logits to ±150) some row blocks take the exact fallback
        ("lse", "lse", "identity", 1000, 1000, 512, "fp32-ieee", True, {"scale": 100.0}),
        ("lse", "lse", "identity", 1000, 1000, 512, "fp32-ieee", True, {"scale": 400.0}),
        ("lse", "lse", "identity", 1000, 1000, 512, "bf16", True, {"scale": 400.0}),
        ("pair", "wbce", "lowrank", 1000, 1000, 512, "fp16", True),
        ("pair", "wbce", "lowrank", 17, 17, 512, "bf16", True),
        ("lse", "lse", "identity", 1, 1, 512, "bf16", False),
        ("lse", "lse", "identity", 1000, 777, 200, "fp32-tf32", True),
        ("pair", "softplus", "identity", 4097, 3000, 768, "bf16", True),
        ("pair", "wbce", "lowrank", 1000, 1000, 512, "fp32-ieee", True),
        ("pair", "bce", "identity", 1000, 1000, 512, "bf16", False),
        ("pair", "wbce", "lowrank", 1000, 1000, 512, "fp32-tf32", True),
        ("lse", "lse", "identity", 1000, 1000, 512, "fp16", True),
        ("pair", "mse", "identity", 1000, 1000, 512, "fp32-ieee", True),
        ("pair", "bce", "lowrank", 1000, 1000, 512, "fp32-ieee", True),
        ("pair", "wbce", "identity", 1000, 1000, 512, "bf16", True),
    ]
    for c in cases:
        if el() > until:
            log("correctness: budget reached, remaining cases skipped")
            RES["errors"].append({"section": "correctness", "error": f"skipped from case {c}"})
            break
        try:
            args, kw = (c[:-1], c[-1]) if isinstance(c[-1], dict) else (c, {})
            correctness_case(*args, **kw)
        except Exception as e:
            log(f"ERROR case {c}: {type(e).__name__}: {e}")
            RES["errors"].append({"section": f"correctness {c}", "error": f"{type(e).__name__}: {e}",
                                  "trace": traceback.format_exc()[-3000:]})


# ------------------------------------------------------------------------------------------- sweep
def _problem(N, d, dtype, kind, lowrank, r=10, seed=0):
    from lors_fast.ops.triton_tuning import problem

    return problem(N, d, dtype, kind, lowrank, DEV, r=r, seed=seed)


def _fwd_bwd(loss_fn, img, txt, scale, tgt, bias, leaves, kind, backend):
    def f():
        loss = loss_fn(img, txt, scale, tgt, kind=kind, logit_bias=bias, backend=backend)
        return torch.autograd.grad(loss, leaves)
    return f


_WARM: dict = {}


def sec_precompile(until):
    """Start compiling every tuning candidate (bf16, d = 512) in worker processes (lors_fast.ops.triton_tuning.
    precompile) while the correctness section runs: the sweep then times them from Triton's on-disk cache.
    (The first H200 run spent most of its sweep compiling.) Dry run: two workers, two jobs (the mechanism)."""
    from lors_fast.ops import triton_tuning as tt

    d = _sz(512, 32)
    stages = ["bwd", "fwd"] if DRY else None
    cands = {st: tt.CANDIDATES[st][:1] for st in stages} if DRY else None
    _WARM["ex"], _WARM["futures"] = tt.precompile(DEV, torch.bfloat16, d=d, stages=stages, candidates=cands,
                                                  workers=2 if DRY else None, n=_sz(256, 24), wait=False)
    log(f"precompile: {len(_WARM['futures'])} (stage, config) jobs started in {_WARM['ex']._max_workers} workers")


def _join_precompile(until):
    futs = _WARM.pop("futures", [])
    ex = _WARM.pop("ex", None)
    if ex is None:
        return
    from concurrent.futures import wait as fwait

    done, pending = fwait(futs, timeout=max(0.0, until - el()))
    rows = [f.result() for f in done if f.exception() is None]
    bad = [r for r in rows if "error" in r]
    RES["precompile"] = dict(jobs=len(futs), done=len(done), failed=len(bad),
                             compile_s=round(sum(r["s"] for r in rows), 1), errors=bad)
    log(f"precompile: {len(done)}/{len(futs)} jobs done ({RES['precompile']['compile_s']} s of worker time), "
        f"{len(bad)} failed{'' if not bad else ': ' + str(bad[:3])}")
    for f in pending:
        f.cancel()
    ex.shutdown(wait=False, cancel_futures=True)


def sec_sweep(until):
    """The launch-config tuning of `lors-fast tune-kernels` (lors_fast.ops.triton_tuning: per stage, the default,
    the old default and the candidates screened by bench/aot_check.py), bf16, N = 16384, d = 512; each stage's
    winner stays applied (an options override held by _RUN) for the rest of the run, and the table is written to
    $OUT/tuned_configs.json (copy it to lors_fast/ops/tuned_configs.json to ship it). Then the experimental
    16-bit rank-r tiles (A/B, kept when faster) and the fp32 d-chunk."""
    import lors_fast
    from lors_fast.ops import TritonPrimitives
    from lors_fast.ops import triton_tuning as tt
    from lors_fast.ops.options import override

    N, d = _sz(16384, 64), _sz(512, 32)
    _join_precompile(min(until - 60, el() + 45))  # compiles still running by then are left to the tuning
    P = TritonPrimitives()
    res = tt.tune(DEV, torch.bfloat16, d=d, n=N, budget_s=max(1.0, until - el() - 20), log=log)
    for e in res["entries"]:
        RES["sweep"] += [dict(stage=e["stage"], N=N, d=d, **t) for t in e["table"]]
    _RUN.enter_context(override(configs={(e["stage"], "bfloat16"): dict(e["config"]) for e in res["entries"]
                                         if e["config"]}))
    RES["sweep_best"] = {e["stage"]: e["config"] or "default" for e in res["entries"]}
    log(f"sweep best: {RES['sweep_best']}")
    if not DRY and res["entries"]:
        log(f"tuned table: {tt.save(res, os.path.join(OUT, 'tuned_configs.json'))}")
    # rank-r target tiles of wbce in fp32 (tf32) or in bf16 (experimental_lowrank_16bit): keep the faster
    imgw, txtw, scw, tgtw, biw, lvw = _problem(N, d, torch.bfloat16, "wbce", True)
    lr_times = []
    for flag in (False, True):
        if el() > until:
            break
        try:
            fn = _fwd_bwd(lors_fast.contrastive_loss, imgw, txtw, scw, tgtw, biw, lvw, "wbce", "triton")
            with override(experimental_lowrank_16bit=flag):
                fn()
                ms = bench(fn, warmup=3, rep=30)
            lr_times.append((ms[0], flag))
            RES["sweep"].append(dict(stage="wbce-lowrank16", LOWRANK_16BIT=flag, N=N, d=d, ms=ms))
            log(f"sweep wbce lowrank LOWRANK_16BIT={flag}: {ms[0]:.3f} ms")
        except Exception as e:
            RES["sweep"].append(dict(stage="wbce-lowrank16", LOWRANK_16BIT=flag, error=f"{type(e).__name__}: {e}"))
            log(f"sweep wbce lowrank LOWRANK_16BIT={flag}: {type(e).__name__}: {str(e)[:200]}")
    best16 = min(lr_times)[1] if lr_times else False
    _RUN.enter_context(override(experimental_lowrank_16bit=best16))
    RES["sweep_best"]["LOWRANK_16BIT"] = best16
    # fp32 (tf32): forward alone, then the backward's d-chunk (BDO < d recomputes Z once per chunk)
    img32, txt32, sc32, _, _, lv32 = _problem(N, d, torch.float32, "infonce", False)
    if el() < until:
        f32 = lambda: P.lse(img32.detach(), txt32.detach(), sc32.detach(), None)  # noqa: E731
        f32()
        ms_f = bench(f32, warmup=3, rep=30)
        RES["sweep"].append(dict(stage="fp32-fwd", N=N, d=d, ms=ms_f))
        log(f"fp32 tf32 lse fwd N={N} d={d}: {ms_f[0]:.3f} ms")
    t32 = []
    for c in (dict(BM=64, BN=32, BK=32, BDO=512, num_warps=8, num_stages=2),  # the default now
              dict(BM=64, BN=64, BK=32, BDO=128, num_warps=8, num_stages=2),  # the default of the first run
              dict(BM=64, BN=64, BK=32, BDO=256, num_warps=8, num_stages=2)):
        if el() > until:
            break
        try:
            fb = _fwd_bwd(lors_fast.contrastive_loss, img32, txt32, sc32, None, None, lv32, "infonce", "triton")
            with override(configs={("bwd", "float32"): c}):
                fb()
                ms = bench(fb, warmup=3, rep=30)
            t32.append((ms[0], c))
            RES["sweep"].append(dict(stage="bwd-fp32", config=c, N=N, d=d, ms=ms))
            log(f"sweep bwd fp32 {c}: {ms[0]:.3f} ms")
        except Exception as e:
            RES["sweep"].append(dict(stage="bwd-fp32", config=c, error=f"{type(e).__name__}: {e}"))
            log(f"sweep bwd fp32 {c}: {type(e).__name__}: {str(e)[:200]}")
    if t32:
        RES["sweep_best"]["bwd_fp32"] = min(t32, key=lambda t: t[0])[1]
        _RUN.enter_context(override(configs={("bwd", "float32"): RES["sweep_best"]["bwd_fp32"]}))


def sec_postcheck(until):
    for c in (("lse", "lse", "identity", 4097, 4097, 512, "bf16", True),
              ("pair", "wbce", "lowrank", 4097, 4097, 512, "bf16", True)):
        if el() > until:
            break
        correctness_case(*c, seed=3)


# ------------------------------------------------------------------------------------------ timing
def _flops(N, d, r):
    return 8.0 * N * N * (d + r)


_COMPILED = {}


def time_row(provider, kind, lowrank, N, d, dtype, until, double=False):
    import lors_fast
    from lors_fast.core.reference import reference_loss

    if el() > until:
        return None
    N, d = _sz(N, 64), _sz(d, 32)
    r = 10 if lowrank else 0
    img, txt, scale, tgt, bias, leaves = _problem(N, d, dtype, kind, lowrank)
    path = {"triton": None, "triton-strip": "strip", "triton-fused": "fused"}.get(provider, "none")
    if path != "none":  # triton: auto's choice; triton-strip / -fused: that path (lors_fast.ops.strip)
        fn_loss, backend = lors_fast.contrastive_loss, "triton"
    elif provider == "eager":
        fn_loss, backend = lors_fast.contrastive_loss, "reference"
    elif provider == "streaming":  # our chunked torch path (cuBLAS GEMMs on row chunks), O(chunk·N) memory
        fn_loss, backend = lors_fast.contrastive_loss, "streaming"
    elif provider == "triton-compiled":  # ours inside torch.compile(fullgraph=True): the custom ops, no breaks
        key = ("ours", kind, lowrank)
        if key not in _COMPILED:
            def ours(img, txt, scale, tgt, kind, logit_bias, backend=None):
                return lors_fast.contrastive_loss(img, txt, scale, tgt, kind=kind, logit_bias=logit_bias,
                                                  backend="triton")
            _COMPILED[key] = torch.compile(ours, dynamic=False, fullgraph=True)
        fn_loss, backend = _COMPILED[key], None
    elif provider == "compile":
        key = (kind, lowrank)
        if key not in _COMPILED:
            def ref(img, txt, scale, tgt, kind, logit_bias, backend=None):
                return reference_loss(img, txt, scale, tgt, kind=kind, logit_bias=logit_bias)
            _COMPILED[key] = torch.compile(ref, dynamic=False)
        fn_loss, backend = _COMPILED[key], None
    elif provider in _OTHER_PROVIDERS:
        fn_loss, backend = _other_loss_fn(provider), None
    else:
        raise ValueError(provider)
    if not double:
        fn = _fwd_bwd(fn_loss, img, txt, scale, tgt, bias, leaves, kind, backend)
    else:
        g = torch.Generator(device=DEV).manual_seed(1)
        cots = [torch.randn(x.shape, generator=g, device=DEV).to(x.dtype) for x in leaves]

        def fn():
            loss = fn_loss(img, txt, scale, tgt, kind=kind, logit_bias=bias, backend=backend)
            gs = torch.autograd.grad(loss, leaves, create_graph=True)
            f2 = sum((c * x).sum() for c, x in zip(cots, gs))
            return torch.autograd.grad(f2, leaves, allow_unused=True)
    from lors_fast.ops import strip

    with strip.override(path=path) if path not in (None, "none") else contextlib.nullcontext():
        t1 = time.time()
        fn()  # compile / warm up
        if not DRY:
            torch.cuda.synchronize()
        first_s = time.time() - t1
        ms = bench(fn, warmup=2, rep=40 if N <= 32768 else 20)
        mem = peak_mem(fn)
    row = dict(provider=provider, kind=kind, target="lowrank" if lowrank else "identity", N=N, d=d, r=r,
               dtype=str(dtype).replace("torch.", ""), mode="fwd+bwd+dbl" if double else "fwd+bwd",
               ms=ms[0], p20=ms[1], p80=ms[2], tflops=_flops(N, d, r) / ms[0] / 1e9, peak_mib=mem,
               first_call_s=first_s, path=strip.last_path() if path != "none" else None)
    ceil = RES["ceiling"].get("bf16" if dtype in (torch.bfloat16, torch.float16) else "tf32", {})
    row["pred_ms"] = None if double else predict_ms(provider, kind, lowrank, N, d, r, row["dtype"], ceil.get("tflops"),
                                                    RES["ceiling"].get("bandwidth_tbs"))
    (RES["double_backward"] if double else RES["timing"]).append(row)
    pred = f"roofline {row['pred_ms']:8.3f} ms" if row["pred_ms"] else "roofline -"
    log(f"{provider:8s} {kind:8s} {row['target']:8s} N={N:6d} d={d} {row['dtype']:8s} {row['mode']:11s} "
        f"{ms[0]:9.3f} ms [{ms[1]:.3f},{ms[2]:.3f}]  {pred}  {row['tflops']:6.1f} TF/s(model)  {mem:9.1f} MiB")
    return row


def _try(*a, **k):
    try:
        return time_row(*a, **k)
    except torch.cuda.OutOfMemoryError as e:
        log(f"OOM {a}: {str(e)[:120]}")
        RES["errors"].append({"section": f"timing {a}", "error": "OOM"})
    except Exception as e:
        log(f"ERROR timing {a}: {type(e).__name__}: {str(e)[:300]}")
        RES["errors"].append({"section": f"timing {a}", "error": f"{type(e).__name__}: {e}",
                              "trace": traceback.format_exc()[-2000:]})
    finally:
        if not DRY:
            torch.cuda.empty_cache()
    return None


def sec_targets(until):
    bf = torch.bfloat16
    for kind, lr in (("infonce", False), ("wbce", True)):
        for prov in ("triton", "eager", "streaming"):
            _try(prov, kind, lr, 32768, 512, bf, until)
    for kind, lr in (("infonce", False), ("wbce", True)):  # both paths side by side (auto's pick: "triton")
        _try("triton-strip", kind, lr, 32768, 512, bf, until)
        _try("triton-fused", kind, lr, 32768, 512, bf, until)
    _try("triton", "infonce", True, 32768, 512, bf, until)
    _try("triton", "siglip", False, 32768, 512, bf, until)
    # double backward vs fwd+bwd at N = 8192
    for kind, lr in (("infonce", False), ("wbce", True)):
        _try("triton", kind, lr, 8192, 512, bf, until)
        _try("triton", kind, lr, 8192, 512, bf, until, double=True)
        _try("eager", kind, lr, 8192, 512, bf, until, double=True)


def sec_compile(until):
    for kind, lr in (("infonce", False), ("wbce", True)):
        _try("compile", kind, lr, 32768, 512, torch.bfloat16, until)
    _try("triton-compiled", "infonce", False, 32768, 512, torch.bfloat16, until)


def sec_grid(until):
    torch.backends.cuda.matmul.allow_tf32 = True  # eager fp32 rows at tf32, like the kernels' default
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for N in (4096, 16384, 32768, 65536):
                for d in (512, 768):
                    for kind, lr in (("infonce", False), ("infonce", True), ("wbce", True), ("siglip", False)):
                        if dtype == torch.float32 and d == 768:
                            continue
                        if dtype == torch.bfloat16 and N == 32768 and d == 512 and \
                                (kind, lr) in (("infonce", False), ("wbce", True)):
                            continue  # measured in the targets section
                        _try("triton", kind, lr, N, d, dtype, until)
                        big = N * N * (2 if dtype == torch.bfloat16 else 4)
                        if N <= 16384 or (N == 32768 and d == 512 and kind == "infonce" and not lr) or \
                                (big * 8 < 100 * 2**30 and N <= 32768 and d == 512):
                            _try("eager", kind, lr, N, d, dtype, until)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


# ------------------------------------------------------------------------------- other providers
# Two outside implementations of the symmetric hard-label CLIP loss, i.e. our kind="infonce" with the identity
# target: ½[(1/N)Σ_i CE(row i of Z, i) + (1/N)Σ_j CE(column j of Z, j)], Z = logit_scale·U·Vᵀ.
#   "openclip": open_clip.loss.ClipLoss()(U, V, logit_scale) (world_size 1: no gather). It computes exactly that
#       quantity, materialising two N×N logit matrices (U·Vᵀ and V·Uᵀ) in the input dtype: sizes are limited by
#       _fits_materialised. When `import open_clip` fails (e.g. no torchvision, which its __init__ imports),
#       open_clip/loss.py is loaded on its own (it needs only torch).
#   "infcl": Inf-CL (pip package inf-cl). Its single-GPU entry point is inf_cl.cal_flash_loss(q, k, labels,
#       scale, head_dim) (flash.py): ONE direction only, per-row loss LSE_j(s·q_i·k_j) − s·q_i·k_i (scale
#       multiplied into q, labels default arange), unreduced. cal_inf_loss / cal_ring_loss (ring.py) take the
#       ring path when torch.distributed is initialised and fall back to the same flash loss otherwise, but wrap
#       the scale in GradientGather whose backward calls dist.all_reduce, which fails without a process group; so
#       the provider calls cal_flash_loss directly, both ways, and averages the means:
#       ½[cal_flash_loss(U, V, scale=s).mean() + cal_flash_loss(V, U, scale=s).mean()] (as Inf-CL's own ring.py
#       self-test does) = the same quantity as ours. Dtypes: any float input is accepted but cast to fp32 inside
#       (`.float()`), the kernels run fp32 with TF32 tl.dot (the backward rounds operands to TF32 with PTX inline
#       asm cvt.rna.tf32.f32); a bf16 row therefore means bf16 inputs, fp32/TF32 arithmetic. head_dim must divide
#       d and be a power of two ≥ 16 (the kernels load BLOCK_HEADDIM = next_pow2(head_dim) columns unmasked);
#       its kernels assert q.is_cuda, so there is no CPU / interpreter run.
from _gpu_providers import (  # noqa: E402  (bench/ is on sys.path)
    _OTHER_PROVIDERS,
    OTHER_NOTES,
    _dist_version,
    _fits_materialised,
)


def _other_loss_fn(provider):
    return _gpu_providers.other_loss_fn(provider, RES["meta"])


def _provider_unavailable(provider):
    return _gpu_providers.provider_unavailable(provider, DEV)


def compare_provider(provider, N, d, dtype):
    """Loss value and gradients of `provider` vs ours (triton) on the same inputs (the timing rows' inputs):
    relative errors |Δloss|/|loss_ours| and max|Δ∂x|/max|∂x_ours| for x = U, V, logit_scale."""
    import lors_fast

    N, d = _sz(N, 64), _sz(d, 32)
    img, txt, scale, tgt, bias, leaves = _problem(N, d, dtype, "infonce", False)
    ours = lors_fast.contrastive_loss(img, txt, scale, None, kind="infonce", backend="triton")
    g_ours = torch.autograd.grad(ours, leaves)
    theirs = _other_loss_fn(provider)(img, txt, scale, None, kind="infonce", logit_bias=None)
    g_theirs = torch.autograd.grad(theirs, leaves)
    lo, lt = float(ours.detach().double()), float(theirs.detach().double())
    rec = dict(provider=provider, N=N, d=d, dtype=str(dtype).replace("torch.", ""),
               loss_dtype=str(theirs.dtype).replace("torch.", ""), loss_ours=lo, loss_theirs=lt,
               rel_err_value=abs(lt - lo) / max(abs(lo), 1e-30),
               rel_err_grad={nm: _gpu_correctness._relerr(b, a) for nm, a, b in zip(("U", "V", "scale"), g_ours, g_theirs)})
    RES["providers"].append(rec)
    log(f"{provider:8s} vs ours N={N} d={d} {rec['dtype']}: loss {lt:.6f} vs {lo:.6f} "
        f"rel err {rec['rel_err_value']:.2e}; grads rel err " +
        " ".join(f"{k}:{v:.2e}" for k, v in rec["rel_err_grad"].items()))
    return rec


def _timed(provider, N, d, dtype):
    N, d = _sz(N, 64), _sz(d, 32)
    dt = str(dtype).replace("torch.", "")
    return next((r for r in RES["timing"] if r["provider"] == provider and r["kind"] == "infonce" and
                 r["target"] == "identity" and r["N"] == N and r["d"] == d and r["dtype"] == dt), None)


def sec_providers(until):
    """Inf-CL and open_clip against ours at the target size: loss/grad agreement, then fwd+bwd timing rows."""
    N, d = 32768, 512
    for provider in _OTHER_PROVIDERS:
        RES["meta"][f"{provider}_version"] = _dist_version("inf-cl" if provider == "infcl" else "open_clip_torch")
    if _timed("triton", N, d, torch.bfloat16) is None:  # e.g. the targets section was not selected
        _try("triton", "infonce", False, N, d, torch.bfloat16, until)
    for provider in ("openclip", "infcl"):  # the cheap one first
        why = _provider_unavailable(provider)
        if why is None and provider == "openclip" and not _fits_materialised(N, torch.bfloat16):
            why = "materialised N×N logits would not fit"
        if why is not None:
            log(f"SKIP {provider}: {why}")
            RES["errors"].append({"section": f"providers {provider}", "error": f"skipped: {why}"})
            continue
        dtypes = [torch.bfloat16] + ([torch.float32] if provider == "infcl" else [])
        for dtype in dtypes:  # fp32 only as Inf-CL's fallback when bf16 inputs fail
            if el() > until:
                log(f"providers: budget reached before {provider} {dtype}")
                RES["errors"].append({"section": f"providers {provider}", "error": "skipped: no time left"})
                break
            try:
                compare_provider(provider, N, d, dtype)
            except torch.cuda.OutOfMemoryError as e:
                log(f"OOM {provider} compare: {str(e)[:120]}")
                RES["errors"].append({"section": f"providers {provider} compare", "error": "OOM"})
                break
            except Exception as e:
                log(f"ERROR {provider} {dtype} compare: {type(e).__name__}: {str(e)[:300]}")
                RES["errors"].append({"section": f"providers {provider} {dtype} compare",
                                      "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
                continue  # bf16 failed: try the next dtype
            finally:
                if not DRY:
                    torch.cuda.empty_cache()
            _try(provider, "infonce", False, N, d, dtype, until)
            break
        RES["meta"][f"{provider}_dtypes_run"] = sorted({r["dtype"] for r in RES["providers"]
                                                         if r["provider"] == provider})
    for provider in _OTHER_PROVIDERS:
        for r in RES["timing"]:
            if r["provider"] != provider:
                continue
            ours = _timed("triton", r["N"], r["d"], torch.bfloat16 if r["dtype"] == "bfloat16" else torch.float32)
            if ours is None:
                ours = _timed("triton", r["N"], r["d"], torch.bfloat16)
            if ours is not None:
                r["ours_ms"], r["ours_peak_mib"], r["ours_dtype"] = ours["ms"], ours["peak_mib"], ours["dtype"]
                r["ratio_ours_over_theirs"] = ours["ms"] / r["ms"]
                log(f"ratio ours({ours['dtype']})/{provider}({r['dtype']}) (time, N={r['N']} d={r['d']}): "
                    f"{ours['ms']:.3f} / {r['ms']:.3f} ms = {ours['ms'] / r['ms']:.3f} "
                    f"(ours {r['ms'] / ours['ms']:.2f}x as fast); peak MiB {ours['peak_mib']:.1f} vs "
                    f"{r['peak_mib']:.1f}")


# ------------------------------------------------------------------------------------------ report
def write_report():
    from _gpu_report import write_csv, write_markdown

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpu_results.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)
    write_markdown(RES, OUT, _OTHER_PROVIDERS, OTHER_NOTES)
    write_csv(RES, OUT)
    log(f"wrote {OUT}/gpu_results.json, gpu_results.md and gpu_results.csv")


def main():
    if not torch.cuda.is_available() and not DRY:
        print("no CUDA device: nothing to do", flush=True)
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    only = os.environ.get("GPU_CHECK_SECTIONS")  # e.g. "meta,correctness": run only these
    if only:
        keep = set(only.split(","))
        globals()["run_section"] = (lambda name, fn, until, _rs=run_section:
                                    _rs(name, fn, until) if name in keep else None)
    try:
        run_section("meta", sec_meta, BUDGET)
        run_section("ceiling", sec_ceiling, 20)
        run_section("precompile (start)", sec_precompile, 30)
        run_section("correctness", sec_correctness, float(os.environ.get("GPU_CHECK_CORR_UNTIL", "65")))
        run_section("sweep", sec_sweep, 160)
        run_section("postcheck (sweep's configs)", sec_postcheck, 172)
        run_section("targets", sec_targets, 215)
        run_section("compile", sec_compile, 235)
        # a ~20 s slice for Inf-CL / open_clip before the grid (which fills what is left), kept even when the
        # compile section overran its end
        run_section("providers", sec_providers, min(max(255.0, el() + 20), BUDGET - 15))
        run_section("grid", sec_grid, BUDGET - 15)
    finally:
        _RUN.close()
        if "ex" in _WARM:
            _WARM["ex"].shutdown(wait=False, cancel_futures=True)
        write_report()
        log("done")


if __name__ == "__main__":
    main()
