"""The distilled-set format: a safetensors file with tensors ``image`` (n, 3, H, W) normalised pixels,
``text`` (n, D), ``lr_img`` / ``lr_txt`` (0-dim), the similarity's parameters ``sim.*`` (lowrank: ``sim.diag``,
``sim.left``, ``sim.right``; full: ``sim.full``), and for resume ``opt.*`` / ``rng.*``; its safetensors metadata
``"lors_fast"`` is JSON ``{schema, iteration, similarity, rank, alpha, loss, spec, dataset, ...}``.

Written by :mod:`lors_fast.engine.distill`; read by :func:`load_distilled` (evaluation, importers, pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lors_fast.core.targets import FullSimilarity, LowRankSimilarity
from lors_fast.data.io import load_safetensors_checked

__all__ = ["SCHEMA", "DistilledSet", "load_distilled"]

SCHEMA = "lors_fast.distilled/1"


@dataclass
class DistilledSet:
    """A distilled set: images (n,3,H,W) normalised pixels, texts (n, D), similarity, learned lrs."""

    images: torch.Tensor
    texts: torch.Tensor
    similarity: nn.Module | None  # None | LowRankSimilarity | FullSimilarity
    lr_img: float
    lr_txt: float
    meta: dict = field(default_factory=dict)

    def target(self):
        """The full evaluation target: None (identity) | LowRankTarget | dense (n, n) tensor."""
        if self.similarity is None:
            return None
        t = self.similarity.target()
        if isinstance(t, torch.Tensor):
            return t.detach()
        return type(t)(t.diag.detach(), t.left.detach(), t.right.detach(), t.scale)


def _similarity_from(kind: str, n: int, rank: int, alpha: float, dtype, generator=None):
    if kind == "lowrank":
        return LowRankSimilarity(n, rank, alpha, generator=generator, dtype=dtype)
    if kind == "full":
        return FullSimilarity(n, dtype=dtype)
    return None


def _check_info(path, info) -> None:
    """The checkpoint's metadata fields evaluation relies on; ValueError naming the file and the field."""
    import math

    from lors_fast.core.kinds import KINDS

    if not isinstance(info, dict):
        raise ValueError(f"{path}: metadata 'lors_fast' must be a JSON object, got {type(info).__name__}")
    if info.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {info.get('schema')!r} is not supported (expected {SCHEMA!r})")
    errs = []
    if "similarity" not in info:
        errs.append("metadata field 'similarity' is missing (expected one of ('lowrank', 'full', 'none'))")
    elif info["similarity"] not in ("lowrank", "full", "none"):
        errs.append(f"metadata field 'similarity' is {info['similarity']!r}, expected one of ('lowrank', 'full', 'none')")
    if info.get("similarity") == "lowrank":
        r, a = info.get("rank"), info.get("alpha", 1.0)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            errs.append(f"metadata field 'rank' is {r!r}, expected an int >= 1")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            errs.append(f"metadata field 'alpha' is {a!r}, expected a finite number > 0")
    if "loss" in info and info["loss"] not in KINDS:
        errs.append(f"metadata field 'loss' is {info['loss']!r}, expected one of {KINDS}")
    if "spec" in info and not isinstance(info["spec"], dict):
        errs.append(f"metadata field 'spec' must be an object of StudentSpec fields, got {info['spec']!r}")
    if errs:
        raise ValueError(f"{path}: " + "; ".join(errs))


def load_distilled(path: str | Path) -> DistilledSet:
    """Load a distilled checkpoint (final or intermediate) written by :func:`lors_fast.engine.distill.run`.

    Validated: the tensors ``image`` (n, 3, H, W), ``text`` (n, D), scalar finite ``lr_img`` / ``lr_txt``,
    the similarity's tensors with their shapes, and the metadata fields (schema, a known ``similarity``,
    ``rank`` / ``alpha``, ``loss``, ``spec``); every error names the file and the field.
    """
    tensors, meta = load_safetensors_checked(path)
    missing = [k for k in ("image", "text", "lr_img", "lr_txt") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: not a distilled set, missing tensors {missing}")
    if "lors_fast" not in meta:
        raise ValueError(f"{path}: not a lors-fast distilled file (metadata key 'lors_fast' missing)")
    try:
        info = json.loads(meta["lors_fast"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata 'lors_fast' is not valid JSON ({e})") from e
    _check_info(path, info)
    img, txt = tensors["image"], tensors["text"]
    if img.dim() != 4 or img.shape[1] != 3 or not img.dtype.is_floating_point:
        raise ValueError(f"{path}: tensor 'image' must be float (n, 3, H, W), got {img.dtype} {tuple(img.shape)}")
    if txt.dim() != 2 or txt.shape[0] != img.shape[0] or not txt.dtype.is_floating_point:
        raise ValueError(f"{path}: tensor 'text' must be float ({img.shape[0]}, D), got {txt.dtype} {tuple(txt.shape)}")
    for k in ("lr_img", "lr_txt"):
        t = tensors[k]
        if t.numel() != 1 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {k!r} must be one finite number, got shape {tuple(t.shape)}"
                             + (f" value {t.item()}" if t.numel() == 1 else ""))
    n = img.shape[0]
    sim = _similarity_from(info["similarity"], n, info.get("rank", 1), info.get("alpha", 1.0), torch.float32)
    if sim is not None:
        with torch.no_grad():
            for name, p in sim.named_parameters():
                key = f"sim.{name}"
                if key not in tensors:
                    raise ValueError(f"{path}: missing tensor {key!r} for similarity {info['similarity']!r}")
                if tensors[key].shape != p.shape:
                    raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected "
                                     f"{tuple(p.shape)} for similarity {info['similarity']!r} (n={n}, "
                                     f"rank={info.get('rank')})")
                p.data = tensors[key].float().clone()
    return DistilledSet(img, txt, sim, float(tensors["lr_img"]), float(tensors["lr_txt"]), info)
