"""Run artifacts of `lors-fast distill`: image grid, similarity heatmap, loss curves, nearest captions.

All PNGs are written with matplotlib's Agg backend (no display needed) and atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from lors_fast.data.io import atomic_write, write_json_atomic

__all__ = ["save_image_grid", "save_similarity_heatmap", "save_loss_curves", "save_sim_diagnostics",
           "nearest_captions", "write_artifacts"]


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(images: torch.Tensor, mean, std, path: str | Path, *, max_images: int = 100) -> Path:
    """Grid of (n, 3, H, W) normalised images, de-normalised with ``mean``/``std`` and clipped to [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (n, 3, H, W), got {tuple(images.shape)}")
    x = images[:max_images].detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    x = x.clamp(0, 1)
    n, _, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3, cols * w / 24), max(3, rows * h / 24)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.axis("off")
    return _save_fig(fig, Path(path))


def save_similarity_heatmap(S: torch.Tensor, path: str | Path, *, title: str = "learned similarity S") -> Path:
    """Heatmap of a dense (n, n) similarity matrix (rows: images, columns: texts)."""
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square (n, n), got {tuple(S.shape)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(S.detach().float().cpu().numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("text")
    ax.set_ylabel("image")
    return _save_fig(fig, Path(path))


def save_loss_curves(metrics: list[dict], path: str | Path) -> Path:
    """Matching loss (total and per branch), mean student loss and learned lrs per iteration."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    its = [m["iteration"] for m in metrics]
    for key in ("loss", "loss_img", "loss_txt"):
        a1.plot(its, [m[key] for m in metrics], label=key)
    a1.set_xlabel("iteration")
    a1.set_title("matching loss ‖θ_K − θ*‖²/D")
    a1.legend()
    for key in ("lr_img", "lr_txt"):
        a2.plot(its, [m[key] for m in metrics], label=key)
    a2.set_xlabel("iteration")
    a2.set_title("learned student lrs")
    a2.legend()
    return _save_fig(fig, Path(path))


def save_sim_diagnostics(metrics: list[dict], path: str | Path) -> Path | None:
    """Per iteration: mean |ΔS| of a unit-lr gradient step on vs off the diagonal (log scale), and the mean
    off-diagonal S over caption-similar vs other pairs. None when the metrics hold no S diagnostics."""
    rows = [m for m in metrics if "sim_dS_diag" in m]
    if not rows:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    its = [m["iteration"] for m in rows]
    for key, label in (("sim_dS_diag", "diagonal"), ("sim_dS_offdiag", "off-diagonal")):
        a1.plot(its, [max(m[key], 1e-30) for m in rows], label=label)
    a1.set_yscale("log")
    a1.set_xlabel("iteration")
    a1.set_title("mean |ΔS| of a unit-lr gradient step")
    a1.legend()
    agree = [m for m in rows if "sim_agree_hi" in m]
    if agree:
        for key, label in (("sim_agree_hi", "caption-similar pairs"), ("sim_agree_lo", "other pairs")):
            a2.plot([m["iteration"] for m in agree], [m[key] for m in agree], label=label)
        a2.legend()
    a2.set_xlabel("iteration")
    a2.set_title("mean off-diagonal S")
    return _save_fig(fig, Path(path))


def nearest_captions(texts: torch.Tensor, caption_emb: torch.Tensor, captions: list[str], *, k: int = 3,
                     chunk: int = 4096) -> list[list[tuple[str, float]]]:
    """For each synthetic text embedding, the ``k`` real captions of highest cosine similarity."""
    if texts.shape[1] != caption_emb.shape[1]:
        raise ValueError(f"texts are {texts.shape[1]}-d, caption embeddings {caption_emb.shape[1]}-d")
    q = torch.nn.functional.normalize(texts.detach().float().cpu(), dim=1)
    best_v = torch.full((q.shape[0], 0), -2.0)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for s in range(0, caption_emb.shape[0], chunk):  # streaming top-k, never n × n_cap at once
        c = torch.nn.functional.normalize(caption_emb[s : s + chunk].float(), dim=1)
        v, i = (q @ c.T).topk(min(k, c.shape[0]), dim=1)
        best_v, order = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + s], 1).gather(1, order)
    return [[(captions[int(i)], float(v)) for v, i in zip(vs, is_)] for vs, is_ in zip(best_v, best_i)]


def write_artifacts(distiller, result) -> None:
    """All artifacts of a finished run into its folder."""
    out, ds, d = Path(result.out), distiller.ds, result.distilled
    save_image_grid(d.images, ds.mean, ds.std, out / "images.png")
    if d.similarity is not None and d.images.shape[0] <= 2048:
        title = "learned similarity S"
        last = result.metrics[-1] if result.metrics else {}
        if "sim_agree_hi" in last:
            title += (f"\noff-diag S: caption-similar pairs {last['sim_agree_hi']:.4g} vs others "
                      f"{last['sim_agree_lo']:.4g}; |ΔS| off/diag {last.get('sim_dS_ratio', float('nan')):.3g}")
        save_similarity_heatmap(d.similarity.dense().detach(), out / "similarity.png", title=title)
    if result.metrics:
        save_loss_curves(result.metrics, out / "curves.png")
        save_sim_diagnostics(result.metrics, out / "sim_diagnostics.png")
    near = nearest_captions(d.texts, distiller.caption_emb, ds.captions, k=3)
    init = [ds.captions[int(i)] for i in distiller.init_captions]
    write_json_atomic([{"index": j, "init_caption": init[j], "nearest": [{"caption": c, "cosine": v} for c, v in nn]}
                       for j, nn in enumerate(near)], out / "nearest_captions.json")
