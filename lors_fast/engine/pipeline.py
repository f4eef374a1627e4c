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
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MainJobConfig", "run_main_job", "format_table"]

log = logging.getLogger(__name__)

#: test metrics shown in the table: (label, key of lors_fast.engine.metrics.retrieval_metrics)
COLUMNS = (("IR@1", "img_r1"), ("IR@5", "img_r5"), ("IR@10", "img_r10"),
           ("TR@1", "txt_r1"), ("TR@5", "txt_r5"), ("TR@10", "txt_r10"), ("r_mean", "r_mean"))


@dataclass
class MainJobConfig:
    """Options of the main job (the embedded default; everything else is the stages' presets)."""

    out: str = "runs/main"
    dataset: str = "synthetic"  # an embedded dataset: synthetic (the default) | synthetic-mm (many-to-many)
    cache_dir: str | None = None  # dataset, text embeddings and the buffer (default $LORS_FAST_CACHE or ~/.cache)
    rank: int = 10
    alpha: float | None = None  # None: the "default" distill preset's
    n_pairs: int = 100
    iterations: int | None = 100  # distillation iterations per run (None: the "default" preset's 300)
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
    lors_distill: dict = field(default_factory=dict)  # extra DistillConfig overrides of the LoRS run only
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
        if self.dataset not in ("synthetic", "synthetic-mm"):
            e.append(f"dataset must be 'synthetic' or 'synthetic-mm' (the embedded sets), got {self.dataset!r}")
        if isinstance(self.rank, int) and isinstance(self.n_pairs, int) and self.rank > self.n_pairs:
            e.append(f"rank ({self.rank}) must be <= n_pairs ({self.n_pairs})")
        if e:
            raise ValueError("invalid main-job config: " + "; ".join(e))


#: the evaluation protocol of the main job (EvalConfig overrides); see lors_fast.engine.evaluate
EVAL_DEFAULTS = dict(epochs=80, batch_size=128, eval_every=10, loss="infonce", runs=3)
#: fixed lr of the random-subset baseline (docs/LORS_NOTES.md "Calibration": insensitive in 0.01-0.1 on this data)
RANDOM_LR = 0.03


def _cache(cfg: MainJobConfig) -> Path:
    from lors_fast.data.datasets import default_cache_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def _say(cfg, msg):
    log.info(msg)  # stage lines (INFO); ``progress`` only governs progress bars


def _buffer(cfg: MainJobConfig, say) -> tuple[str, dict]:
    """Train (or reuse) the expert buffer of the embedded default."""
    from lors_fast.engine import buffer as buffer_stage

    name = f"{cfg.dataset}-default" if (cfg.n_train is None and cfg.text_encoder == "minilm" and not cfg.buffer) \
        else f"{cfg.dataset}-" + _digest({"n_train": cfg.n_train, "encoder": cfg.text_encoder, **cfg.buffer})
    bcfg = buffer_stage.BufferConfig.from_preset(
        "synthetic", dataset=cfg.dataset, out=str(_cache(cfg) / "buffers" / name), cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        n_train=cfg.n_train, text_encoder=cfg.text_encoder, **cfg.buffer)
    t0 = time.perf_counter()
    summary = buffer_stage.run(bcfg)
    say(f"[buffer] {bcfg.experts} experts x {bcfg.epochs} epochs at {bcfg.out} ({time.perf_counter() - t0:.0f} s)")
    return bcfg.out, summary


