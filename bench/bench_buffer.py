"""Expert-epoch throughput: preprocessed uint8 memmap cache vs decoding JPEGs every epoch.

Generates a scaled-up Karpathy-format JPEG fixture (tests/fixtures/karpathy.py), then, side by side in
one run, trains the same expert (same student, loss, optimizer and batch size) for ``--epochs`` epochs
(a) through ``lors_fast.engine.buffer.train_expert`` on the memmap cache (built once, build time reported),
(b) with a DataLoader that decodes and resizes every JPEG every epoch (the reference's data path),
and also the pure data-path rate of each (batches produced, no training). Writes a markdown table to
bench/RESULTS_CPU_buffer.md (or --results).

    python bench/bench_buffer.py --n-images 1024 --jpeg-size 320x240 --image-size 64 --epochs 1

``--quality`` instead measures the embedded default dataset as a benchmark: the default synthetic
buffer (time per expert, each expert's test r_mean = the full-data score) and the random-100 baseline
(100 random train pairs, fresh init, SGD momentum 0.9, wd 5e-4, lr 0.03, 150 full-batch steps; test
r_mean over ``--seeds`` init seeds), appended to the results file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fixtures.karpathy import make_karpathy  # noqa: E402

from lors_fast import contrastive_loss  # noqa: E402
from lors_fast.data.datasets import JpegPairDataset, load_split  # noqa: E402
from lors_fast.data.text import caption_embeddings  # noqa: E402
from lors_fast.engine.buffer import BufferConfig, train_expert  # noqa: E402
from lors_fast.models import build_student, seeded  # noqa: E402


def jpeg_epochs(cfg, spec, ds, emb, jpeg_ds, workers: int) -> float:
    """The same training as train_expert, but images decoded from JPEG every epoch; returns img/s."""
    img, txt = build_student(spec, seed=0)
    opt = torch.optim.SGD(
        [{"params": img.parameters(), "lr": cfg.lr_img}, {"params": txt.parameters(), "lr": cfg.lr_txt}]
    )
    gen = torch.Generator().manual_seed(1)
    loader = torch.utils.data.DataLoader(
        range(len(jpeg_ds)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=gen,
        num_workers=workers,
        collate_fn=lambda idx: (torch.tensor(idx), torch.stack([jpeg_ds[i] for i in idx])),
    )
    n, t0 = 0, time.perf_counter()
    with seeded(2):
        for _ in range(cfg.epochs):
            for ii, x8 in loader:
                x = ds.normalize_uint8(x8)
                caps = torch.tensor([ds.img2txt[i][0] for i in ii.tolist()])
                f, h = F.normalize(img(x), dim=-1), F.normalize(txt(emb[caps]), dim=-1)
                loss = contrastive_loss(f, h, 1 / cfg.temperature, None, kind="infonce")
                opt.zero_grad()
                loss.backward()
                opt.step()
                n += len(ii)
    return n / (time.perf_counter() - t0)


def data_only(ds, jpeg_ds, bs: int, workers: int) -> tuple[float, float]:
    """Images/s of producing normalised batches: (memmap, jpeg decode)."""
    perm = torch.randperm(ds.n_images)
    t0 = time.perf_counter()
    for b in range(0, ds.n_images - bs + 1, bs):
        ds.normalized(perm[b : b + bs])
    mm = (ds.n_images // bs * bs) / (time.perf_counter() - t0)
    loader = torch.utils.data.DataLoader(
        jpeg_ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=workers
    )
    t0 = time.perf_counter()
    n = 0
    for x8 in loader:
        ds.normalize_uint8(x8)
        n += len(x8)
    return mm, n / (time.perf_counter() - t0)


def quality(a) -> None:
    """Full-data experts vs a random 100-pair subset on the embedded default dataset."""
    import json
    import statistics

    from lors_fast.engine.buffer import run

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_quality_"))
    cache = a.cache_dir or str(work / "cache")
    t0 = time.perf_counter()
    test = load_split("synthetic", "test")
    train = load_split("synthetic", "train")
    emb_tr = caption_embeddings(train, "minilm", cache_dir=cache)
    emb_te = caption_embeddings(test, "minilm", cache_dir=cache)
    t_text = time.perf_counter() - t0
    cfg = BufferConfig.from_preset(
        "synthetic",
        out=str(work / "store"),
        cache_dir=cache,
        threads=a.threads,
        experts=a.experts,
        epochs=a.buffer_epochs,
    )
    t0 = time.perf_counter()
    run(cfg)  # resumable: experts already in the store are skipped; their recorded times are used below
    t_wall = time.perf_counter() - t0
    from lors_fast.engine.trajectories import TrajectoryStore

    store = TrajectoryStore(cfg.out)
    infos = [store.read_extra(i)[1] for i in store.expert_ids]
    full = [r["metrics"]["r_mean"] for r in infos]
    secs = [r["seconds"] for r in infos]
    t_buf = sum(secs)
    # random 100 *pairs*: 100 random train images, each with one random caption of its own (fixed)
    g = torch.Generator().manual_seed(0)
    sub_idx = torch.randperm(train.n_images, generator=g)[:100]
    pick = [
        train.img2txt[i][int(torch.randint(len(train.img2txt[i]), (1,), generator=g))]
        for i in sub_idx.tolist()
    ]
    from lors_fast.data.datasets import PairDataset

    sub = PairDataset(
        images=train.images[sub_idx].clone(),
        captions=[train.captions[t] for t in pick],
        txt2img=torch.arange(100),
        img2txt=[[i] for i in range(100)],
        mean=train.mean,
        std=train.std,
        name="synthetic/train[random 100 pairs]",
        fingerprint="random100",
    )
    sub_emb = emb_tr[torch.tensor(pick)]
    rcfg = BufferConfig(
        out=str(work / "unused"),
        text_encoder="minilm",
        epochs=150,
        batch_size=100,
        lr_img=0.03,
        lr_txt=0.03,
        momentum=0.9,
        weight_decay=5e-4,
        captions="random",
        threads=a.threads,
    )
    rnd = []
    for seed in range(a.seeds):
        r = train_expert(
            seed, BufferConfig(**{**rcfg.__dict__, "seed": seed}), cfg.spec(384), sub, sub_emb, test, emb_te
        )
        rnd.append(r["metrics"]["r_mean"])

    def ms(v):
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"

    lines = [
        "",
        "## Embedded default dataset: full data vs random 100 pairs (test split, 1000 images / 5000 captions)",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; threads {a.threads}; load average {os.getloadavg()[0]:.1f} "
        "(other jobs shared the 2 cores, so times are upper bounds)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| MiniLM caption embeddings, train + test (cache cold/warm) | {t_text:.1f} s |",
        f"| buffer: {cfg.experts} experts × {cfg.epochs} epochs, 5000 images, bs {cfg.batch_size} | {t_buf:.1f} s training "
        f"({statistics.mean(secs):.1f} s per expert; this call's wall time {t_wall:.1f} s) |",
        f"| full-data experts ({cfg.epochs} epochs), test r_mean per expert | {', '.join(f'{v:.2f}' for v in full)} (mean {ms(full)}) |",
        f"| random 100 pairs (150 full-batch steps, lr 0.03, mom 0.9), {a.seeds} init seeds | {ms(rnd)} ({', '.join(f'{v:.2f}' for v in rnd)}) |",
        "",
        f"Reproduce: `python bench/bench_buffer.py --quality --experts {a.experts} --buffer-epochs {a.buffer_epochs} --seeds {a.seeds} --threads {a.threads}`",
        "",
    ]
    with open(a.results, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({"full": full, "random100": rnd, "buffer_s": t_buf, "text_s": t_text}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=1024)
    ap.add_argument("--jpeg-size", default="320x240", help="WxH of the generated JPEGs")
    ap.add_argument("--image-size", type=int, default=64, help="training resolution")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the JPEG path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(HERE / "RESULTS_CPU_buffer.md"))
    ap.add_argument("--workdir", default=None, help="fixture + cache folder (default: a temp dir)")
    ap.add_argument(
        "--quality", action="store_true", help="measure full-data vs random-100 on the embedded default"
    )
    ap.add_argument("--experts", type=int, default=4, help="--quality: experts of the default buffer")
    ap.add_argument("--buffer-epochs", type=int, default=3, help="--quality: epochs per expert")
    ap.add_argument("--seeds", type=int, default=3, help="--quality: init seeds of the random-100 baseline")
    ap.add_argument("--cache-dir", default=None, help="--quality: text-embedding cache (reuse a warm one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quality:
        quality(a)
        return
    w, h = (int(v) for v in a.jpeg_size.split("x"))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_buffer_"))
    t0 = time.perf_counter()
    root, ann = make_karpathy(work, "flickr", n_train=a.n_images, n_val=2, n_test=2, size=(w, h))
    t_fixture = time.perf_counter() - t0
    cfg = BufferConfig(
        dataset="flickr",
        root=str(root),
        ann_root=str(ann),
        cache_dir=str(work / "cache"),
        image_size=a.image_size,
        text_encoder="hash:384",
        experts=1,
        epochs=a.epochs,
        batch_size=a.batch_size,
        captions="random",
        eval_split=None,
        out=str(work / "store"),
    )
    shutil.rmtree(work / "cache" / "images", ignore_errors=True)  # time a cold cache build
    t0 = time.perf_counter()
    ds = load_split(
        "flickr", "train", root=root, ann_root=ann, cache_dir=work / "cache", image_size=a.image_size
    )
    t_cache = time.perf_counter() - t0
    emb = caption_embeddings(ds, "hash:384", cache_dir=work / "cache")
    spec = cfg.spec(384)
    jpeg_ds = JpegPairDataset("flickr", "train", root=root, ann_root=ann, image_size=a.image_size)
    mm_data, jpeg_data = data_only(ds, jpeg_ds, a.batch_size, a.workers)
    r = train_expert(0, cfg, spec, ds, emb)
    mm_train = r["images_per_s"]
    jpeg_train = jpeg_epochs(cfg, spec, ds, emb, jpeg_ds, a.workers)
    load = os.getloadavg()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        ("data path only (normalised batches)", mm_data, jpeg_data),
        (f"expert epoch (ConvNet {a.image_size}px, bs {a.batch_size}, train step)", mm_train, jpeg_train),
    ]
    lines = (
        [
            "## Buffer data path: memmap cache vs JPEG decode (CPU)",
            "",
            f"{stamp}; torch {torch.__version__}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {a.threads}, DataLoader workers {a.workers}; load average at the end {load[0]:.1f} / {load[1]:.1f} "
            "(other jobs shared the machine)",
            f"Fixture: {a.n_images} JPEGs {w}x{h} (generated in {t_fixture:.1f} s); cache build (decode + resize to "
            f"{a.image_size}px, once): {t_cache:.1f} s = {a.n_images / t_cache:.0f} img/s.",
            "",
            "| measurement | memmap cache (img/s) | JPEG decode every epoch (img/s) | speed-up |",
            "|---|---|---|---|",
        ]
        + [f"| {name} | {m:.0f} | {j:.0f} | {m / j:.2f}× |" for name, m, j in rows]
        + [
            "",
            f"Reproduce: `python bench/bench_buffer.py --n-images {a.n_images} --jpeg-size {a.jpeg_size} "
            f"--image-size {a.image_size} --epochs {a.epochs} --workers {a.workers} --threads {a.threads}`",
            "",
        ]
    )
    with open(a.results, "a") as f:  # results accumulate; delete the file to start afresh
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
