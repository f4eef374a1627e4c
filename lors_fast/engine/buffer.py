"""Stage 1: train expert CLIP-style students and record their trajectories (``lors-fast buffer``).

Each expert is a fresh student (:func:`lors_fast.models.build_student`) trained with symmetric InfoNCE
(identity targets, T = 0.07 — the reference's expert loss) by SGD with two parameter groups (image
encoder at ``lr_img``, text head at ``lr_txt``; reference defaults: 0.1 / 0.1, momentum 0, no weight
decay, constant lr). Snapshot 0 is the initialisation, then one per epoch, written to a
:class:`~lors_fast.engine.trajectories.TrajectoryStore`.

Data per epoch (``captions``): "random" pairs every image with one random caption of its own (an epoch
= n_img pairs; the embedded default), "all" uses every (caption, image) entry once (an epoch = n_cap
pairs; the reference's Flickr/COCO loader, one entry per caption). Batches drop the last partial batch
as the reference does. Augmentation (``augment``): "none", "flip" or "crop_flip" (random resized crop,
scale 0.5–1, + horizontal flip, on the cached tensors). Never flip the synthetic set: its captions
say "left" and "right".

Determinism: expert ``i`` draws everything (init, data order, augmentation, dropout) from seeds derived
from (``seed``, i), so it is the same whichever process trains it. Under torchrun (WORLD_SIZE > 1) the
experts are sharded — expert i on rank i % world — over the torchrun process group (gloo on CPU, NCCL on
GPU; :mod:`lors_fast.engine.dist`, kept for later stages); rank 0 writes the index and the forgetting statistics.

Forgetting events (for the forgetting coreset): per train image, the number of presentations at which
its in-batch image→text retrieval (row argmax of the logits) was wrong after having been right at its
previous presentation, summed over experts, with the number of presentations
(``forgetting.safetensors``: "events", "presentations", float32 (n_img,)).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from lors_fast.data.datasets import DATASETS, PairDataset, load_split
from lors_fast.data.io import save_safetensors_atomic
from lors_fast.engine import dist
from lors_fast.engine.trajectories import TrajectoryStore
from lors_fast.models import FlatModel, StudentSpec, build_student, seeded

__all__ = ["BufferConfig", "BufferBuilder", "ExpertTrainer", "PRESETS", "run", "train_expert", "augment_batch",
           "expert_seed"]

log = logging.getLogger("lors_fast.engine.buffer")

AUGMENTS = ("none", "flip", "crop_flip")
CAPTION_MODES = ("random", "all")

PRESETS: dict[str, dict] = {
    # the embedded default: cheap enough for the whole main job on 2 CPU cores
    "synthetic": dict(
        dataset="synthetic",
        image_arch="convnet",
        text_encoder="minilm",
        text_head="linear",
        experts=4,
        epochs=3,
        batch_size=128,
        augment="none",
        captions="random",
    ),
}
# the paper's buffer runs (sh/buffer_{flickr,coco}.sh, identical but for the dataset): NFNet-l0 + frozen BERT
# (CLS) + ProjectionHead
_PAPER_BUFFER = dict(image_arch="nfnet_l0", text_encoder=None, text_head="projection", image_size=224, experts=20,
                     epochs=10, batch_size=128, augment="crop_flip", captions="all")
PRESETS.update({f"{ds}-paper": dict(_PAPER_BUFFER, dataset=ds) for ds in ("flickr", "coco")})


@dataclass
class BufferConfig:
    """Options of the buffer stage (defaults = the "synthetic" preset)."""

    out: str = "runs/buffer"  # store folder
    dataset: str = "synthetic"  # synthetic | flickr | coco
    root: str | None = None  # image folder (flickr/coco)
    ann_root: str | None = None  # Karpathy JSON folder (flickr/coco)
    cache_dir: str | None = (
        None  # image memmaps + text embeddings (default $LORS_FAST_CACHE or ~/.cache/lors_fast)
    )
    image_size: int | None = None  # default 32 (synthetic) / 224
    n_train: int | None = None  # synthetic only: train images (default 5000)
    data_seed: int = 0  # synthetic only: rendering seed
    image_arch: str = "convnet"
    image_weights: str | None = None  # local checkpoint; None = random init
    convnet_width: int = 64
    convnet_depth: int = 3
    text_encoder: str | None = "minilm"  # see lors_fast.data.text
    text_head: str = "linear"  # linear | projection
    head_dropout: float = 0.1
    experts: int = 4
    epochs: int = 3
    batch_size: int = 128
    lr_img: float = 0.1
    lr_txt: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    temperature: float = 0.07
    augment: str = "none"  # none | flip | crop_flip
    captions: str = "random"  # random (one per image per epoch) | all (every caption entry)
    # loss-matched experts (issue 18): soft target T = I + w·[cos(caption_i, caption_j) > thr] per batch
    soft_target_weight: float = 0.0  # w; 0 = the identity target (the reference)
    soft_target_threshold: float = 0.8  # thr (caption-embedding cosine)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU (lors_fast.core.device)
    eval_split: str | None = "test"  # split for each expert's final retrieval score; None = skip
    threads: int | None = None  # torch.set_num_threads for this run
    resume: bool = True  # skip experts already in the store
    progress: bool = False
    preset: str = field(default="synthetic", repr=False)  # informational: which preset this started from

    def __post_init__(self) -> None:
        e = []
        if self.eval_split == "none":  # the CLI's spelling of "no final score"
            self.eval_split = None
        if isinstance(self.device, str) and self.device.startswith("cuda") and not torch.cuda.is_available():
            e.append(f"device {self.device!r} requested but CUDA is not available (expected 'cpu')")
        if self.dataset not in DATASETS:
            e.append(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in ("flickr", "coco"):
            if self.root is None:
                e.append(f"root (image folder) is required for dataset {self.dataset!r}")
            if self.ann_root is None:
                e.append(f"ann_root (Karpathy JSON folder) is required for dataset {self.dataset!r}")
            if self.n_train is not None:
                e.append("n_train applies to dataset 'synthetic' only")
        if not self.text_encoder:
            e.append(
                "text_encoder is required (e.g. 'minilm', or 'hf:/path/to/bert-base-uncased' for the paper presets)"
            )
        for name in ("experts", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                e.append(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            e.append(f"batch_size must be an int >= 2, got {self.batch_size!r}")
        for name in ("lr_img", "lr_txt", "temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                e.append(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.soft_target_weight, (int, float)) and math.isfinite(self.soft_target_weight)
                and self.soft_target_weight >= 0):
            e.append(f"soft_target_weight must be a number >= 0, got {self.soft_target_weight!r}")
        if not (isinstance(self.soft_target_threshold, (int, float)) and -1 <= self.soft_target_threshold < 1):
            e.append(f"soft_target_threshold must be a cosine in [-1, 1), got {self.soft_target_threshold!r}")
        if not 0 <= self.momentum < 1:
            e.append(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            e.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.augment not in AUGMENTS:
            e.append(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.captions not in CAPTION_MODES:
            e.append(f"captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.dataset in ("synthetic", "synthetic-mm") and self.augment in ("flip", "crop_flip"):
            e.append(
                "augment with flips is wrong for dataset 'synthetic' (its captions name left/right); use augment='none'"
            )
        if self.eval_split not in (None, "val", "test"):
            e.append(f"eval_split must be 'val', 'test' or None, got {self.eval_split!r}")
        if self.threads is not None and self.threads < 1:
            e.append(f"threads must be >= 1, got {self.threads!r}")
        from lors_fast.core.device import check_device

        if (problem := check_device(self.device)) is not None:
            e.append(problem)
        try:
            self.spec(text_dim=1)
        except ValueError as err:
            e.append(str(err))
        if e:
            raise ValueError("invalid BufferConfig: " + "; ".join(e))

    @classmethod
    def from_preset(cls, preset: str = "synthetic", **overrides) -> BufferConfig:
        """The preset's values, then ``overrides`` (None values are ignored)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown buffer preset {preset!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown buffer options {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**PRESETS[preset], **given, "preset": preset})

    def check_paths(self) -> None:
        """Raise FileNotFoundError naming every local input of this config that is absent."""
        from lors_fast.data.text import encoder_key

        missing = []
        if self.dataset not in ("synthetic", "synthetic-mm"):
            for name in ("root", "ann_root"):
                if not Path(getattr(self, name)).is_dir():
                    missing.append(f"{name} folder not found: {getattr(self, name)}")
        if self.image_weights is not None and not Path(self.image_weights).is_file():
            missing.append(f"image weights not found: {self.image_weights} (weights are never downloaded)")
        try:
            encoder_key(self.text_encoder)
        except FileNotFoundError as e:
            missing.append(str(e))
        if missing:
            raise FileNotFoundError("; ".join(missing))

    def spec(self, text_dim: int) -> StudentSpec:
        """The student network (:class:`~lors_fast.models.StudentSpec`) the experts train, for captions of
        width ``text_dim``."""
        size = (
            self.image_size if self.image_size is not None else (32 if self.dataset in ("synthetic", "synthetic-mm") else 224)
        )
        return StudentSpec(
            image_arch=self.image_arch,
            image_weights=None if self.image_weights is None else str(Path(self.image_weights).expanduser().resolve()),
            image_size=size,
            text_dim=text_dim,
            text_head=self.text_head,
            convnet_width=self.convnet_width,
            convnet_depth=self.convnet_depth,
            head_dropout=self.head_dropout,
        )


