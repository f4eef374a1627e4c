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


def load_distilled(path: str | Path) -> DistilledSet:
    """Load a distilled checkpoint (final or intermediate) written by :func:`lors_fast.engine.distill.run`."""
    tensors, meta = load_safetensors_checked(path)
    missing = [k for k in ("image", "text", "lr_img", "lr_txt") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: not a distilled set, missing tensors {missing}")
    if "lors_fast" not in meta:
        raise ValueError(f"{path}: not a lors-fast distilled file (metadata key 'lors_fast' missing)")
    info = json.loads(meta["lors_fast"])
    if info.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {info.get('schema')!r} is not supported (expected {SCHEMA!r})")
    n = tensors["image"].shape[0]
    sim = _similarity_from(info["similarity"], n, info.get("rank", 1), info.get("alpha", 1.0), torch.float32)
    if sim is not None:
        with torch.no_grad():
            for name, p in sim.named_parameters():
                key = f"sim.{name}"
                if key not in tensors:
                    raise ValueError(f"{path}: missing tensor {key!r} for similarity {info['similarity']!r}")
                p.data = tensors[key].clone()
    return DistilledSet(tensors["image"], tensors["text"], sim, float(tensors["lr_img"]),
                        float(tensors["lr_txt"]), info)
