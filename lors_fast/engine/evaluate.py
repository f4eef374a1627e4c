"""Evaluation of a distilled (or real) pair set: the paper's Algorithm 2 with an honest protocol.

A FRESH student (:func:`lors_fast.models.build_student`) is trained on the N pairs with SGD (momentum
0.9, weight decay 5e-4, one lr per branch — the learned ones for a distilled set — multiplied by 0.1 at
the midpoint), the learned similarity as soft target of the run's loss kind, then image→text and
text→image retrieval is measured on the test split (:func:`lors_fast.engine.metrics.retrieval_metrics`).

Differences from the reference (docs/LORS_NOTES.md §5.1, §10), on purpose:

* minibatches are drawn WITHOUT replacement within an epoch (a permutation split into
  ceil(N/B) near-equal batches), not as independent random subsets;
* the reported numbers are the FINAL-epoch result and the result at the epoch selected on the VAL
  split (best val r_mean among the evaluation points); the reference's best-over-test-evaluations
  number is computed only with ``report_best_on_test`` and is labelled ``best_on_test``.

Results: ``train_on_synset`` → one run's dict; ``evaluate_synset`` → ``cfg.runs`` seeds with
mean ± std (population std, as the reference's ``np.std``) of every metric.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lors_fast.core.device import resolve_device
from lors_fast.core.kinds import KINDS
from lors_fast.core.targets import FullSimilarity, LowRankSimilarity, LowRankTarget
from lors_fast.engine.metrics import retrieval_metrics
from lors_fast.models import StudentSpec, build_student, seeded

__all__ = ["EvalConfig", "RetrievalSet", "SynsetTrainer", "epoch_batches", "train_on_synset", "evaluate_synset", "evaluate_real_subset",
           "summarize", "load_retrieval_set", "run"]

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Protocol (training + reporting) and, for :func:`run`, what to evaluate and where to write."""

    # --- protocol
    epochs: int = 100  # training epochs on the N pairs
    batch_size: int = 128  # the reference's batch_train
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1  # lrs × lr_decay after epochs // 2 epochs (step decay at the midpoint)
    runs: int = 5  # seeds seed, seed+1, ... (fresh network each)
    seed: int = 0
    loss: str = "infonce"  # student loss kind (lors_fast.contrastive_loss); run() takes the checkpoint's when None
    temperature: float = 0.07  # logits = cos / T (the reference evaluates at 0.07 whatever it distilled at)
    eval_every: int = 10  # evaluate on val every k epochs (and after the last)
    report_best_on_test: bool = False  # also report the reference's best-over-test-evaluations (labelled)
    arch: str | None = None  # image_arch override for cross-architecture evaluation (None = the checkpoint's)
    arch_weights: str | None = None  # local weights for --arch (None = random init)
    device: str = "auto"  # auto: CUDA when available, else CPU (lors_fast.core.device)
    eval_batch_size: int = 256  # test images per encoder forward
    lr_img: float | None = None  # override the learned lrs (None = use them)
    lr_txt: float | None = None
    # --- what to evaluate (run())
    ckpt: str | None = None  # ours (.safetensors) or the reference's distilled_*.pt
    dataset: str | None = None  # synthetic | flickr | coco (None = the checkpoint's)
    data_root: str | None = None
    ann_root: str | None = None
    cache_dir: str | None = None
    text_encoder: str | None = None  # None = the checkpoint's (or minilm)
    val_split: str | None = "val"  # None: no val selection
    test_split: str = "test"
    out: str | None = None  # JSON results file (atomic write)

    def __post_init__(self) -> None:
        errs: list[str] = []

        def pos_int(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                errs.append(f"{name} must be an int >= {lo}, got {v!r}")

        for n in ("epochs", "batch_size", "runs", "eval_every", "eval_batch_size"):
            pos_int(n)
        pos_int("seed", 0)
        for n, lo, hi in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf), ("lr_decay", 0.0, 1.0)):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not (lo <= v <= hi) or (n == "momentum" and v >= 1):
                errs.append(f"{n} must lie in [{lo}, {hi}{')' if n == 'momentum' else ']'}, got {v!r}")
        if not isinstance(self.temperature, (int, float)) or not (self.temperature > 0):
            errs.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.loss is not None and self.loss not in KINDS:
            errs.append(f"loss must be one of {KINDS}, got {self.loss!r}")
        for n in ("lr_img", "lr_txt"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                errs.append(f"{n} must be a finite float >= 0 or None, got {v!r}")
        if self.arch_weights is not None and self.arch is None:
            errs.append("arch_weights needs arch (the image architecture the weights belong to)")
        if self.val_split is not None and self.val_split == self.test_split:
            errs.append(f"val_split and test_split must differ (both {self.test_split!r}): selection on test is "
                        "what report_best_on_test is for")
        from lors_fast.core.device import check_device

        if (problem := check_device(self.device)) is not None:
            errs.append(problem)
        if errs:
            raise ValueError("invalid EvalConfig: " + "; ".join(errs))

    def to_dict(self) -> dict:
        """The config as a plain dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class RetrievalSet:
    """A val/test split for retrieval: images (uint8 (n, 3, H, W) or float already normalised), caption
    embeddings (n_cap, text_dim), the caption↔image maps and the normalisation used for uint8 images."""

    images: torch.Tensor
    texts: torch.Tensor
    txt2img: torch.Tensor
    img2txt: list[list[int]]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    name: str = "split"
    _stats: tuple = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"RetrievalSet {self.name!r}: images must be (n, 3, H, W), got {tuple(self.images.shape)}")
        if self.texts.dim() != 2 or self.texts.shape[0] != len(self.txt2img):
            raise ValueError(f"RetrievalSet {self.name!r}: texts must be (n_cap={len(self.txt2img)}, D), "
                             f"got {tuple(self.texts.shape)}")
        if len(self.img2txt) != self.images.shape[0]:
            raise ValueError(f"RetrievalSet {self.name!r}: img2txt has {len(self.img2txt)} entries, "
                             f"expected {self.images.shape[0]}")

    def batch(self, i0: int, i1: int, device, size: int) -> torch.Tensor:
        """Normalised float images i0..i1 on ``device`` at ``size``×``size``."""
        x = self.images[i0:i1].to(device)
        if x.dtype == torch.uint8:
            m = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            s = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            x = (x.float() / 255.0 - m) / s
        return _resize(x.float(), size)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _detach_target(target, n: int, device):
    if isinstance(target, (LowRankSimilarity, FullSimilarity)):
        target = target.target()
    if target is None:
        return None
    if isinstance(target, LowRankTarget):
        if target.n != n:
            raise ValueError(f"target has N = {target.n}, expected {n} (the number of pairs)")
        s = float(target.scale)
        return LowRankTarget(target.diag.detach().to(device), target.left.detach().to(device),
                             target.right.detach().to(device), s)
    if isinstance(target, torch.Tensor):
        if target.shape != (n, n):
            raise ValueError(f"dense target must have shape ({n}, {n}), got {tuple(target.shape)}")
        return target.detach().float().to(device)
    raise ValueError(f"target must be None, a LowRankTarget, a dense (N, N) tensor or a similarity module, "
                     f"got {type(target).__name__}")


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's minibatches: a random permutation of range(n) split into ceil(n / batch_size) near-equal
    parts, so every index appears exactly once per epoch (the reference instead draws each batch as an
    independent random subset, i.e. with replacement across the batches of an epoch)."""
    return torch.randperm(n, generator=generator).tensor_split(max(1, math.ceil(n / batch_size)))


def _batch_target(target, idx: torch.Tensor):
    if target is None:
        return None
    if isinstance(target, LowRankTarget):
        return target.select(idx)
    return target[idx][:, idx]


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last memory (same values): with NHWC conv weights, oneDNN's fast path."""
    return x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def _retrieval(img_enc: nn.Module, txt_head: nn.Module, split: RetrievalSet, spec: StudentSpec,
               cfg: EvalConfig) -> dict:
    """Encode a split (images in batches) in eval mode and compute the retrieval metrics."""
    dev = resolve_device(cfg.device)
    modes = (img_enc.training, txt_head.training)
    img_enc.eval()
    txt_head.eval()
    try:
        feats = []
        for i0 in range(0, split.images.shape[0], cfg.eval_batch_size):
            x = split.batch(i0, i0 + cfg.eval_batch_size, dev, spec.image_size)
            feats.append(F.normalize(img_enc(_nhwc(x)).float(), dim=-1))
        f = torch.cat(feats)
        h = F.normalize(txt_head(split.texts.to(dev).float()).float(), dim=-1)
        if not (torch.isfinite(f).all() and torch.isfinite(h).all()):  # a diverged network retrieves nothing
            return {**{k: 0.0 for k in METRIC_KEYS}, "nonfinite": True}
        return retrieval_metrics(f, h, split.txt2img, split.img2txt)
    finally:
        img_enc.train(modes[0])
        txt_head.train(modes[1])


def _check_inputs(spec, images, texts, lr_img, lr_txt, loss, val, test):
    errs = []
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        errs.append(f"images must be a (n, 3, H, W) float tensor, got {getattr(images, 'shape', type(images))}")
    elif not images.dtype.is_floating_point:
        errs.append(f"images must be float (normalised pixels), got {images.dtype}")
    if not isinstance(texts, torch.Tensor) or texts.dim() != 2:
        errs.append(f"texts must be a (n, text_dim) tensor, got {getattr(texts, 'shape', type(texts))}")
    elif texts.shape[1] != spec.text_dim:
        errs.append(f"texts have width {texts.shape[1]}, but spec.text_dim = {spec.text_dim}")
    if not errs and images.shape[0] != texts.shape[0]:
        errs.append(f"images ({images.shape[0]}) and texts ({texts.shape[0]}) must have the same count")
    if not errs and images.shape[0] < 2:
        errs.append(f"need at least 2 pairs, got {images.shape[0]}")
    for name, v in (("lr_img", lr_img), ("lr_txt", lr_txt)):
        if not math.isfinite(float(v)) or float(v) < 0:
            errs.append(f"{name} must be a finite value >= 0, got {v!r}")
    if loss not in KINDS:
        errs.append(f"cfg.loss must be one of {KINDS} for training, got {loss!r}")
    for name, s in (("val", val), ("test", test)):
        if s is not None and not isinstance(s, RetrievalSet):
            errs.append(f"{name} must be a RetrievalSet or None, got {type(s).__name__}")
        elif s is not None and s.texts.shape[1] != spec.text_dim:
            errs.append(f"{name} caption embeddings have width {s.texts.shape[1]}, spec.text_dim = {spec.text_dim}")
    if errs:
        raise ValueError("train_on_synset: " + "; ".join(errs))


class SynsetTrainer:
    """A fresh student trained on a (distilled or real) set: setup in ``__init__`` (inputs checked, student,
    optimiser, generators), :meth:`step` (one minibatch), :meth:`epoch` (one pass, the lr decay, and the
    evaluation record at evaluation epochs), :meth:`result` (final, val-selected and optional best-on-test
    metrics) and :meth:`run` (every epoch, then the result)."""

    def __init__(self, spec: StudentSpec, images: torch.Tensor, texts: torch.Tensor, target, lr_img, lr_txt,
                 cfg: EvalConfig, *, seed: int, val: RetrievalSet | None = None, test: RetrievalSet | None = None):
        if cfg.arch is not None:
            spec = StudentSpec.from_dict({**spec.to_dict(), "image_arch": cfg.arch, "image_weights": cfg.arch_weights})
        _check_inputs(spec, images, texts, lr_img, lr_txt, cfg.loss, val, test)
        self.spec, self.cfg, self.seed, self.val, self.test = spec, cfg, seed, val, test
        self.dev = dev = resolve_device(cfg.device)
        self.n = images.shape[0]
        self.x_all = _resize(images.detach().float().to(dev), spec.image_size)
        self.y_all = texts.detach().float().to(dev)
        self.tgt = _detach_target(target, self.n, dev)
        self.img_enc, self.txt_head = build_student(spec, seed=seed)
        self.img_enc.to(dev, memory_format=torch.channels_last)  # conv weights NHWC (1.2-1.4x on CPU; same values)
        self.txt_head.to(dev)
        self.opt = torch.optim.SGD(
            [{"params": list(self.img_enc.parameters()), "lr": float(lr_img)},
             {"params": list(self.txt_head.parameters()), "lr": float(lr_txt)}],
            lr=float(lr_img), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        )
        self.gen = torch.Generator().manual_seed(seed)
        self.eval_epochs = set(range(cfg.eval_every, cfg.epochs + 1, cfg.eval_every)) | {cfg.epochs}
        self.history: list[dict] = []
        self.best_val, self.best_state, self.best_epoch = -math.inf, None, None

    def step(self, idx: torch.Tensor) -> float:
        """One SGD step on the pairs ``idx`` with their block of the target; returns the loss."""
        from lors_fast.core.functional import contrastive_loss

        idx_d = idx.to(self.dev)
        f = F.normalize(self.img_enc(_nhwc(self.x_all[idx_d])), dim=-1)
        h = F.normalize(self.txt_head(self.y_all[idx_d]), dim=-1)
        loss = contrastive_loss(f, h, 1.0 / self.cfg.temperature, _batch_target(self.tgt, idx_d), kind=self.cfg.loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def _retrieval(self, split: RetrievalSet) -> dict:
        return _retrieval(self.img_enc, self.txt_head, split, self.spec, self.cfg)

    def epoch(self, ep: int) -> None:
        """Epoch ``ep`` (1-based): minibatches without replacement, the step decay at the midpoint, and at an
        evaluation epoch a history record (val keeps the best state so far)."""
        cfg = self.cfg
        losses = [self.step(idx) for idx in epoch_batches(self.n, cfg.batch_size, self.gen)]
        if ep == cfg.epochs // 2:
            for g in self.opt.param_groups:
                g["lr"] *= cfg.lr_decay
        if ep not in self.eval_epochs:
            return
        rec = {"epoch": ep, "loss": sum(losses) / len(losses)}
        if not all(math.isfinite(v) for v in losses):
            rec["diverged"] = True
        if self.val is not None:
            rec["val"] = self._retrieval(self.val)
            if rec["val"]["r_mean"] > self.best_val:
                self.best_val, self.best_epoch = rec["val"]["r_mean"], ep
                self.best_state = (copy.deepcopy(self.img_enc.state_dict()), copy.deepcopy(self.txt_head.state_dict()))
        if self.test is not None and cfg.report_best_on_test:
            rec["test"] = self._retrieval(self.test)
        self.history.append(rec)

    def result(self) -> dict:
        """``{"seed", "history", "final", "val_selected", "best_on_test"?}`` (see :func:`train_on_synset`)."""
        cfg, history, test = self.cfg, self.history, self.test
        final = None
        if test is not None:
            final = history[-1].get("test") or self._retrieval(test)
        out = {"seed": self.seed, "history": history, "final": final, "val_selected": None}
        if self.val is not None and self.best_state is not None:
            if self.best_epoch == cfg.epochs:
                sel_test = final
            elif test is None:
                sel_test = None
            elif cfg.report_best_on_test:
                sel_test = next(r["test"] for r in history if r["epoch"] == self.best_epoch)
            else:
                self.img_enc.load_state_dict(self.best_state[0])
                self.txt_head.load_state_dict(self.best_state[1])
                sel_test = self._retrieval(test)
            out["val_selected"] = {"epoch": self.best_epoch,
                                   "val": next(r["val"] for r in history if r["epoch"] == self.best_epoch),
                                   "test": sel_test}
        if cfg.report_best_on_test and test is not None:
            best = max(history, key=lambda r: r["test"]["r_mean"])
            out["best_on_test"] = {"epoch": best["epoch"], "test": best["test"],
                                   "note": "selected on the TEST split (the reference's reporting); optimistic"}
        return out

    def run(self) -> dict:
        """Train every epoch and return :meth:`result`."""
        with seeded(self.seed + 7919, self.dev):  # dropout of a "projection" head: reproducible, global RNG untouched
            for ep in range(1, self.cfg.epochs + 1):
                self.epoch(ep)
        return self.result()


def train_on_synset(spec: StudentSpec, images: torch.Tensor, texts: torch.Tensor, target, lr_img, lr_txt,
                    cfg: EvalConfig, *, seed: int, val: RetrievalSet | None = None,
                    test: RetrievalSet | None = None) -> dict:
    """Train a fresh student on (images, texts) with soft targets ``target``; evaluate on val/test.

    Returns ``{"seed", "history": [{"epoch", "loss", "val"?, "test"?}], "final": test metrics after the
    last epoch, "val_selected": {"epoch", "val", "test"} (None without val), "best_on_test":
    {"epoch", "test"} (only with cfg.report_best_on_test)}``. Without ``test`` the metric entries are None.
    """
    return SynsetTrainer(spec, images, texts, target, lr_img, lr_txt, cfg, seed=seed, val=val, test=test).run()


def _mean_std(dicts: list[dict]) -> dict:
    out = {}
    for k in METRIC_KEYS:
        vals = torch.tensor([d[k] for d in dicts], dtype=torch.float64)
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(unbiased=False)) if len(vals) > 1 else 0.0}
    return out


