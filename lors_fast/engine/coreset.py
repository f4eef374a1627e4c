"""Coreset baselines: N real (image, caption) pairs chosen by random, herding, k-center or forgetting.

Each method returns ``(image_idx (N,), caption_idx (N,))`` with N DISTINCT images (one caption each), and
the pairs are evaluated by the same trainer as distilled sets (:func:`lors_fast.engine.evaluate.evaluate_real_subset`:
identity targets, one fixed lr for both branches).

Feature space of herding and k-center: the frozen caption embeddings (MiniLM by default, the same
vectors the student's text head reads). Candidates are captions; once a caption is picked, the other
captions of its image are no longer eligible. The choice is deliberate: these features exist before any
training (no expert buffer needed), are deterministic, and are what the paper's text side is made of.
Any (n_cap, d) feature matrix can be passed to :func:`select_pairs` instead.

* random — N images uniformly without replacement, one uniformly random caption each (seeded).
* herding — greedy mean matching (Welling 2009): step k picks the caption x that brings the mean of the
  picked set closest to the mean of all captions, ‖μ − (s + x)/k‖.
* kcenter — greedy farthest point (Sener & Savarese 2018): start at the caption nearest to μ, then
  repeatedly pick the caption farthest (Euclidean) from everything picked so far.
* forgetting — Toneva et al. 2019: the N images with the most forgetting events counted during buffer
  training (``<store>/forgetting.safetensors``, tensor ``events`` (n_img,)), ties broken by a seeded random
  order; one seeded random caption each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lors_fast.engine.evaluate import EvalConfig

__all__ = ["METHODS", "CoresetConfig", "select_pairs", "random_pairs", "herding_pairs", "kcenter_pairs",
           "forgetting_pairs", "load_forgetting_events", "run"]

METHODS = ("random", "herding", "kcenter", "forgetting")

log = logging.getLogger(__name__)


def _owners(txt2img, n_img: int) -> torch.Tensor:
    t = torch.as_tensor(txt2img, dtype=torch.long).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_img):
        raise ValueError(f"txt2img values must lie in [0, {n_img})")
    return t


def _check_n(n: int, n_img: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n > n_img:
        raise ValueError(f"n = {n} exceeds the number of images ({n_img}): a coreset uses distinct images")


def _random_caption(img_idx: torch.Tensor, img2txt, gen: torch.Generator) -> torch.Tensor:
    caps = []
    for i in img_idx.tolist():
        c = img2txt[i]
        caps.append(c[int(torch.randint(len(c), (1,), generator=gen))])
    return torch.tensor(caps, dtype=torch.long)


def random_pairs(n: int, img2txt, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images drawn uniformly without replacement (seeded), each with one random caption of its own;
    returns (image indices, caption indices)."""
    _check_n(n, len(img2txt))
    gen = torch.Generator().manual_seed(seed)
    img = torch.randperm(len(img2txt), generator=gen)[:n]
    return img, _random_caption(img, img2txt, gen)


def _check_features(features: torch.Tensor, n_cap: int) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.dtype.is_floating_point:
        raise ValueError(f"features must be a 2-D float tensor (n_captions, d), got {getattr(features, 'shape', type(features))}")
    if features.shape[0] != n_cap:
        raise ValueError(f"features have {features.shape[0]} rows, expected one per caption ({n_cap})")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    # float64 when it fits comfortably (exact greedy choices in tests), float32 for big train sets
    return features.double() if features.numel() <= 20_000_000 else features.float()


