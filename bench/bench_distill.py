"""Distillation iteration: time and peak memory of our engine vs a reference-structured loop, per K.

Setup = the embedded default (ConvNet 3×64 on 32×32, Linear 384→1024 text head, N = 100 pairs,
B = 30, low-rank S rank 10, soft-target InfoNCE), a store of 2 random-walk experts, random unit-norm
caption embeddings (MiniLM itself is not needed to time the engine).

* ``ours``: :class:`lors_fast.engine.distill.Distiller` ``step()`` (TESLA, O(P) memory, model built once,
  experts in memory); ``ours+ckpt``: the same with torch activation checkpointing; ``ours+chunk``:
  pass 2 with the image branch in micro-batches of 6 (``DistillConfig.chunk``).
* ``reference``: the reference's structure (docs/LORS_NOTES.md §1.2, §10): the student is rebuilt and the
  expert file is read every iteration, θ_0..θ_K are stored, ``autograd.grad(create_graph=True)`` in both
  passes (two calls in pass 1), then the same SGD step.

Each (impl, K) runs in its own subprocess; peak memory = peak RSS (``ru_maxrss``) minus the RSS after
setup, so it counts what the iterations allocate (on CUDA: ``torch.cuda.max_memory_allocated``).

Run:  python bench/bench_distill.py [--steps 10 20 40 80] [--iters 2] [--threads 2]
                                    [--out bench/RESULTS_CPU_distill.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


CHUNK = 6  # micro-batch of the "ours+chunk" variant (B = 30)


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def setup(root: Path, K: int, *, n_pairs=100, mini_batch=30, device="cpu", checkpoint="none", n_images=400):
    """Store + dataset + config of the embedded default at size K (no MiniLM: random caption embeddings)."""
    from lors_fast.data.datasets import load_split
    from lors_fast.engine.distill_config import load_config
    from lors_fast.engine.trajectories import TrajectoryStore
    from lors_fast.models import FlatModel, StudentSpec, build_student

    ds = load_split("synthetic", "train", n_images=n_images)
    g = torch.Generator().manual_seed(0)
    spec = StudentSpec()
    emb = torch.nn.functional.normalize(torch.randn(len(ds.captions), spec.text_dim, generator=g), dim=1)
    store_dir = root / "store"
    if not (store_dir / "index.json").is_file():
        img, txt = build_student(spec, seed=0)
        fi, ft = FlatModel(img), FlatModel(txt)
        meta = {"spec": spec.to_dict(), "encoder": "minilm", "dataset": ds.fingerprint, "epochs": 3,
                "img_params": fi.describe(), "txt_params": ft.describe()}
        store = TrajectoryStore.create(store_dir, meta)
        for e in range(2):
            ti = fi.flat()[None] + torch.cat([torch.zeros(1, fi.num_params),
                                              (0.01 * torch.randn(3, fi.num_params, generator=g)).cumsum(0)])
            tt = ft.flat()[None] + torch.cat([torch.zeros(1, ft.num_params),
                                              (0.01 * torch.randn(3, ft.num_params, generator=g)).cumsum(0)])
            store.write_expert(e, ti, tt)
    cfg = load_config("default", buffer=str(store_dir), out=str(root / "run"), syn_steps=K, n_pairs=n_pairs,
                      mini_batch=mini_batch, progress=False, artifacts=False, device=device,
                      checkpoint=checkpoint)
    return cfg, ds, emb


class ReferenceLoop:
    """The reference's per-iteration structure around :func:`reference_tesla_iteration`."""

    def __init__(self, distiller):
        self.d = distiller

    def step(self) -> None:
        from lors_fast.engine.tesla import Student, make_plan, reference_tesla_iteration
        from lors_fast.models import FlatModel, build_student

        d, cfg = self.d, self.d.cfg
        img, txt = build_student(d.spec)  # rebuilt every iteration
        student = Student(FlatModel(img.to(d.device)), FlatModel(txt.to(d.device)), 1.0 / cfg.temperature)
        expert, start_epoch = d._next_expert()
        traj_i, traj_t = d.store.read_expert(expert)  # whole expert file read every iteration
        start = (traj_i[start_epoch].to(d.device), traj_t[start_epoch].to(d.device))
        target = (traj_i[start_epoch + cfg.expert_epochs].to(d.device),
                  traj_t[start_epoch + cfg.expert_epochs].to(d.device))
        plan = make_plan(cfg.n_pairs, cfg.mini_batch, cfg.syn_steps, d.gen, d.device)
        res = reference_tesla_iteration(student, d.loss_fn, d.images, d.texts, d.slicer, d.lr_img, d.lr_txt,
                                        start, target, plan, merge_branches=cfg.merge_loss_branches,
                                        consistent_dropout=False)
        grads = {"images": [res.grad_images], "texts": [res.grad_texts],
                 "lrs": [res.grad_lr_img, res.grad_lr_txt], "sim": res.grad_sim}
        for k, ps in d.groups.items():
            for p, g in zip(ps, grads[k]):
                p.grad = g.detach()
        d.opt.step()
        d.opt.zero_grad(set_to_none=True)