def expert_seed(seed: int, idx: int) -> int:
    """The seed of expert ``idx`` (all its randomness derives from it)."""
    return (seed * 1_000_003 + idx * 7919 + 12345) % (2**62)


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a normalised float batch (n, 3, H, W); randomness from ``gen`` (CPU generator)."""
    if kind == "none":
        return x
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    if kind == "flip":
        return torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    # random resized crop: area scale in [0.5, 1], aspect ratio in [3/4, 4/3], bilinear resample
    area = torch.empty(n).uniform_(0.5, 1.0, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = torch.sqrt(area * logr.exp()).clamp(max=1.0)
    h = torch.sqrt(area / logr.exp()).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    sx = torch.where(flip, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _epoch_pairs(
    ds: PairDataset, mode: str, gen: torch.Generator, padded: torch.Tensor, counts: torch.Tensor
):
    if mode == "all":
        cap = torch.randperm(len(ds.captions), generator=gen)
        return ds.txt2img[cap], cap
    img = torch.randperm(ds.n_images, generator=gen)
    k = (torch.rand(ds.n_images, generator=gen) * counts[img]).long()
    return img, padded[img, k]


@torch.no_grad()
def _embed_images(model, ds: PairDataset, device, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, ds.n_images, batch):
        out.append(F.normalize(model(ds.normalized(slice(i, i + batch)).to(device)), dim=-1))
    return torch.cat(out)


def evaluate_expert(img, txt, ds: PairDataset, emb: torch.Tensor, device) -> dict:
    """Retrieval metrics (lors_fast.engine.metrics) of a trained (image encoder, text head) on ``ds``."""
    from lors_fast.engine.metrics import retrieval_metrics

    img.eval(), txt.eval()
    with torch.no_grad():
        f = _embed_images(img, ds, device)
        h = F.normalize(txt(emb.to(device)), dim=-1)
    img.train(), txt.train()
    return retrieval_metrics(f, h, ds.txt2img, ds.img2txt)


def _count_forgetting(ii, correct, last, seen, events, presentations) -> None:
    """Update per-image forgetting counts with one batch's presentations (in batch order)."""
    if len(torch.unique(ii)) == len(ii):
        events[ii] += (seen[ii] & last[ii] & ~correct).float()
        presentations[ii] += 1
        last[ii], seen[ii] = correct, True
        return
    for i, c in zip(ii.tolist(), correct.tolist()):  # an image twice in a batch ("all" captions)
        events[i] += float(bool(seen[i] and last[i] and not c))
        presentations[i] += 1
        last[i], seen[i] = c, True


