"""Retrieval metrics at COCO test size: lors_fast.retrieval_metrics vs the reference's pipeline.

The oracle below is our own re-implementation of the reference's evaluation (docs/LORS_NOTES.md §5.2–5.3):
the full similarity matrix, each row's top-128 kept and the rest filled with −100, then for every row
a full argsort (descending) and the position of the ground truth. numpy's argsort is run with
``kind="stable"`` so that ties have a defined order (the reference's default sort leaves it
unspecified); reversing a stable ascending sort ranks the larger index first among equal scores,
which is the tie-break ``retrieval_metrics`` implements.

Run:  python bench/bench_metrics.py [--n-img 5000] [--n-txt 25010] [--dim 256] [--signal 0 0.2] [--threads 1]
                                   [--out bench/RESULTS_CPU_metrics.md]

signal 0 is the issue's target (random embeddings: almost every query misses, and the probe work plan
decides most of them early); signal 0.2 makes captions close to their image (R@10 ~ 50-80%), the regime
of a trained model, where every candidate of most queries must be scored.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from lors_fast.engine.metrics import retrieval_metrics


def coco_like_index(n_img: int, n_txt: int) -> tuple[list[int], list[list[int]]]:
    """Captions in image order, 5 per image, with the first (n_txt - 5 n_img) images getting a 6th."""
    extra = n_txt - 5 * n_img
    if not 0 <= extra <= n_img:
        raise ValueError(f"n_txt must lie in [5 n_img, 6 n_img], got n_img={n_img}, n_txt={n_txt}")
    img2txt, txt2img, c = [], [], 0
    for i in range(n_img):
        k = 6 if i < extra else 5
        img2txt.append(list(range(c, c + k)))
        txt2img += [i] * k
        c += k
    return txt2img, img2txt


def reference_pipeline(img: torch.Tensor, txt: torch.Tensor, txt2img, img2txt, k_fill: int = 128,
                       kind: str = "stable") -> dict:
    """Full matrix, top-k fill with -100, per-row argsort ranking (the reference's epoch_test + itm_eval).

    kind: numpy sort kind; "quicksort" is the reference's (default) choice, "stable" defines tie order."""
    sims = img @ txt.T
    def fill(s: torch.Tensor) -> np.ndarray:
        out = torch.full_like(s, -100.0)
        k = min(k_fill, s.shape[1])
        vals, idx = s.topk(k, dim=1)
        out.scatter_(1, idx, vals)
        return out.numpy()
    s_i2t, s_t2i = fill(sims), fill(sims.T.contiguous())
    ranks_i2t = np.zeros(s_i2t.shape[0])
    for i, row in enumerate(s_i2t):
        order = np.argsort(row, kind=kind)[::-1]
        ranks_i2t[i] = min(np.where(order == c)[0][0] for c in img2txt[i])
    ranks_t2i = np.zeros(s_t2i.shape[0])
    for t, row in enumerate(s_t2i):
        order = np.argsort(row, kind=kind)[::-1]
        ranks_t2i[t] = np.where(order == txt2img[t])[0][0]
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * len(np.where(ranks_i2t < k)[0]) / len(ranks_i2t)
    for k in (1, 5, 10):
        out[f"img_r{k}"] = 100.0 * len(np.where(ranks_t2i < k)[0]) / len(ranks_t2i)
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def make_inputs(n_img: int, n_txt: int, dim: int, seed: int = 0, signal: float = 0.0):
    """Random L2-normalised embeddings; `signal` > 0 pulls captions towards their image (realistic ranks)."""
    g = torch.Generator().manual_seed(seed)
    txt2img, img2txt = coco_like_index(n_img, n_txt)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    txt = torch.randn(n_txt, dim, generator=g)
    if signal:
        txt = txt + signal * img[torch.tensor(txt2img)] * dim**0.5
    txt = torch.nn.functional.normalize(txt, dim=1)
    return img, txt, txt2img, img2txt


def compare(n_img: int, n_txt: int, dim: int, signal: float, repeats: int) -> tuple[list[str], bool]:
    """One side-by-side run: reference pipeline (numpy default sort and stable sort) vs ours."""
    img, txt, txt2img, img2txt = make_inputs(n_img, n_txt, dim, signal=signal)
    retrieval_metrics(*make_inputs(64, 320, dim, seed=1))  # warm-up (thread pools, allocator)
    t0 = time.perf_counter()
    ref_q = reference_pipeline(img, txt, txt2img, img2txt, kind="quicksort")
    t_ref_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_s = reference_pipeline(img, txt, txt2img, img2txt, kind="stable")
    t_ref_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = retrieval_metrics(img, txt, txt2img, img2txt)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _ = img @ txt.T
    t_mm = time.perf_counter() - t0
    t_ours = float(np.median(times))
    identical = ours == ref_q == ref_s
    lines = [
        f"### {n_img} images × {n_txt} captions, d = {dim}, signal = {signal}",
        "",
        "| metric | reference (quicksort) | reference (stable sort) | lors_fast |",
        "|---|---|---|---|",
        *[f"| {k} | {ref_q[k]:.4f} | {ref_s[k]:.4f} | {ours[k]:.4f} |" for k in ref_q],
        "",
        f"- identical (all 9 numbers, exact float equality): **{identical}**",
        f"- reference pipeline, numpy default sort (as the reference): **{t_ref_q:.2f} s**; with a stable sort: "
        f"{t_ref_s:.2f} s",
        f"- lors_fast.retrieval_metrics: **{t_ours:.3f} s** (median of {repeats}: "
        f"{', '.join(f'{t:.3f}' for t in times)})",
        f"- speed-up vs the reference's pipeline: **{t_ref_q / t_ours:.1f}×** (vs the stable-sort variant: "
        f"{t_ref_s / t_ours:.1f}×); for scale, one full {n_img}×{n_txt} matmul took {t_mm:.3f} s",
        "",
    ]
    return lines, identical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-img", type=int, default=5000)
    ap.add_argument("--n-txt", type=int, default=25010)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--signal", type=float, nargs="+", default=[0.0, 0.2],
                    help="0 = pure random (the issue's target); 0.2 pulls captions to their image (R@10 ~ 50%%)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (1: numpy's sorts are single-threaded anyway, and on the "
                         "shared 2-core machines OpenMP oversubscription makes multi-threaded timings erratic)")
    ap.add_argument("--out", default=None, help="write a markdown summary here (overwritten)")
    args = ap.parse_args()
    import os

    torch.set_num_threads(args.threads)
    head = [
        "# Retrieval metrics on CPU: lors_fast vs the reference's pipeline",
        "",
        f"Command: `python bench/bench_metrics.py --n-img {args.n_img} --n-txt {args.n_txt} --dim {args.dim} "
        f"--signal {' '.join(map(str, args.signal))} --repeats {args.repeats} --threads {args.threads}" + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average at start {os.getloadavg()[0]:.1f} (the machine is shared: times are noisy)",
        "",
        "Both sides get the same L2-normalised embeddings; the oracle is our re-implementation of the reference's "
        "epoch_test + itm_eval (full score matrix, per-row top-128 kept and the rest filled with -100, per-row "
        "argsort, position of the ground truth), run with numpy's default sort (the reference's) and with a stable "
        "sort (which defines the tie order lors_fast reproduces).",
        "",
        "Where the time goes: with random embeddings (signal 0, the issue's target) almost every query misses, "
        "and lors_fast's probe plan decides most of them after scoring a few percent of the candidates, so it "
        "costs a fraction of ONE full matrix product. With a trained-like model (signal 0.2) most queries need "
        "every candidate: lors_fast then does one joint pass (the full product once, both directions counted "
        "from it), about 1.3-1.6x the cost of the product alone, and the whole speed-up comes from replacing "
        "30,010 argsorts by comparisons.",
        "",
    ]
    print("\n".join(head))
    body, ok = [], True
    for sig in args.signal:
        lines, identical = compare(args.n_img, args.n_txt, args.dim, sig, args.repeats)
        print("\n".join(lines))
        body += lines
        ok &= identical
    if args.out:
        from lors_fast.data.io import atomic_write

        atomic_write(args.out, ("\n".join(head + body) + "\n").encode())
    if not ok:
        raise SystemExit("metrics differ from the reference pipeline")


if __name__ == "__main__":
    main()