def _digest(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _distill_cfg(cfg: MainJobConfig, buffer: str, name: str, similarity: str, threads: int | None):
    from lors_fast.engine.distill_config import load_config

    over = dict(buffer=buffer, out=str(Path(cfg.out) / name), similarity=similarity, n_pairs=cfg.n_pairs,
                dataset=cfg.dataset,
                seed=cfg.seed, cache_dir=cfg.cache_dir, progress=cfg.progress and not cfg.parallel,
                threads=threads)
    if similarity == "lowrank":
        over["rank"] = cfg.rank
        if cfg.alpha is not None:
            over["alpha"] = cfg.alpha
    if cfg.iterations is not None:
        over["iterations"] = cfg.iterations
    over.update(cfg.distill)
    if similarity != "none":
        over.update(cfg.lors_distill)
    return load_config("default", **over)


def _distill_one(dcfg):
    """Run one distillation (in this process or a worker); returns (checkpoint path, seconds)."""
    from lors_fast.engine import distill

    t0 = time.perf_counter()
    res = distill.run(dcfg)
    return str(res.checkpoint), time.perf_counter() - t0


def _eval_cfg(cfg: MainJobConfig):
    from lors_fast.engine.evaluate import EvalConfig

    kw = {**EVAL_DEFAULTS, "runs": cfg.eval_runs, "seed": cfg.seed}
    if cfg.eval_epochs is not None:
        kw["epochs"] = cfg.eval_epochs
    kw.update(cfg.eval)
    return EvalConfig(**kw)


_EVAL_CONTEXT: dict = {}  # per process: (cache_dir, buffer) -> (spec, val, test, encoder, n_train)


def _eval_context(cache_dir, buffer: str, dataset: str = "synthetic"):
    key = (cache_dir, buffer, dataset)
    if key not in _EVAL_CONTEXT:
        from lors_fast.engine.evaluate import load_retrieval_set
        from lors_fast.engine.trajectories import TrajectoryStore
        from lors_fast.models import StudentSpec

        store = TrajectoryStore(buffer)
        enc = store.meta.get("encoder", "minilm")
        _EVAL_CONTEXT[key] = (StudentSpec.from_dict(store.meta["spec"]),
                              load_retrieval_set(dataset, "val", text_encoder=enc, cache_dir=cache_dir),
                              load_retrieval_set(dataset, "test", text_encoder=enc, cache_dir=cache_dir),
                              enc, store.meta.get("n_train"))
    return _EVAL_CONTEXT[key]


_RANDOM_SUBSET: dict = {}  # per process: the random real pairs (the same for every evaluation seed)


def _random_subset(cfg: MainJobConfig, encoder: str, n_train):
    key = (cfg.cache_dir, cfg.dataset, encoder, n_train, cfg.n_pairs, cfg.seed)
    if key not in _RANDOM_SUBSET:
        from lors_fast.data.datasets import load_split
        from lors_fast.data.text import caption_embeddings
        from lors_fast.engine.coreset import random_pairs

        train = load_split(cfg.dataset, "train", cache_dir=cfg.cache_dir, n_images=n_train)
        emb = caption_embeddings(train, encoder, cache_dir=cfg.cache_dir)
        img_idx, cap_idx = random_pairs(cfg.n_pairs, train.img2txt, seed=cfg.seed)
        _RANDOM_SUBSET[key] = (train.normalized(img_idx), emb[cap_idx])
    return _RANDOM_SUBSET[key]


def _eval_one(cfg: MainJobConfig, buffer: str, ckpt: str | None, k: int, threads: int | None):
    """Evaluation run ``k`` (seed ``eval seed + k``) of one set: a distilled checkpoint, or the random real
    subset when ``ckpt`` is None. The same network, data order and numbers as run k of
    :func:`lors_fast.engine.evaluate.evaluate_synset`; returns (run dict, lr_img, lr_txt, seconds)."""
    import torch

    from lors_fast.engine.evaluate import train_on_synset

    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec, val, test, encoder, n_train = _eval_context(cfg.cache_dir, buffer, cfg.dataset)
    ecfg = _eval_cfg(cfg)
    if ckpt is None:
        images, texts = _random_subset(cfg, encoder, n_train)
        target, lr_img, lr_txt = None, RANDOM_LR, RANDOM_LR
    else:
        from lors_fast.data.distilled import load_distilled

        ds = load_distilled(ckpt)
        images, texts, target, lr_img, lr_txt = ds.images, ds.texts, ds.target(), ds.lr_img, ds.lr_txt
    lr_img = ecfg.lr_img if ecfg.lr_img is not None else lr_img
    lr_txt = ecfg.lr_txt if ecfg.lr_txt is not None else lr_txt
    run = train_on_synset(spec, images, texts, target, lr_img, lr_txt, ecfg, seed=ecfg.seed + k, val=val,
                          test=test)
    return run, float(lr_img), float(lr_txt), time.perf_counter() - t0


class _Done:
    """A task already run (the serial schedule): the interface of ``multiprocessing``'s AsyncResult."""

    def __init__(self, fn, args):
        try:
            self._value, self._error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - re-raised by get(), as a worker's would be
            self._value, self._error = None, e

    def ready(self) -> bool:
        return True

    def get(self, timeout=None):
        if self._error is not None:
            raise self._error
        return self._value


class _Schedule:
    """The distill + eval schedule of the main job: setup in ``__init__`` (the stage configs, the worker pool),
    :meth:`submit`, :meth:`step` (collect what finished and queue what it unlocks), :meth:`run` (until nothing
    is pending) and :meth:`close`.

    Parallel schedule (two spawn workers, one thread each, on two or more cores): both distillations start at
    once; the random subset's seeds queue behind them and each set's seeds are queued as soon as its
    distillation ends, so no core waits for a stage boundary; a failed task stops the workers at once (a running
    distillation's atomic checkpoint stays resumable). Serial schedule: the same tasks one after the other, in
    this process. Per-seed results are the same either way."""

    def __init__(self, cfg: MainJobConfig, buffer: str, say):
        self.cfg, self.buffer, self.say = cfg, buffer, say
        runs = {"lors": "lowrank"}
        if cfg.baseline:
            runs["tm"] = "none"
        self.sets = list(runs) + (["random"] if cfg.random_subset else [])
        self.parallel = cfg.parallel and (os.cpu_count() or 1) >= 2
        self.threads = 1 if self.parallel else None
        self.cfgs = {name: _distill_cfg(cfg, buffer, name, sim, self.threads) for name, sim in runs.items()}
        self.n_tasks = sum(c.iterations for c in self.cfgs.values()) + len(self.sets) * cfg.eval_runs
        self.pool = None
        if self.parallel:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(2)
        self.pending: dict = {}  # task handle -> ("distill" | "eval", set name, seed index)
        self.distilled: dict = {}  # name -> (checkpoint, seconds)
        self.evals: dict = {name: {} for name in self.sets}  # name -> seed index -> _eval_one's tuple
        self.bar = None

    def submit(self, what: str, name: str, k, fn, *args) -> None:
        handle = self.pool.apply_async(fn, args) if self.pool is not None else _Done(fn, args)
        self.pending[handle] = (what, name, k)

    def _eval(self, name: str, ckpt: str | None) -> None:
        for k in range(self.cfg.eval_runs):
            self.submit("eval", name, k, _eval_one, self.cfg, self.buffer, ckpt, k, self.threads)

    def step(self) -> None:
        """Collect every finished task (raising the first failure) and queue the evaluations it unlocks."""
        from lors_fast.engine.evaluate import summarize

        done = [h for h in self.pending if h.ready()]
        if not done:
            time.sleep(0.5)
        for h in done:
            what, name, k = self.pending.pop(h)
            result = h.get()
            if what == "distill":
                self.distilled[name] = result
                self.say(f"[distill] {name}: {result[0]} ({result[1]:.0f} s)")
                self._eval(name, result[0])
            else:
                self.evals[name][k] = result
                if len(self.evals[name]) == self.cfg.eval_runs:
                    self.say(f"[eval] {name}: {_short(_collect(self.evals[name], summarize))}")
        if self.bar is not None:
            steps = sum(_lines(Path(c.out) / "metrics.jsonl") for c in self.cfgs.values())
            done_evals = sum(len(v) for v in self.evals.values())
            self.bar.n = min(steps, self.n_tasks - len(self.sets) * self.cfg.eval_runs) + done_evals
            self.bar.refresh()

    def run(self) -> tuple[dict, dict, float]:
        """Returns (distilled: name -> (checkpoint, seconds), results: name -> evaluation dict, wall seconds)."""
        from lors_fast.engine.evaluate import summarize

        cfg, t0 = self.cfg, time.perf_counter()
        if self.parallel:
            self.say(f"[distill+eval] {', '.join(self.cfgs)} ({self.cfgs['lors'].iterations} iterations each), "
                     f"then {cfg.eval_runs} evaluation seeds of {', '.join(self.sets)}, on 2 worker processes...")
            if cfg.progress:  # (serially, the distillation shows its own bar)
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.n_tasks, desc="distill+eval", unit="step", dynamic_ncols=True)
        for name, c in self.cfgs.items():
            if not self.parallel:
                self.say(f"[distill] {name} ({c.iterations} iterations)...")
            self.submit("distill", name, None, _distill_one, c)
        if cfg.random_subset:
            self._eval("random", None)
        while self.pending:
            self.step()
        results = {name: _collect(self.evals[name], summarize) for name in self.sets}
        return self.distilled, results, time.perf_counter() - t0

    def close(self) -> None:
        """Stop the workers now: after a failure nothing queued runs, and a running task is not waited for."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> _Schedule:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _distill_and_evaluate(cfg: MainJobConfig, buffer: str, say) -> tuple[dict, dict, float]:
    """Distill LoRS (and the baseline) and evaluate every set, seed by seed (see :class:`_Schedule`)."""
    with _Schedule(cfg, buffer, say) as schedule:
        return schedule.run()


def _collect(by_seed: dict, summarize) -> dict:
    runs = [by_seed[k][0] for k in sorted(by_seed)]
    first = by_seed[min(by_seed)]
    return {"summary": summarize(runs), "runs": runs, "lr_img": first[1], "lr_txt": first[2],
            "seconds": sum(v[3] for v in by_seed.values())}


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


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
    from lors_fast.data.io import atomic_write

    def say(msg):
        _say(cfg, msg)

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    buffer, _ = _buffer(cfg, say)
    timings["buffer"] = time.perf_counter() - t
    distilled, results, timings["distill+eval"] = _distill_and_evaluate(cfg, buffer, say)
    timings["distill (cpu, per run)"] = max((v[1] for v in distilled.values()), default=0.0)
    timings["eval (cpu, all seeds)"] = sum(r["seconds"] for r in results.values())
    timings["total"] = time.perf_counter() - t0
    table = format_table(results, cfg)
    pictures = sorted(str(p) for p in out.glob("*/*.png"))
    record = {"config": asdict(cfg), "buffer": buffer, "timings_s": timings,
              "checkpoints": {k: v[0] for k, v in distilled.items()},
              "summaries": {k: v["summary"] for k, v in results.items()},
              "run_r_mean": {k: [(r.get("val_selected") or {}).get("test", {}).get("r_mean") for r in v["runs"]]
                             for k, v in results.items()},  # per evaluation seed (paired comparisons)
              "learned_lrs": {k: [v.get("lr_img"), v.get("lr_txt")] for k, v in results.items()},
              "table_markdown": table, "pictures": pictures}
    atomic_write(out / "results.json", json.dumps(record, indent=1).encode())
    md = (f"# Main job: {cfg.n_pairs} pairs, embedded dataset {cfg.dataset}\n\nTest split, metrics at the epoch selected "
          f"on val, mean ± std over {cfg.eval_runs} evaluation seeds (last column: final epoch).\n\n{table}\n\n"
          f"Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n")
    atomic_write(out / "results.md", md.encode())
    log.debug("\n%s\ntotal %.0f s; results: %s", table, timings["total"], out / "results.md")  # the CLI prints them
    return record
