"""Import distilled sets: the reference's ``distilled_*.pt`` and our own ``.safetensors`` checkpoints.

The reference (docs/LORS_NOTES.md §1.4) saves, with ``torch.save``, a dict of CPU tensors:
``image`` (N, 3, H, W) normalised pixels, ``text`` (N, D) text embeddings, ``similarity_params`` — a list
``[a (N,), L (N, r), R (N, r)]`` (low-rank) or ``[S (N, N)]`` (full) —, ``similarity_mat`` (N, N) = S
materialised, and ``syn_lr_img`` / ``syn_lr_txt`` (0-dim). It is read with ``torch.load(weights_only=True)``
(no code execution).

The low-rank scale c = α/r is not stored by the reference; it is recovered from ``similarity_mat`` by a
least-squares fit of S − diag(a) ≈ c·L·Rᵀ and checked (the fit must be exact up to float rounding),
or given by the caller (``scale=``). Only ``similarity_mat`` present → a dense target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lors_fast.core.targets import FullSimilarity, LowRankSimilarity, LowRankTarget

__all__ = ["ImportedSet", "load_reference_distilled", "load_any_distilled", "reference_spec"]

REQUIRED = ("image", "text", "syn_lr_img", "syn_lr_txt")


@dataclass
class ImportedSet:
    """What evaluation needs: images, texts, the target (None | LowRankTarget | dense (N, N)), lrs, metadata."""

    images: torch.Tensor
    texts: torch.Tensor
    target: LowRankTarget | torch.Tensor | None
    lr_img: float
    lr_txt: float
    meta: dict = field(default_factory=dict)


def reference_spec(images: torch.Tensor, texts: torch.Tensor) -> dict:
    """The student the reference evaluates with: NFNet-l0 + ProjectionHead at 224 px, else our ConvNet."""
    size = int(images.shape[-1])
    arch = "nfnet_l0" if size >= 128 else "convnet"
    return {"image_arch": arch, "image_size": size, "text_dim": int(texts.shape[1]),
            "text_head": "projection" if arch == "nfnet_l0" else "linear"}


def _fail(path, msg: str):
    raise ValueError(f"{path}: {msg}")


def _tensor(obj, key, path, dims=None) -> torch.Tensor:
    t = obj[key]
    if not isinstance(t, torch.Tensor):
        _fail(path, f"key {key!r} must be a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        _fail(path, f"key {key!r} must have {dims} dimensions, got shape {tuple(t.shape)}")
    return t


def _fit_scale(mat: torch.Tensor, a: torch.Tensor, L: torch.Tensor, R: torch.Tensor, path) -> float:
    m = (mat.double() - torch.diag(a.double()))
    p = L.double() @ R.double().T
    pp = float((p * p).sum())
    tol = 1e-4 * max(1.0, float(mat.abs().max()))
    if pp == 0.0:
        if float(m.abs().max()) > tol:
            _fail(path, "similarity_mat differs from diag(a) although L·Rᵀ = 0: inconsistent checkpoint")
        return 1.0
    c = float((m * p).sum()) / pp
    err = float((m - c * p).abs().max())
    if err > tol:
        _fail(path, f"similarity_mat is not diag(a) + c·L·Rᵀ for any scale c (max residual {err:.3g}): "
                    "inconsistent checkpoint; pass scale= explicitly")
    return c


def load_reference_distilled(path: str | os.PathLike, *, scale: float | None = None) -> ImportedSet:
    """Load the reference's ``distilled_*.pt`` (weights_only). ``scale``: α/r, when the file has no similarity_mat."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distilled checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        _fail(path, f"expected a dict with keys {list(REQUIRED)}, got {type(obj).__name__}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        _fail(path, f"missing key(s) {missing}; the file has {sorted(map(str, obj))}")
    if "similarity_params" not in obj and "similarity_mat" not in obj:
        _fail(path, f"missing key 'similarity_params' (or 'similarity_mat'); the file has {sorted(map(str, obj))}")
    images = _tensor(obj, "image", path, 4).float()
    texts = _tensor(obj, "text", path, 2).float()
    n = images.shape[0]
    if images.shape[1] != 3 or texts.shape[0] != n:
        _fail(path, f"image {tuple(images.shape)} and text {tuple(texts.shape)} must be (N, 3, H, W) and (N, D)")
    lrs = []
    for k in ("syn_lr_img", "syn_lr_txt"):
        t = _tensor(obj, k, path)
        if t.numel() != 1 or not torch.isfinite(t).all():
            _fail(path, f"key {k!r} must be one finite number, got shape {tuple(t.shape)}")
        lrs.append(float(t))
    mat = _tensor(obj, "similarity_mat", path, 2).float() if "similarity_mat" in obj else None
    if mat is not None and mat.shape != (n, n):
        _fail(path, f"similarity_mat has shape {tuple(mat.shape)}, expected ({n}, {n})")
    target: LowRankTarget | torch.Tensor | None
    kind = "full"
    params = obj.get("similarity_params")
    if params is not None:
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in params):
            _fail(path, "similarity_params must be a list of tensors ([a, L, R] or [S])")
        if len(params) == 3:
            a, L, R = (p.float() for p in params)
            if a.shape != (n,) or L.dim() != 2 or L.shape[0] != n or R.shape != L.shape:
                _fail(path, f"similarity_params [a, L, R] have shapes {[tuple(p.shape) for p in params]}, "
                            f"expected [({n},), ({n}, r), ({n}, r)]")
            if scale is None:
                if mat is None:
                    _fail(path, "missing key 'similarity_mat' needed to recover the low-rank scale α/r; pass scale=")
                scale = _fit_scale(mat, a, L, R, path)
            target, kind = LowRankTarget(a, L, R, float(scale)), "lowrank"
        elif len(params) == 1:
            target = params[0].float()
            if target.shape != (n, n):
                _fail(path, f"similarity_params [S] has shape {tuple(target.shape)}, expected ({n}, {n})")
        else:
            _fail(path, f"similarity_params has {len(params)} tensors, expected 3 ([a, L, R]) or 1 ([S])")
    else:
        target = mat
    meta = {"source": "reference", "path": str(path), "similarity": kind, "loss": "wbce",
            "spec": reference_spec(images, texts)}
    if kind == "lowrank":
        meta.update(rank=int(target.rank), scale=float(target.scale))
    return ImportedSet(images, texts, target, lrs[0], lrs[1], meta)


def load_any_distilled(path: str | os.PathLike) -> ImportedSet:
    """Ours (``.safetensors``, via :func:`lors_fast.data.distilled.load_distilled`) or the reference's (``.pt``/``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distilled checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth"):
        return load_reference_distilled(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors (lors-fast) "
                         "or .pt (the reference's distilled_*.pt)")
    from lors_fast.data.distilled import load_distilled

    d = load_distilled(path)
    sim = d.similarity
    target = sim.target() if isinstance(sim, (LowRankSimilarity, FullSimilarity)) else sim
    return ImportedSet(d.images, d.texts, target, float(d.lr_img), float(d.lr_txt), dict(d.meta))