def summarize(runs: list[dict]) -> dict:
    """mean ± std over runs of the final, val-selected (and best-on-test) test metrics."""
    out: dict = {"runs": len(runs)}
    finals = [r["final"] for r in runs if r["final"] is not None]
    if finals:
        out["final"] = _mean_std(finals)
    sel = [r["val_selected"]["test"] for r in runs if r.get("val_selected") and r["val_selected"]["test"]]
    if sel:
        out["val_selected"] = _mean_std(sel)
        out["val_selected_epochs"] = [r["val_selected"]["epoch"] for r in runs]
    bot = [r["best_on_test"]["test"] for r in runs if r.get("best_on_test")]
    if bot:
        out["best_on_test"] = _mean_std(bot)
        out["best_on_test_note"] = "selected on the TEST split (the reference's reporting); optimistic"
    return out


def evaluate_synset(spec: StudentSpec, images: torch.Tensor, texts: torch.Tensor, target, lr_img, lr_txt,
                    cfg: EvalConfig, *, val: RetrievalSet | None = None, test: RetrievalSet | None = None,
                    progress=None) -> dict:
    """``cfg.runs`` fresh networks (seeds cfg.seed + k) → ``{"summary": summarize(...), "runs": [...]}``.

    ``cfg.lr_img`` / ``cfg.lr_txt`` override the given lrs when set. ``progress``: optional callable(str).
    In a torch.distributed process group (torchrun) rank r trains the runs k ≡ r (mod world); every rank
    returns all runs, in seed order (each run depends on its seed only, so the result is one process'),
    and only rank 0 reports progress.
    """
    from lors_fast.engine import dist

    lr_img = cfg.lr_img if cfg.lr_img is not None else lr_img
    lr_txt = cfg.lr_txt if cfg.lr_txt is not None else lr_txt
    rank, world = dist.rank_world()

    def report(k, r):
        if progress is not None and r["final"] is not None and rank == 0:
            sel = r["val_selected"]["test"]["r_mean"] if r["val_selected"] and r["val_selected"]["test"] else None
            progress(f"run {k + 1}/{cfg.runs} (seed {cfg.seed + k}): final r_mean {r['final']['r_mean']:.2f}"
                     + (f", val-selected r_mean {sel:.2f} (epoch {r['val_selected']['epoch']})" if sel is not None else ""))

    mine = {}
    for k in dist.shard(cfg.runs):
        mine[k] = train_on_synset(spec, images, texts, target, lr_img, lr_txt, cfg, seed=cfg.seed + k, val=val,
                                  test=test)
        if world == 1:
            report(k, mine[k])
    if world > 1:
        for part in dist.gather_objects(mine):
            mine.update(part)
        for k in range(cfg.runs):
            report(k, mine[k])
    runs = [mine[k] for k in range(cfg.runs)]
    return {"summary": summarize(runs), "runs": runs, "lr_img": float(lr_img), "lr_txt": float(lr_txt)}


