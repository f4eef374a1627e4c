"""Distillation across processes and activation checkpointing: time per iteration with 1 vs P ranks
(torchrun, gloo on CPU), and peak memory of one iteration with checkpoint none / torch / deepspeed.

    python bench/bench_distributed.py time --ranks 1 2 --trajectories 2 --iters 6
    python bench/bench_distributed.py memory

``time``: a store of 2 random-walk experts (ConvNet 2×16 on 16×16 images, hash:64 captions, 200 synthetic
images) and ``torchrun --nproc-per-node P -m lors_fast.cli distill --trajectories W --threads 1`` for each
P; the per-iteration ``time_s`` of metrics.jsonl, first iteration dropped, min and median.
``memory``: one process per backend (a fresh interpreter each), peak RSS − RSS after setup over one
iteration (the first after setup), on a student whose pass-2 activations dominate (ConvNet 3×32 on 32×32, B = 64, few parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_store(root: Path, spec_kw: dict, n_train: int, encoder: str, n_experts: int = 2, epochs: int = 3) -> Path:
    from lors_fast.data.datasets import load_split
    from lors_fast.engine.trajectories import TrajectoryStore
    from lors_fast.models import FlatModel, StudentSpec, build_student

    spec = StudentSpec(**spec_kw)
    ds = load_split("synthetic", "train", image_size=spec.image_size, n_images=n_train, seed=0)
    fi, ft = (FlatModel(m) for m in build_student(spec, seed=0))
    store_dir = root / "store"
    meta = {"spec": spec.to_dict(), "encoder": encoder, "dataset": ds.fingerprint, "epochs": epochs,
            "n_train": n_train, "img_params": fi.describe(), "txt_params": ft.describe()}
    store = TrajectoryStore.create(store_dir, meta)
    g = torch.Generator().manual_seed(0)
    for e in range(n_experts):
        walk = [torch.cat([f.flat()[None], f.flat()[None] + (0.02 * torch.randn(epochs, f.num_params,
                                                                                   generator=g)).cumsum(0)])
                for f in (fi, ft)]
        store.write_expert(e, *walk)
    store.finalize()
    return store_dir


def bench_time(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = make_store(root, dict(image_size=16, convnet_width=16, convnet_depth=2, text_dim=64), 200, "hash:64")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        rows = []
        for p in args.ranks:
            out = root / f"run{p}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p),
                   "-m", "lors_fast.cli", "distill", "--buffer", str(store), "--out", str(out),
                   "--cache-dir", str(root / "cache"), "--text-encoder", "hash:64", "--n-train", "200",
                   "--n-pairs", "50", "--mini-batch", "25", "--syn-steps", str(args.syn_steps), "--rank", "5",
                   "--trajectories", str(args.trajectories), "--iterations", str(args.iters), "--threads", "1",
                   "--no-progress", "--no-artifacts", "--ckpt-every", str(args.iters)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            ts = [json.loads(x)["time_s"] for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
            rows.append((p, min(ts), statistics.median(ts)))
        base = rows[0][1]
        print(f"| ranks | W per rank | s / iteration, min (median) | vs {rows[0][0]} rank(s), min |")
        print("|---|---|---|---|")
        for p, lo, med in rows:
            print(f"| {p} | {args.trajectories // p} | {lo:.3f} ({med:.3f}) | {lo / base:.2f}× |")


_MEM_CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from bench.bench_distributed import make_store
from lors_fast.engine.distill import Distiller
from lors_fast.engine.distill_config import load_config
torch.set_num_threads(1)
a = json.loads(sys.argv[1])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
d = Distiller(load_config("default", **a))
before = rss()
d.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"peak_minus_setup_mb": peak - before, "peak_mb": peak}}))
"""


def bench_memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = dict(image_size=32, convnet_width=32, convnet_depth=3, text_dim=32)
        store = make_store(root, spec, 200, "hash:32")
        ds_json = root / "ds.json"
        ds_json.write_text(json.dumps({"activation_checkpointing": {
            "partition_activations": False, "cpu_checkpointing": False, "number_checkpoints": 2,
            "synchronize_checkpoint_boundary": True, "profile": False}}))
        base = dict(buffer=str(store), out=str(root / "run"), cache_dir=str(root / "cache"), text_encoder="hash:32",
                    n_train=200, n_pairs=64, mini_batch=64, syn_steps=args.syn_steps, rank=4, threads=1,
                    progress=False, artifacts=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        print("| checkpoint | peak − RSS after setup, MB | peak RSS, MB |")
        print("|---|---|---|")
        for name, kw in (("none", {}), ("torch", {"checkpoint": "torch"}), ("deepspeed", {"checkpoint": "deepspeed"}),
                         ("deepspeed + --deepspeed-config", {"checkpoint": "deepspeed",
                                                             "deepspeed_config": str(ds_json)}),
                         ("none + chunk 8", {"chunk": 8})):
            code = _MEM_CHILD.format(root=str(ROOT))
            proc = subprocess.run([sys.executable, "-c", code, json.dumps({**base, **kw})], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {name} | {r['peak_minus_setup_mb']:.0f} | {r['peak_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("time")
    t.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    t.add_argument("--trajectories", type=int, default=2)
    t.add_argument("--iters", type=int, default=6)
    t.add_argument("--syn-steps", type=int, default=8)
    m = sub.add_parser("memory")
    m.add_argument("--syn-steps", type=int, default=2)
    a = ap.parse_args()
    bench_time(a) if a.what == "time" else bench_memory(a)


if __name__ == "__main__":
    main()
