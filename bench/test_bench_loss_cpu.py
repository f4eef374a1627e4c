"""CPU benchmark of the loss core: streaming vs the materialised reference.

Cases: N ∈ {1024, 4096, 8192}, d = 256, r = 10, kinds infonce and wbce with a LowRankTarget, modes
"fwd" (forward only, no graph), "fwdbwd" (forward + first-order gradients of every input) and "dbl"
(gradients with create_graph=True, then the gradient of a random linear function of them: the double
backward the distillation engine runs).

Timing: ``pytest bench --benchmark-only`` times each case in-process with pytest-benchmark (N = 1024 by
default; N = 4096 and 8192 with ``--bench-full``); the peak memory of one call is measured in the same process
(bench/conftest.py: VmHWM of /proc/self/status, reset through /proc/self/clear_refs after the inputs exist, so
the number is the increase of the peak resident set caused by the loss alone), and TFLOP/s follow the FLOP
model 2·N²·(d+r) for the forward and 8·N²·(d+r) for forward+backward (docs/KERNELS_MATHS.md; none for the double
backward). All go into ``benchmark.extra_info`` and the terminal table. The report below measures memory in a
fresh subprocess per case (this file run as a worker).

Side-by-side report (both backends of each case timed in one run, each in its own subprocess):

    python bench/test_bench_loss_cpu.py --report bench/RESULTS_CPU_loss.md

Worker (one case, prints JSON):

    python bench/test_bench_loss_cpu.py --worker --n 8192 --kind wbce --backend streaming --mode fwdbwd
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from _memory import status_bytes as _status  # bench/ is on sys.path (pytest rootdir, or the script's folder)

D, RANK = 256, 10
SIZES = (1024, 4096, 8192)
QUICK_SIZES = (1024,)  # the default `pytest bench` selection; the rest are marked bench_full
KINDS = ("infonce", "wbce")
BACKENDS = ("streaming", "reference")
MODES = ("fwd", "fwdbwd", "dbl")


# ----------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------
def make_inputs(n: int, seed: int = 0):
    """Unit-norm features, the reference's logit scale 1/0.07, S = diag(a) + (α/r)·L·Rᵀ with α = 1."""
    import torch.nn.functional as F

    from lors_fast import LowRankTarget

    g = torch.Generator().manual_seed(seed)
    U = F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_(True)
    V = F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    a = torch.ones(n).add_(0.1 * torch.randn(n, generator=g)).requires_grad_(True)
    L = torch.randn(n, RANK, generator=g).requires_grad_(True)
    R = (0.1 * torch.randn(n, RANK, generator=g)).requires_grad_(True)
    leaves = [U, V, scale, a, L, R]
    weights = [torch.randn(x.shape, generator=g) for x in leaves]

    def target():
        return LowRankTarget(a, L, R, 1.0 / RANK)

    return leaves, weights, target


def make_case(n: int, kind: str, backend: str, mode: str, chunk: int | None = None):
    """A zero-argument callable running one case (returns nothing; all results are dropped).
    ``chunk``: rows per streaming chunk (None: the library default)."""
    from lors_fast import contrastive_loss

    leaves, weights, target = make_inputs(n)
    U, V, scale = leaves[:3]
    kw = {"chunk_size": chunk} if backend == "streaming" else {}

    def loss():
        return contrastive_loss(U, V, scale, target(), kind=kind, backend=backend, **kw)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                loss()
            return
        if mode == "fwdbwd":
            torch.autograd.grad(loss(), leaves)
            return
        grads = torch.autograd.grad(loss(), leaves, create_graph=True)
        f = sum((g * w).sum() for g, w in zip(grads, weights) if g.requires_grad)
        torch.autograd.grad(f, leaves, allow_unused=True)

    return run


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(n: int, kind: str, backend: str, mode: str, reps: int, chunk: int | None = None) -> dict:
    """Run one case ``reps`` times in this process; wall times and the peak-RSS increase of the first run."""
    run = make_case(n, kind, backend, mode, chunk)
    base = _status("VmRSS")
    reset = _reset_peak()
    hwm0 = _status("VmHWM") if reset else base
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = _status("VmHWM") - (hwm0 if reset else base)
    return {"n": n, "kind": kind, "backend": backend, "mode": mode, "chunk": chunk, "times_s": times,
            "peak_increase_bytes": max(0, peak), "threads": torch.get_num_threads(), "hwm_reset": reset}