def evaluate_real_subset(spec: StudentSpec, images: torch.Tensor, texts: torch.Tensor, lr: float, cfg: EvalConfig,
                         *, val: RetrievalSet | None = None, test: RetrievalSet | None = None, progress=None) -> dict:
    """Coreset evaluation: the same trainer on real pairs, identity targets, one fixed lr for both branches."""
    return evaluate_synset(spec, images, texts, None, lr, lr, cfg, val=val, test=test, progress=progress)


def load_retrieval_set(dataset: str, split: str, *, text_encoder: str = "minilm", data_root=None, ann_root=None,
                       cache_dir=None) -> RetrievalSet:
    """A split of a dataset with its cached caption embeddings, as a :class:`RetrievalSet`."""
    from lors_fast.data.datasets import load_split
    from lors_fast.data.text import caption_embeddings

    ds = load_split(dataset, split, root=data_root, ann_root=ann_root, cache_dir=cache_dir)
    emb = caption_embeddings(ds, text_encoder, cache_dir=cache_dir)
    return RetrievalSet(ds.images, emb, ds.txt2img, ds.img2txt, tuple(ds.mean), tuple(ds.std), ds.name)


def format_summary(summary: dict) -> str:
    """Human-readable table of a summary (mean ± std)."""
    lines = []
    for label in ("final", "val_selected", "best_on_test"):
        if label not in summary:
            continue
        s = summary[label]
        head = {"final": "final epoch", "val_selected": "selected on val",
                "best_on_test": "best on TEST (reference's protocol; optimistic)"}[label]
        cells = "  ".join(f"{k} {s[k]['mean']:.2f}±{s[k]['std']:.2f}" for k in METRIC_KEYS)
        lines.append(f"{head:>46}: {cells}")
    return "\n".join(lines)


