"""The main job on the embedded default dataset, end to end.

``lors-fast distill --rank 10`` without ``--buffer`` runs this: build the synthetic dataset and its
text-embedding cache, train a small expert buffer when none exists (and reuse it next time), distill
``n_pairs`` pairs with rank-r LoRS and the no-mining trajectory-matching baseline (similarity "none"), pick
a random real subset of the same size, evaluate the three with ``eval_runs`` seeds, and print a table.

Everything lands under ``out``: ``lors/`` and ``tm/`` (the two distillation runs: checkpoints, metrics,
pictures), ``results.json`` and ``results.md``. The buffer lives in the cache (``<cache>/buffers/...``) so
that later runs, in any output folder, reuse it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MainJobConfig", "run_main_job", "format_table"]

#: test metrics shown in the table: (label, key of lors_fast.metrics.retrieval_metrics)
COLUMNS = (("IR@1", "img_r1"), ("IR@5", "img_r5"), ("IR@10", "img_r10"),
           ("TR@1", "txt_r1"), ("TR@5", "txt_r5"), ("TR@10", "txt_r10"), ("r_mean", "r_mean"))


@dataclass
class MainJobConfig:
    """Options of the main job (the embedded default; everything else is the stages' presets)."""

    out: str = "runs/main"
    cache_dir: str | None = None  # dataset, text embeddings and the buffer (default $LORS_FAST_CACHE or ~/.cache)
    rank: int = 10
    alpha: float | None = None  # None: the "default" distill preset's
    n_pairs: int = 100
    iterations: int | None = 150  # distillation iterations per run (None: the "default" preset's 300)
    eval_runs: int = 3
    eval_epochs: int | None = None  # None: EVAL_DEFAULTS
    seed: int = 0
    n_train: int | None = None  # train images of the synthetic set (None: the dataset's default)
    text_encoder: str = "minilm"  # caption encoder of buffer, distillation and evaluation
    baseline: bool = True  # also distill the no-mining (similarity "none") baseline
    random_subset: bool = True  # also evaluate a random real subset
    parallel: bool = True  # distill LoRS and the baseline in two processes (one thread each)
    progress: bool = True
    distill: dict = field(default_factory=dict)  # extra DistillConfig overrides
    buffer: dict = field(default_factory=dict)  # extra BufferConfig overrides
    eval: dict = field(default_factory=dict)  # extra EvalConfig overrides

    def __post_init__(self) -> None:
        e = []
        for name, lo in (("rank", 1), ("n_pairs", 2), ("eval_runs", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                e.append(f"{name} must be an int >= {lo}, got {v!r}")
        for name in ("iterations", "eval_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                e.append(f"{name} must be a non-negative int or None, got {v!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            e.append(f"alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.rank, int) and isinstance(self.n_pairs, int) and self.rank > self.n_pairs:
            e.append(f"rank ({self.rank}) must be <= n_pairs ({self.n_pairs})")
        if e:
            raise ValueError("invalid main-job config: " + "; ".join(e))


#: the evaluation protocol of the main job (EvalConfig overrides); see lors_fast.evaluate
EVAL_DEFAULTS = dict(epochs=100, batch_size=128, eval_every=10, loss="infonce", runs=3)
#: fixed lr of the random-subset baseline (CALIBRATION.md: insensitive in 0.01-0.1 on this data)
RANDOM_LR = 0.03


def _cache(cfg: MainJobConfig) -> Path:
    from .data import default_cache_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def _say(cfg, msg):
    print(msg, flush=True)  # stage lines and the table always; ``progress`` only governs progress bars


def _buffer(cfg: MainJobConfig, say) -> tuple[str, dict]:
    """Train (or reuse) the expert buffer of the embedded default."""
    from . import buffer as buffer_stage

    name = "synthetic-default" if (cfg.n_train is None and cfg.text_encoder == "minilm" and not cfg.buffer) else \
        "synthetic-" + _digest({"n_train": cfg.n_train, "encoder": cfg.text_encoder, **cfg.buffer})
    bcfg = buffer_stage.BufferConfig.from_preset(
        "synthetic", out=str(_cache(cfg) / "buffers" / name), cache_dir=cfg.cache_dir, progress=cfg.progress,
        n_train=cfg.n_train, text_encoder=cfg.text_encoder, **cfg.buffer)
    t0 = time.perf_counter()
    summary = buffer_stage.run(bcfg)
    say(f"[buffer] {bcfg.experts} experts x {bcfg.epochs} epochs at {bcfg.out} ({time.perf_counter() - t0:.0f} s)")
    return bcfg.out, summary


def _digest(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _distill_cfg(cfg: MainJobConfig, buffer: str, name: str, similarity: str, threads: int | None):
    from .distill_config import load_config

    over = dict(buffer=buffer, out=str(Path(cfg.out) / name), similarity=similarity, n_pairs=cfg.n_pairs,
                seed=cfg.seed, cache_dir=cfg.cache_dir, progress=cfg.progress and not cfg.parallel,
                threads=threads)
    if similarity == "lowrank":
        over["rank"] = cfg.rank
        if cfg.alpha is not None:
            over["alpha"] = cfg.alpha
    if cfg.iterations is not None:
        over["iterations"] = cfg.iterations
    over.update(cfg.distill)
    return load_config("default", **over)


def _distill_one(dcfg):
    """Run one distillation (in this process or a worker); returns (checkpoint path, seconds)."""
    from . import distill

    t0 = time.perf_counter()
    res = distill.run(dcfg)
    return str(res.checkpoint), time.perf_counter() - t0


def _distill_all(cfg: MainJobConfig, buffer: str, say) -> dict:
    runs = {"lors": "lowrank"}
    if cfg.baseline:
        runs["tm"] = "none"
    parallel = cfg.parallel and len(runs) > 1 and (os.cpu_count() or 1) >= 2
    threads = 1 if parallel else None
    cfgs = {name: _distill_cfg(cfg, buffer, name, sim, threads) for name, sim in runs.items()}
    out = {}
    if parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        say(f"[distill] {', '.join(cfgs)} in parallel ({cfgs['lors'].iterations} iterations each)...")
        with ProcessPoolExecutor(len(cfgs), mp_context=mp.get_context("spawn")) as ex:
            futs = {name: ex.submit(_distill_one, c) for name, c in cfgs.items()}
            for name, f in futs.items():
                out[name] = f.result()
    else:
        for name, c in cfgs.items():
            say(f"[distill] {name} ({c.iterations} iterations)...")
            out[name] = _distill_one(c)
    for name, (path, sec) in out.items():
        say(f"[distill] {name}: {path} ({sec:.0f} s)")
    return out


def _eval_cfg(cfg: MainJobConfig):
    from .evaluate import EvalConfig

    kw = {**EVAL_DEFAULTS, "runs": cfg.eval_runs, "seed": cfg.seed}
    if cfg.eval_epochs is not None:
        kw["epochs"] = cfg.eval_epochs
    kw.update(cfg.eval)
    return EvalConfig(**kw)


def _evaluate_all(cfg: MainJobConfig, buffer: str, distilled: dict, say) -> dict:
    from .coreset import random_pairs
    from .data import load_split
    from .distill import load_distilled
    from .evaluate import evaluate_real_subset, evaluate_synset, load_retrieval_set
    from .models import StudentSpec
    from .text import caption_embeddings
    from .trajectories import TrajectoryStore

    store = TrajectoryStore(buffer)
    spec = StudentSpec.from_dict(store.meta["spec"])
    encoder = store.meta.get("encoder", "minilm")
    ecfg = _eval_cfg(cfg)
    val = load_retrieval_set("synthetic", "val", text_encoder=encoder, cache_dir=cfg.cache_dir)
    test = load_retrieval_set("synthetic", "test", text_encoder=encoder, cache_dir=cfg.cache_dir)
    results = {}
    for name, (path, _) in distilled.items():
        t0 = time.perf_counter()
        ds = load_distilled(path)
        res = evaluate_synset(spec, ds.images, ds.texts, ds.target(), ds.lr_img, ds.lr_txt, ecfg, val=val,
                              test=test)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        say(f"[eval] {name}: {_short(res)} ({res['seconds']:.0f} s)")
    if cfg.random_subset:
        t0 = time.perf_counter()
        train = load_split("synthetic", "train", cache_dir=cfg.cache_dir, n_images=store.meta.get("n_train"))
        emb = caption_embeddings(train, encoder, cache_dir=cfg.cache_dir)
        img_idx, cap_idx = random_pairs(cfg.n_pairs, train.img2txt, seed=cfg.seed)
        res = evaluate_real_subset(spec, train.normalized(img_idx), emb[cap_idx], RANDOM_LR, ecfg, val=val,
                                   test=test)
        res["seconds"] = time.perf_counter() - t0
        results["random"] = res
        say(f"[eval] random: {_short(res)} ({res['seconds']:.0f} s)")
    return results


def _short(res: dict) -> str:
    s = res["summary"]
    sel = s.get("val_selected", s.get("final"))
    return f"r_mean {sel['r_mean']['mean']:.2f} ± {sel['r_mean']['std']:.2f}"


LABELS = {"lors": "LoRS (rank {rank})", "tm": "TM, no mining (S = I)", "random": "random real subset"}


def format_table(results: dict, cfg: MainJobConfig, protocol: str = "val_selected") -> str:
    """Markdown table of test metrics, mean ± std over the evaluation seeds."""
    head = f"| set ({cfg.n_pairs} pairs) | " + " | ".join(c for c, _ in COLUMNS) + " | final r_mean |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, res in results.items():
        s = res["summary"]
        m = s.get(protocol, s.get("final"))
        cells = [f"{m[k]['mean']:.2f} ± {m[k]['std']:.2f}" for _, k in COLUMNS]
        fin = s.get("final")
        cells.append(f"{fin['r_mean']['mean']:.2f} ± {fin['r_mean']['std']:.2f}" if fin else "-")
        lines.append(f"| {LABELS.get(name, name).format(rank=cfg.rank)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_main_job(cfg: MainJobConfig) -> dict:
    """The whole pipeline; returns the results dict that is also written to ``<out>/results.json``."""
    from .io import atomic_write

    def say(msg):
        _say(cfg, msg)

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    buffer, _ = _buffer(cfg, say)
    timings["buffer"] = time.perf_counter() - t
    t = time.perf_counter()
    distilled = _distill_all(cfg, buffer, say)
    timings["distill"] = time.perf_counter() - t
    t = time.perf_counter()
    results = _evaluate_all(cfg, buffer, distilled, say)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    table = format_table(results, cfg)
    pictures = sorted(str(p) for p in out.glob("*/*.png"))
    record = {"config": asdict(cfg), "buffer": buffer, "timings_s": timings,
              "checkpoints": {k: v[0] for k, v in distilled.items()},
              "summaries": {k: v["summary"] for k, v in results.items()},
              "learned_lrs": {k: [v.get("lr_img"), v.get("lr_txt")] for k, v in results.items()},
              "table_markdown": table, "pictures": pictures}
    atomic_write(out / "results.json", json.dumps(record, indent=1).encode())
    md = (f"# Main job: {cfg.n_pairs} pairs, embedded default dataset\n\nTest split, metrics at the epoch selected "
          f"on val, mean ± std over {cfg.eval_runs} evaluation seeds (last column: final epoch).\n\n{table}\n\n"
          f"Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n")
    atomic_write(out / "results.md", md.encode())
    say("\n" + table)
    say(f"\ntotal {timings['total']:.0f} s; results: {out / 'results.md'}")
    if pictures:
        say("pictures:\n  " + "\n  ".join(pictures))
    return record