def _soft_target(cfg: BufferConfig, emb: torch.Tensor, cc: torch.Tensor, device) -> torch.Tensor | None:
    """The batch's expert target: None (identity) or I + w·[caption cosine > thr] off the diagonal."""
    if not cfg.soft_target_weight:
        return None
    e = F.normalize(emb[cc].to(device).float(), dim=-1)
    eye = torch.eye(len(cc), dtype=torch.bool, device=device)
    close = ((e @ e.T) > cfg.soft_target_threshold) & ~eye
    return eye.float() + cfg.soft_target_weight * close.float()



class ExpertTrainer:
    """One expert: setup in ``__init__`` (student, optimiser, generators), :meth:`step` (one minibatch),
    :meth:`epoch` (one pass + its snapshot), :meth:`result` and :meth:`run` (every epoch, then the result).

    Expert ``idx`` draws its init, data order, augmentation and dropout from seeds derived from
    (``cfg.seed``, idx) only, so it is the same whichever process trains it."""

    def __init__(self, idx: int, cfg: BufferConfig, spec: StudentSpec, train: PairDataset,
                 train_emb: torch.Tensor, eval_ds: PairDataset | None = None,
                 eval_emb: torch.Tensor | None = None):
        self.idx, self.cfg, self.train, self.train_emb = idx, cfg, train, train_emb
        self.eval_ds, self.eval_emb = eval_ds, eval_emb
        from lors_fast.core.device import resolve_device

        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per rank
        self.device = device
        self.seed = s = expert_seed(cfg.seed, idx)
        self.img, self.txt = build_student(spec, seed=s)
        self.img.to(device), self.txt.to(device)
        self.fi, self.ft = FlatModel(self.img), FlatModel(self.txt)
        self.opt = torch.optim.SGD(
            [{"params": self.img.parameters(), "lr": cfg.lr_img},
             {"params": self.txt.parameters(), "lr": cfg.lr_txt}],
            lr=cfg.lr_img, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(s + 1)
        self.counts = torch.tensor([len(c) for c in train.img2txt])
        self.padded = torch.zeros(train.n_images, int(self.counts.max()), dtype=torch.long)
        for i, c in enumerate(train.img2txt):
            self.padded[i, : len(c)] = torch.tensor(c)
        n_pairs = train.n_images if cfg.captions == "random" else len(train.captions)
        self.bs = min(cfg.batch_size, n_pairs)
        self.n_batches = n_pairs // self.bs
        n = train.n_images
        self.last, self.seen = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        self.events, self.presentations = torch.zeros(n), torch.zeros(n)
        self.snaps_i, self.snaps_t = [self.fi.flat().cpu()], [self.ft.flat().cpu()]
        self.loss: torch.Tensor | None = None
        self.seconds = 0.0

    def step(self, ii: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        """One SGD step on the pairs (images ``ii``, captions ``cc``); counts forgetting events."""
        from lors_fast.core.functional import contrastive_loss

        x = augment_batch(self.train.normalized(ii).to(self.device), self.cfg.augment, self.gen)
        f = F.normalize(self.img(x), dim=-1)
        h = F.normalize(self.txt(self.train_emb[cc].to(self.device)), dim=-1)
        target = _soft_target(self.cfg, self.train_emb, cc, self.device)
        loss = contrastive_loss(f, h, 1.0 / self.cfg.temperature, target, kind="infonce")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            correct = ((f @ h.T).argmax(1) == torch.arange(len(ii), device=self.device)).cpu()
        _count_forgetting(ii, correct, self.last, self.seen, self.events, self.presentations)
        self.loss = loss
        return loss

    def epoch(self, epoch: int) -> None:
        """One pass over the epoch's pairs (the last partial batch dropped), then its snapshot."""
        from tqdm import tqdm

        cfg, bs = self.cfg, self.bs
        im_idx, cap_idx = _epoch_pairs(self.train, cfg.captions, self.gen, self.padded, self.counts)
        bar = tqdm(range(self.n_batches), desc=f"expert {self.idx} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for b in bar:
            loss = self.step(im_idx[b * bs : (b + 1) * bs], cap_idx[b * bs : (b + 1) * bs])
            if cfg.progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if not torch.isfinite(self.loss):
            raise FloatingPointError(
                f"expert {self.idx}: loss became {self.loss.item()} in epoch {epoch + 1}; lower lr_img/lr_txt")
        self.snaps_i.append(self.fi.flat().cpu())
        self.snaps_t.append(self.ft.flat().cpu())

    def result(self) -> dict:
        """Trajectories, forgetting counts, metrics on the evaluation split and timings."""
        metrics = {}
        if self.eval_ds is not None:
            metrics = evaluate_expert(self.img, self.txt, self.eval_ds, self.eval_emb, self.device)
        cfg = self.cfg
        return {
            "img": torch.stack(self.snaps_i),
            "txt": torch.stack(self.snaps_t),
            "events": self.events,
            "presentations": self.presentations,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "seconds": self.seconds,
            "images_per_s": cfg.epochs * self.n_batches * self.bs / max(self.seconds, 1e-9),
            "loss": float(self.loss.detach()),
        }

    def run(self) -> dict:
        """Train every epoch (dropout from the expert's own seed) and return :meth:`result`."""
        t0 = time.perf_counter()
        with seeded(self.seed + 2, self.device):  # dropout (projection head) draws from here: any process
            for epoch in range(self.cfg.epochs):
                self.epoch(epoch)
        self.seconds = time.perf_counter() - t0
        return self.result()


def train_expert(idx: int, cfg: BufferConfig, spec: StudentSpec, train: PairDataset, train_emb: torch.Tensor,
                 eval_ds: PairDataset | None = None, eval_emb: torch.Tensor | None = None) -> dict:
    """Train expert ``idx``; returns img/txt trajectories, forgetting counts, metrics and timings."""
    return ExpertTrainer(idx, cfg, spec, train, train_emb, eval_ds, eval_emb).run()


def store_meta(
    cfg: BufferConfig, spec: StudentSpec, train: PairDataset, fi: FlatModel, ft: FlatModel
) -> dict:
    """The store metadata this config produces (compared on resume); local paths are absolute."""
    from lors_fast.data.text import canonical_encoder

    meta = {
        "spec": spec.to_dict(),
        "encoder": canonical_encoder(cfg.text_encoder),
        "dataset": train.fingerprint,
        "dataset_name": train.name,
        "n_train": train.n_images,
        "optimizer": {"name": "sgd", "momentum": cfg.momentum, "weight_decay": cfg.weight_decay},
        "lrs": {"img": cfg.lr_img, "txt": cfg.lr_txt},
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "temperature": cfg.temperature,
        "loss": "infonce",
        "augment": cfg.augment,
        "captions": cfg.captions,
        "img_params": fi.describe(),
        "txt_params": ft.describe(),
    }
    if cfg.soft_target_weight:  # only then (identity-target stores keep their metadata, so stay reusable)
        meta["soft_target"] = {"weight": cfg.soft_target_weight, "threshold": cfg.soft_target_threshold}
    return meta


def write_forgetting(store: TrajectoryStore) -> Path:
    """Sum the per-expert forgetting counts of all experts present into ``forgetting.safetensors``."""
    ev = pr = None
    for i in store.expert_ids:
        extra, _ = store.read_extra(i)
        if "forget_events" not in extra:
            continue
        ev = extra["forget_events"] if ev is None else ev + extra["forget_events"]
        pr = extra["forget_presentations"] if pr is None else pr + extra["forget_presentations"]
    if ev is None:
        raise ValueError(f"no expert in {store.root} carries forgetting counts")
    return save_safetensors_atomic(
        {"events": ev, "presentations": pr},
        store.root / "forgetting.safetensors",
        {"experts": str(store.expert_ids)},
    )


class BufferBuilder:
    """The buffer stage: setup in ``__init__`` (process group, data, caption embeddings, store), :meth:`step`
    (train one expert), :meth:`save` (write it to the store), :meth:`run` (this rank's missing experts, then
    the store's index and forgetting statistics). Use as a context manager, or call :meth:`close`."""

    def __init__(self, cfg: BufferConfig):
        from lors_fast.data.io import check_output_dir
        from lors_fast.data.text import caption_embeddings

        cfg.check_paths()  # fail at once, before any data or model work
        check_output_dir(cfg.out, "out (--out)")
        if cfg.image_arch != "convnet" and cfg.image_weights is None:
            log.warning("image_arch %r starts from random init (no --image-weights); the paper used ImageNet "
                        "weights", cfg.image_arch)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self._lock = contextlib.ExitStack()
        self._created = dist.setup(cfg.device)  # torchrun: join (or reuse) the process group
        self.rank, self.world = dist.rank_world()
        try:
            if self.rank == 0:  # one writer job per store (the ranks of a torchrun job share rank 0's lock)
                from lors_fast.data.runlock import hold

                self._lock.enter_context(hold(cfg.out, "lors-fast buffer"))
            self._setup(caption_embeddings)
        except BaseException:
            self.close()
            raise

    def _setup(self, caption_embeddings) -> None:
        cfg, rank = self.cfg, self.rank
        kw = dict(root=cfg.root, ann_root=cfg.ann_root, cache_dir=cfg.cache_dir, image_size=cfg.image_size,
                  progress=cfg.progress and rank == 0)
        if cfg.dataset in ("synthetic", "synthetic-mm"):
            kw.update(seed=cfg.data_seed)
        self.train = load_split(cfg.dataset, "train", n_images=cfg.n_train, **kw)
        self.eval_ds = load_split(cfg.dataset, cfg.eval_split, **kw) if cfg.eval_split else None

        def embed(progress):
            train = caption_embeddings(self.train, cfg.text_encoder, cache_dir=cfg.cache_dir, progress=progress)
            ev = caption_embeddings(self.eval_ds, cfg.text_encoder, cache_dir=cfg.cache_dir) if self.eval_ds else None
            return train, ev

        if rank == 0:  # one process fills the text-embedding cache, the others then read it
            self.train_emb, self.eval_emb = embed(cfg.progress)
        dist.barrier()
        if rank != 0:
            self.train_emb, self.eval_emb = embed(False)
        self.spec = cfg.spec(text_dim=int(self.train_emb.shape[1]))
        img0, txt0 = build_student(self.spec, seed=0)
        meta = store_meta(cfg, self.spec, self.train, FlatModel(img0), FlatModel(txt0))
        if rank == 0:
            store = TrajectoryStore.create(cfg.out, meta)
            if not cfg.resume and store.expert_ids:
                raise ValueError(
                    f"{cfg.out} already holds experts {store.expert_ids}; pass resume=True (--resume) or another --out")
        dist.barrier()
        self.store = store if rank == 0 else TrajectoryStore(cfg.out)

    def step(self, idx: int) -> dict:
        """Train expert ``idx`` (see :class:`ExpertTrainer`)."""
        return ExpertTrainer(idx, self.cfg, self.spec, self.train, self.train_emb, self.eval_ds, self.eval_emb).run()

    def save(self, idx: int, r: dict) -> dict:
        """Write expert ``idx``'s trajectories (atomically) and return its summary."""
        info = {"metrics": r["metrics"], "seconds": r["seconds"], "images_per_s": r["images_per_s"],
                "final_loss": r["loss"]}
        self.store.write_expert(idx, r["img"], r["txt"], info=info,
                                extra={"forget_events": r["events"], "forget_presentations": r["presentations"]})
        log.info("expert %d: %.1f s (%.0f img/s), final loss %.4f, %s r_mean %.2f", idx, r["seconds"],
                 r["images_per_s"], r["loss"], self.cfg.eval_split, r["metrics"].get("r_mean", float("nan")))
        return info

    def run(self) -> dict:
        """Train and save this rank's missing experts; rank 0 then writes the index and the forgetting counts.
        Returns a summary (store, rank, world, trained, skipped, per-expert results, config)."""
        cfg, rank, world = self.cfg, self.rank, self.world
        mine = [i for i in range(cfg.experts) if i % world == rank]
        todo = [i for i in mine if not self.store.has_expert(i)]
        skipped = sorted(set(mine) - set(todo))
        if skipped:
            log.info("rank %d: experts %s already in %s, skipped", rank, skipped, cfg.out)
        results = {i: self.save(i, self.step(i)) for i in todo}
        dist.barrier()
        if rank == 0:
            self.store.finalize()
            write_forgetting(self.store)
        return {"store": str(Path(cfg.out)), "rank": rank, "world": world, "trained": sorted(results),
                "skipped": skipped, "results": results, "config": asdict(cfg)}

    def close(self) -> None:
        """Release the store's lock and end this stage's use of the process group (:func:`dist.teardown`)."""
        self._lock.close()
        if self._created:
            dist.teardown(self._created, together=False)
            self._created = False

    def __enter__(self) -> BufferBuilder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(cfg: BufferConfig) -> dict:
    """Train the experts of ``cfg`` missing from the store ``cfg.out``; returns a summary dict."""
    with BufferBuilder(cfg) as b:
        return b.run()