def check_run_setup(device: str, out: str | None) -> None:
    """Entry checks of a stage that trains then writes: the device exists and ``out`` can be written (so a
    bad path fails before training, not at the final write)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (expected 'cpu')")
    if out:
        from lors_fast.data.io import check_output_file

        check_output_file(out, "out (--out)")


def run(cfg: EvalConfig, progress=log.info) -> dict:
    """Evaluate ``cfg.ckpt`` (ours or the reference's) on ``cfg.dataset``; write ``cfg.out`` if set.

    Under torchrun the ``cfg.runs`` seeds are spread over the ranks (same result); rank 0 reports and writes."""
    if cfg.ckpt is None:
        raise ValueError("EvalConfig.ckpt is required by run(): a distilled .safetensors or distilled_*.pt file")
    check_run_setup(cfg.device, cfg.out)
    from lors_fast.engine import dist

    with dist.group(cfg.device):  # torchrun: the seeds are spread over the ranks, rank 0 writes
        return _run(cfg, progress if dist.is_main() else None)


def _run(cfg: EvalConfig, progress) -> dict:
    from lors_fast.data.importers import load_any_distilled
    from lors_fast.engine import dist

    d = load_any_distilled(cfg.ckpt)
    meta = d.meta
    try:
        spec = StudentSpec.from_dict(meta["spec"]) if isinstance(meta.get("spec"), dict) else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg.ckpt}: metadata field 'spec' is not a valid StudentSpec ({e})") from e
    if spec is None:
        spec = StudentSpec(text_dim=int(d.texts.shape[1]), image_size=int(d.images.shape[-1]))
    loss = cfg.loss or meta.get("loss") or "infonce"
    dataset = cfg.dataset or str(meta.get("dataset") or "").split("/")[0] or None
    if not isinstance(dataset, str) or dataset not in ("synthetic", "flickr", "coco", "synthetic-mm"):
        raise ValueError(f"cannot tell the dataset of {cfg.ckpt} (its metadata says {meta.get('dataset')!r}); "
                         "pass --dataset synthetic|synthetic-mm|flickr|coco")
    encoder = cfg.text_encoder or meta.get("text_encoder") or "minilm"
    ecfg = EvalConfig(**{**cfg.to_dict(), "loss": loss})
    kw = dict(text_encoder=encoder, data_root=cfg.data_root, ann_root=cfg.ann_root, cache_dir=cfg.cache_dir)
    test = load_retrieval_set(dataset, cfg.test_split, **kw)
    val = load_retrieval_set(dataset, cfg.val_split, **kw) if cfg.val_split else None
    res = evaluate_synset(spec, d.images, d.texts, d.target, d.lr_img, d.lr_txt, ecfg, val=val, test=test,
                          progress=progress)
    res.update(ckpt=str(cfg.ckpt), dataset=dataset, loss=loss, text_encoder=encoder, config=ecfg.to_dict(),
               spec=spec.to_dict())
    log.debug("%s", format_summary(res["summary"]))  # the CLI prints it
    if cfg.out and dist.is_main():
        from lors_fast.data.io import atomic_write

        atomic_write(Path(cfg.out), json.dumps(res, indent=1, sort_keys=True).encode())
    return res