def herding_pairs(features: torch.Tensor, txt2img, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy herding over captions; returns (image_idx, caption_idx)."""
    owners = _owners(txt2img, int(torch.as_tensor(txt2img).max()) + 1 if len(txt2img) else 0)
    x = _check_features(features, owners.numel())
    _check_n(n, int(owners.max()) + 1)
    sq = (x * x).sum(1)
    mu = x.mean(0)
    s = torch.zeros_like(mu)
    free = torch.ones(x.shape[0], dtype=torch.bool)
    caps = []
    for k in range(1, n + 1):
        # ‖μ − (s + x)/k‖² = const − (2/k)(μ − s/k)·x + ‖x‖²/k²  (one matrix–vector product per step)
        d = (sq / k**2 - (2.0 / k) * (x @ (mu - s / k))).masked_fill(~free, float("inf"))
        c = int(d.argmin())
        caps.append(c)
        s += x[c]
        free &= owners != owners[c]
    cap = torch.tensor(caps, dtype=torch.long)
    return owners[cap], cap


def kcenter_pairs(features: torch.Tensor, txt2img, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center (farthest point) over captions; returns (image_idx, caption_idx)."""
    owners = _owners(txt2img, int(torch.as_tensor(txt2img).max()) + 1 if len(txt2img) else 0)
    x = _check_features(features, owners.numel())
    _check_n(n, int(owners.max()) + 1)
    sq = (x * x).sum(1)

    def dist2(c: int) -> torch.Tensor:  # ‖x − x_c‖² for all rows, via one matrix–vector product
        return (sq - 2.0 * (x @ x[c]) + sq[c]).clamp_(min=0.0)

    mu = x.mean(0)
    first = int((sq - 2.0 * (x @ mu)).argmin())  # nearest to the mean
    caps = [first]
    mind = dist2(first)
    free = owners != owners[first]
    for _ in range(n - 1):
        c = int(mind.masked_fill(~free, -1.0).argmax())
        caps.append(c)
        mind = torch.minimum(mind, dist2(c))
        free &= owners != owners[c]
    cap = torch.tensor(caps, dtype=torch.long)
    return owners[cap], cap


def load_forgetting_events(store_root: str | Path) -> torch.Tensor:
    """``events`` (n_img,) from ``<store_root>/forgetting.safetensors`` (written by the buffer stage)."""
    from lors_fast.data.io import load_safetensors_checked

    path = Path(store_root) / "forgetting.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"forgetting events not found: {path} (written by `lors-fast buffer` into the "
                                "trajectory store root)")
    t, _ = load_safetensors_checked(path, keys=["events"])
    ev = t["events"]
    if ev.dim() != 1:
        raise ValueError(f"{path}: tensor 'events' must be 1-D (n_img,), got shape {tuple(ev.shape)}")
    return ev


def forgetting_pairs(events: torch.Tensor, img2txt, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most-forgotten images (ties in a seeded random order), one seeded random caption each."""
    ev = torch.as_tensor(events)
    if ev.dim() != 1 or ev.numel() != len(img2txt):
        raise ValueError(f"events must have shape ({len(img2txt)},) (one count per image), got {tuple(ev.shape)}")
    _check_n(n, len(img2txt))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(ev.numel(), generator=gen)
    ranked = order[torch.sort(ev.double()[order], descending=True, stable=True).indices]
    img = ranked[:n]
    return img, _random_caption(img, img2txt, gen)


def select_pairs(method: str, n: int, *, txt2img, img2txt, features: torch.Tensor | None = None,
                 events: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to one method; ``features`` (n_cap, d) for herding/kcenter, ``events`` (n_img,) for forgetting."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random":
        return random_pairs(n, img2txt, seed=seed)
    if method == "forgetting":
        if events is None:
            raise ValueError("method 'forgetting' needs events (the buffer's forgetting counts)")
        return forgetting_pairs(events, img2txt, n, seed=seed)
    if features is None:
        raise ValueError(f"method {method!r} needs features (n_captions, d)")
    fn = herding_pairs if method == "herding" else kcenter_pairs
    return fn(features, txt2img, n)


@dataclass
class CoresetConfig:
    """``lors-fast coreset``: which subset, how it is trained (``eval``), where results go."""

    method: str = "random"
    n: int = 100
    seed: int = 0  # subset seed (random / forgetting ties and captions)
    lr: float = 0.03  # fixed lr of both branches (docs/LORS_NOTES.md "Calibration": random-100 is insensitive in 0.01–0.1)
    dataset: str = "synthetic"
    buffer: str | None = None  # trajectory store root: forgetting events (and the student spec, if present)
    data_root: str | None = None
    ann_root: str | None = None
    cache_dir: str | None = None
    text_encoder: str = "minilm"
    out: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        errs = []
        if self.method not in METHODS:
            errs.append(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            errs.append(f"n must be a positive int, got {self.n!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            errs.append(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.lr, (int, float)) or not (self.lr > 0):
            errs.append(f"lr must be > 0, got {self.lr!r}")
        if self.dataset not in ("synthetic", "flickr", "coco"):
            errs.append(f"dataset must be one of ('synthetic', 'flickr', 'coco'), got {self.dataset!r}")
        if self.method == "forgetting" and self.buffer is None:
            errs.append("method 'forgetting' needs buffer (the trajectory store root with forgetting.safetensors)")
        if not isinstance(self.eval, EvalConfig):
            errs.append(f"eval must be an EvalConfig, got {type(self.eval).__name__}")
        if errs:
            raise ValueError("invalid CoresetConfig: " + "; ".join(errs))

    def to_dict(self) -> dict:
        """The config as a plain dict (JSON-serialisable)."""
        return asdict(self)


def run(cfg: CoresetConfig, progress=log.info) -> dict:
    """Select the coreset on the train split, evaluate it (cfg.eval protocol), write cfg.out (JSON) if set.

    Under torchrun the evaluation seeds are spread over the ranks (same result); rank 0 reports and writes."""
    from lors_fast.engine import dist

    with dist.group(cfg.eval.device):
        return _run(cfg, progress if dist.is_main() else None)


def _run(cfg: CoresetConfig, progress) -> dict:
    from lors_fast.data.datasets import load_split
    from lors_fast.data.text import caption_embeddings
    from lors_fast.engine import dist
    from lors_fast.engine.evaluate import (
        check_run_setup,
        evaluate_real_subset,
        format_summary,
        load_retrieval_set,
    )
    from lors_fast.models import StudentSpec

    check_run_setup(cfg.eval.device, cfg.out)
    if cfg.buffer is not None:
        root = Path(cfg.buffer)
        if not root.is_dir():
            raise FileNotFoundError(f"buffer (--buffer) {root}: trajectory store folder not found")
        if not (root / "index.json").is_file() and cfg.method != "forgetting":
            raise FileNotFoundError(f"buffer (--buffer) {root}: no index.json, expected a trajectory store "
                                    "(from `lors-fast buffer`)")
    kw = dict(root=cfg.data_root, ann_root=cfg.ann_root, cache_dir=cfg.cache_dir)
    ds = load_split(cfg.dataset, "train", **kw)
    emb = caption_embeddings(ds, cfg.text_encoder, cache_dir=cfg.cache_dir)
    events = load_forgetting_events(cfg.buffer) if cfg.method == "forgetting" else None
    img_idx, cap_idx = select_pairs(cfg.method, cfg.n, txt2img=ds.txt2img, img2txt=ds.img2txt, features=emb,
                                    events=events, seed=cfg.seed)
    spec = StudentSpec(image_size=int(ds.images.shape[-1]), text_dim=int(emb.shape[1]))
    if cfg.buffer is not None and (Path(cfg.buffer) / "index.json").is_file():
        from lors_fast.engine.trajectories import TrajectoryStore

        spec = StudentSpec.from_dict(TrajectoryStore(cfg.buffer).meta["spec"])
    rkw = dict(text_encoder=cfg.text_encoder, data_root=cfg.data_root, ann_root=cfg.ann_root, cache_dir=cfg.cache_dir)
    test = load_retrieval_set(cfg.dataset, cfg.eval.test_split, **rkw)
    val = load_retrieval_set(cfg.dataset, cfg.eval.val_split, **rkw) if cfg.eval.val_split else None
    res = evaluate_real_subset(spec, ds.normalized(img_idx), emb[cap_idx], cfg.lr, cfg.eval, val=val, test=test,
                               progress=progress)
    res.update(method=cfg.method, n=cfg.n, image_idx=img_idx.tolist(), caption_idx=cap_idx.tolist(),
               config=cfg.to_dict(), spec=spec.to_dict(), dataset=ds.name)
    log.debug("coreset %s n=%d on %s:\n%s", cfg.method, cfg.n, ds.name,
              format_summary(res["summary"]))  # the CLI prints it
    if cfg.out and dist.is_main():
        from lors_fast.data.io import atomic_write

        atomic_write(Path(cfg.out), json.dumps(res, indent=1, sort_keys=True).encode())
    return res