def run_worker(n: int, kind: str, backend: str, mode: str, reps: int = 1, chunk: int | None = None,
               timeout: float = 1800.0) -> dict:
    """Run :func:`worker` in a fresh Python process and return its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--n", str(n), "--kind", kind,
           "--backend", backend, "--mode", mode, "--reps", str(reps)] + (["--chunk", str(chunk)] if chunk else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {cmd} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark (collected only by `pytest bench`; skipped by plain `pytest` through --benchmark-skip)
# ----------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the worker does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("n", [n if n in QUICK_SIZES else pytest.param(n, marks=pytest.mark.bench_full)
                                   for n in SIZES])
    def test_loss_cpu(benchmark, peak_mib, n, kind, backend, mode):
        benchmark.group = f"loss-cpu N={n} {kind} {mode}"
        run = make_case(n, kind, backend, mode)
        rounds = 1 if n >= 8192 else 3
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0 if n >= 8192 else 1)
        flops = {"fwd": 2, "fwdbwd": 8}.get(mode)
        benchmark.extra_info.update({
            "N": n, "d": D, "r": RANK, "kind": kind, "backend": backend, "mode": mode,
            "peak_MiB": peak_mib(run), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        })
        if flops:
            benchmark.extra_info["flops"] = flops * n * n * (D + RANK)


# ----------------------------------------------------------------------------------------------------
# side-by-side report
# ----------------------------------------------------------------------------------------------------
def report(path: str | None, sizes, kinds, modes, reps: int) -> str:
    rows = []
    for n in sizes:
        for kind in kinds:
            for mode in modes:
                res = {b: run_worker(n, kind, b, mode, reps=reps) for b in BACKENDS}
                ts = {b: min(r["times_s"]) for b, r in res.items()}
                mb = {b: r["peak_increase_bytes"] / 2**20 for b, r in res.items()}
                rows.append((n, kind, mode, ts["streaming"], ts["reference"], mb["streaming"], mb["reference"]))
                print(f"N={n} {kind} {mode}: streaming {ts['streaming']:.3f} s {mb['streaming']:.0f} MiB | "
                      f"reference {ts['reference']:.3f} s {mb['reference']:.0f} MiB", flush=True)
    lines = ["| N | kind | mode | streaming s | reference s | time ratio | streaming MiB | reference MiB | mem ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, kind, mode, ts_, tr, ms, mr in rows:
        lines.append(f"| {n} | {kind} | {mode} | {ts_:.3f} | {tr:.3f} | {ts_ / tr:.2f} | {ms:.0f} | {mr:.0f} | "
                     f"{(ms / mr if mr > 0 else float('nan')):.3f} |")
    table = "\n".join(lines)
    if path:
        head = (f"<!-- generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, d={D}, r={RANK}, min of {reps} run(s) per case -->\n")
        Path(path).write_text(head + table + "\n")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--kind", default="wbce", choices=KINDS + ("bce", "mse", "siglip", "cwcl", "kl"))
    p.add_argument("--backend", default="streaming", choices=BACKENDS)
    p.add_argument("--mode", default="fwdbwd", choices=MODES)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None, help="streaming rows per chunk (default: library's)")
    p.add_argument("--report", default=None, help="write the side-by-side markdown table to this file")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.n, a.kind, a.backend, a.mode, a.reps, a.chunk)))
        return
    print(report(a.report, [int(x) for x in a.sizes.split(",")], a.kinds.split(","), a.modes.split(","),
                 a.reps))


if __name__ == "__main__":
    main()