def worker(impl: str, K: int, iters: int, device: str) -> dict:
    from lors_fast.engine.distill import Distiller

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ds, emb = setup(Path(tmp), K, device=device, checkpoint="torch" if impl == "ours+ckpt" else "none")
        if impl == "ours+chunk":
            cfg = cfg.replace(chunk=CHUNK)
        d = Distiller(cfg, dataset=ds, caption_emb=emb)
        loop = ReferenceLoop(d) if impl == "reference" else d
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        base = _rss_peak_mb()
        times = []
        for _ in range(iters + 1):  # first one is warm-up
            t = time.perf_counter()
            loop.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out = {"impl": impl, "K": K, "s_per_it": sorted(times[1:])[len(times[1:]) // 2],
               "peak_mb": _rss_peak_mb() - base, "iters": iters}
        if device.startswith("cuda"):
            out["peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        return out


def timing(K: int, iters: int, impls: list[str], device: str) -> dict[str, dict]:
    """Interleaved timing in one process (robust on a shared machine): round r runs one iteration of every
    impl in turn; returns min and median seconds per iteration of each (round 0 is the warm-up)."""
    from lors_fast.engine.distill import Distiller

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ds, emb = setup(Path(tmp), K, device=device)
        loops = {}
        for impl in impls:
            c = cfg.replace(out=str(Path(tmp) / impl), checkpoint="torch" if impl == "ours+ckpt" else "none",
                            chunk=CHUNK if impl == "ours+chunk" else None)
            d = Distiller(c, dataset=ds, caption_emb=emb)
            loops[impl] = ReferenceLoop(d) if impl == "reference" else d
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(iters + 1):
            for impl, loop in loops.items():
                t = time.perf_counter()
                loop.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if r > 0:
                    times[impl].append(time.perf_counter() - t)
        return {k: {"min": min(v), "median": sorted(v)[len(v) // 2]} for k, v in times.items()}


def parity(device: str, K: int = 8, backend: str = "auto") -> dict:
    """One TESLA iteration with the default loss backend vs backend="reference" on ``device`` (same state,
    same plan): max relative difference of every gradient (TF32-sized on CUDA, ~1e-6 on CPU)."""
    from lors_fast.engine.distill import Distiller
    from lors_fast.engine.tesla import make_plan, tesla_iteration

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ds, emb = setup(Path(tmp), K, device=device)
        res = {}
        for b in (backend, "reference"):
            d = Distiller(cfg.replace(loss_backend=b), dataset=ds, caption_emb=emb)
            e, s0 = d._next_expert()
            plan = make_plan(cfg.n_pairs, cfg.mini_batch, K, d.gen, d.device)
            res[b] = tesla_iteration(d.student, d.loss_fn, d.images, d.texts, d.slicer, d.lr_img, d.lr_txt,
                                           d._snapshot(e, s0), d._snapshot(e, s0 + 1), plan)
        a, b = res[backend], res["reference"]
        pairs = {"images": (a.grad_images, b.grad_images), "texts": (a.grad_texts, b.grad_texts),
                 "lr_img": (a.grad_lr_img, b.grad_lr_img), "lr_txt": (a.grad_lr_txt, b.grad_lr_txt)}
        pairs.update({f"sim{j}": (x, y) for j, (x, y) in enumerate(zip(a.grad_sim, b.grad_sim))})
        for k, (x, y) in pairs.items():
            out[k] = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
        out["loss"] = abs(a.loss - b.loss) / abs(b.loss)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per point (after 1 warm-up)")
    ap.add_argument("--impls", nargs="+", default=["ours", "ours+chunk", "ours+ckpt", "reference"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write a markdown table here")
    ap.add_argument("--parity", action="store_true", help="compare a loss backend with the reference")
    ap.add_argument("--parity-backend", default="auto")
    ap.add_argument("--no-tf32", action="store_true", help="disable TF32 in cuBLAS/cuDNN (parity)")
    ap.add_argument("--timing", type=int, metavar="K", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.parity:
        if a.no_tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        print(json.dumps(parity(a.device, backend=a.parity_backend)))
        return
    if a.timing:
        print(json.dumps(timing(a.timing, a.iters, a.impls, a.device)))
        return
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.iters, a.device)))
        return
    rows = []
    for K in a.steps:
        cmd = [sys.executable, __file__, "--timing", str(K), "--iters", str(a.iters), "--device", a.device,
               "--impls", *a.impls] + (["--threads", str(a.threads)] if a.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"timing K={K} failed:\n{r.stderr[-3000:]}")
        tim = json.loads(r.stdout.strip().splitlines()[-1])
        for impl in a.impls:
            cmd = [sys.executable, __file__, "--worker", impl, str(K), "--iters", "1", "--device", a.device]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SystemExit(f"worker {impl} K={K} failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["s_per_it"], row["s_median"] = tim[impl]["min"], tim[impl]["median"]
            rows.append(row)
            print(f"K={K:3d} {impl:10s} {row['s_per_it']:8.3f} s/it (min; median {row['s_median']:.3f})"
                  f"  peak +{row['peak_mb']:8.1f} MB", flush=True)
    report = render(rows, a)
    print(report)
    if a.out:
        Path(a.out).write_text(report)


def render(rows: list[dict], a) -> str:
    by = {(r["impl"], r["K"]): r for r in rows}
    lines = [
        f"# Distillation iteration on {a.device}: ours vs reference-structured loop",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {a.device}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Embedded default (ConvNet 3×64 on 32×32, Linear 384→1024, N=100, B=30, low-rank r=10, InfoNCE); "
        f"time = min (median) over {a.iters} interleaved rounds after a warm-up round, all impls in one "
        f"process; peak memory from a separate process per point (1 warm-up + 1 iteration), peak = "
        + ("max_memory_allocated − allocated after setup." if a.device.startswith("cuda")
           else "peak RSS − RSS after setup."),
        f"Reproduce: `python bench/bench_distill.py --steps {' '.join(map(str, a.steps))} --iters {a.iters}"
        + (f" --threads {a.threads}" if a.threads else "") + f" --device {a.device}`",
        "",
        "| K | impl | s / iteration, min (median) | peak MB | speed-up vs reference (min) | memory vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = by.get(("reference", r["K"]))
        sp = f"{ref['s_per_it'] / r['s_per_it']:.2f}×" if ref else "–"
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] > 0 else "–"
        med = f" ({r['s_median']:.3f})" if "s_median" in r else ""
        lines.append(f"| {r['K']} | {r['impl']} | {r['s_per_it']:.3f}{med} | {r['peak_mb']:.1f} | {sp} | {mem} |")
    ks = sorted({r["K"] for r in rows})
    for impl in ("ours", "ours+chunk", "ours+ckpt"):
        if (impl, ks[0]) in by and (impl, ks[-1]) in by and by[(impl, ks[0])]["peak_mb"] > 0:
            g = by[(impl, ks[-1])]["peak_mb"] / by[(impl, ks[0])]["peak_mb"] - 1
            lines.append(f"\nMemory growth of `{impl}` from K={ks[0]} to K={ks[-1]}: {100 * g:+.1f} %.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
