"""Image–text retrieval metrics (R@1/5/10 in both directions), chunked and exact.

``retrieval_metrics(image_embeds, text_embeds, txt2img, img2txt)`` returns the reference's keys
(docs/LORS_NOTES.md §5.2–5.3): ``txt_r1, txt_r5, txt_r10`` for image→text retrieval (an image is a hit at K
when one of its captions is among its K best-scored captions), ``img_r1, img_r5, img_r10`` for
text→image retrieval, their means ``txt_r_mean`` / ``img_r_mean`` and ``r_mean`` (mean of the two), all
in percent. Scores are plain dot products ``image_embeds @ text_embeds.T`` (the inputs are meant to be
L2-normalised features; the reference's extra factor 1/T is monotone and does not change the ranking).

How it works: no argsort. The rank of a ground truth is the number of candidates that *beat* it,
counted with comparisons against its score, block by block (``chunk_size`` image rows at a time, never
the full matrix):

* first every caption's ground-truth score s[g_t, t] is computed (one small product per image chunk);
  an image's threshold is its best caption's score (5, or 6 for ten COCO images: the reference takes the
  minimum position over them, i.e. the best-ranked one decides);
* then each block of scores is compared with the image thresholds (row-wise: image→text) and the
  caption thresholds (column-wise: text→image); the 0/1 results are summed by a matrix–vector product;
* only R@1/5/10 are needed, so counts are exact below 10 and a query already beaten 10 times is
  *decided*. :func:`retrieval_ranks` exploits that with a "probe" plan (score every image against 512
  captions first, the undecided ones against 2048 more, and so on; likewise for captions), used when
  most queries miss (weak models, random embeddings); with a strong model one joint pass serves both
  directions. Results never depend on the plan, ``chunk_size`` or ``probe`` (tested).

Exactness assumes that a dot product rounds the same whatever the shape of the matrix product it is
part of (true of the CPU BLAS here: chunked and full products agree bitwise at COCO size). Ground-truth pairs are excluded explicitly, so where
it is not true (some GPU kernels) a ground truth can still never beat itself; only candidates within
one float ulp of it could be ordered differently from a single full product.

Tie-break (deterministic): a candidate with an equal score beats the ground truth iff its index is
*larger*. This is the order of the reference's ``np.argsort(scores)[::-1]`` when the sort is stable (the
reference uses numpy's default, unstable, sort, whose order among equal scores is unspecified, so a
stable sort is the only well-defined reading). Ties are real: duplicate captions in COCO give
identical text embeddings.

The reference's top-128 fill: it keeps each row's 128 best scores and sets the rest to −100 before
sorting. Scores of L2-normalised features are ≥ −1/T > −100, so all kept entries still beat every
filled one; a ground truth inside the top 128 keeps its position, one outside gets a position ≥ 128
(arbitrary among the −100 ties). Positions ≥ 128 never count for R@1/5/10, so the metrics agree
exactly. The one case where the fill could matter — a tie group of ≥ 118 entries straddling the 128th
place with the ground truth in it — would make even the reference's own result depend on ``topk``'s
arbitrary choice; we ignore the fill there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["retrieval_metrics", "retrieval_ranks"]

_KS = (1, 5, 10)


def _as_index_tensor(txt2img, n_txt: int, n_img: int, device) -> torch.Tensor:
    t = torch.as_tensor(txt2img)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(
            f"txt2img must be a 1-D sequence of integer image indices, got dtype {t.dtype}, shape {tuple(t.shape)}"
        )
    if t.numel() != n_txt:
        raise ValueError(f"txt2img has {t.numel()} entries, expected one per caption ({n_txt})")
    t = t.to(device=device, dtype=torch.long)
    if n_txt and (int(t.min()) < 0 or int(t.max()) >= n_img):
        raise ValueError(f"txt2img values must lie in [0, {n_img}), got range [{int(t.min())}, {int(t.max())}]")
    return t


def _pad_img2txt(img2txt, n_img: int, n_txt: int, txt2img: torch.Tensor, device) -> torch.Tensor:
    """(n_img, max_captions) long tensor of caption indices, padded with -1; validated against txt2img."""
    if isinstance(img2txt, torch.Tensor):
        img2txt = img2txt.tolist()
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries, expected one caption list per image ({n_img})")
    lens, flat = [], []
    for i, caps in enumerate(img2txt):
        caps = [caps] if isinstance(caps, int) else list(caps)
        if not caps:
            raise ValueError(f"img2txt[{i}] is empty: every image needs at least one caption")
        lens.append(len(caps))
        flat.extend(caps)
    try:
        flat_t = torch.tensor(flat)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"img2txt must hold integer caption indices: {e}") from e
    if flat_t.dtype.is_floating_point or flat_t.dtype == torch.bool or flat_t.dim() != 1:
        raise ValueError(f"img2txt must hold integer caption indices, got {flat_t.dtype} values")
    flat_t = flat_t.long()
    lens_t = torch.tensor(lens, dtype=torch.long)
    width = int(lens_t.max())
    row = torch.repeat_interleave(torch.arange(n_img), lens_t)
    col = torch.arange(len(flat)) - torch.repeat_interleave(lens_t.cumsum(0) - lens_t, lens_t)
    pad = torch.full((n_img, width), -1, dtype=torch.long)
    pad[row, col] = flat_t
    real = pad[pad >= 0]
    if (pad < -1).any() or (real.numel() and int(real.max()) >= n_txt):
        raise ValueError(f"img2txt caption indices must lie in [0, {n_txt})")
    owner = torch.arange(n_img).unsqueeze(1).expand_as(pad)[pad >= 0]
    bad = txt2img.cpu()[real] != owner
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"img2txt and txt2img disagree: img2txt[{int(owner[k])}] lists caption {int(real[k])}, "
            f"but txt2img[{int(real[k])}] = {int(txt2img[real[k]])}"
        )
    return pad.to(device)


def _validate_embeds(image_embeds, text_embeds) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 2-D float tensor (n, d), got dtype {x.dtype}, shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"embedding widths differ: image_embeds {tuple(image_embeds.shape)}, text_embeds {tuple(text_embeds.shape)}"
        )
    if image_embeds.device != text_embeds.device:
        raise ValueError(f"image_embeds on {image_embeds.device}, text_embeds on {text_embeds.device}")
    dtype = torch.promote_types(image_embeds.dtype, text_embeds.dtype)
    if dtype in (torch.float16, torch.bfloat16) and image_embeds.device.type == "cpu":
        dtype = torch.float32
    return image_embeds.to(dtype).contiguous(), text_embeds.to(dtype).contiguous()


class _Counter:
    """Counts, per image and per caption, the candidates that beat its ground truth (capped use: < cap).

    Scores of a block ``img[rows] @ txt[cols].T`` are compared with the thresholds; a candidate with an
    equal score beats the ground truth iff its index is larger. Ground-truth pairs inside a block are
    taken out again explicitly, so a score that a differently shaped product rounds differently can never
    make a ground truth beat itself.
    """

    def __init__(self, img, txt, t2i_gt, caps_pad, cap):
        dev = img.device
        self.img, self.txt, self.g, self.caps, self.cap = img, txt, t2i_gt, caps_pad, cap
        n_img, n_txt = img.shape[0], txt.shape[0]
        valid = caps_pad >= 0
        # every caption's ground-truth score s[g_t, t], one small product per chunk of images
        v = torch.empty(n_txt, dtype=img.dtype, device=dev)
        order = torch.argsort(t2i_gt, stable=True)
        bounds = torch.searchsorted(t2i_gt[order], torch.arange(0, n_img + 256, 256, device=dev)).tolist()
        for k, i0 in enumerate(range(0, n_img, 256)):
            mine = order[bounds[k]:bounds[k + 1]]
            if mine.numel():
                sub = img[i0:i0 + 256] @ txt[mine].T
                v[mine] = sub.gather(0, (t2i_gt[mine] - i0).unsqueeze(0)).squeeze(0)
        self.v = v
        # image→text: the best ground-truth caption (largest index among equal best scores) decides
        gts = v[caps_pad.clamp(min=0)].masked_fill(~valid, float("-inf"))
        self.u = gts.max(1).values
        self.b = torch.where(gts == self.u.unsqueeze(1), caps_pad, torch.full_like(caps_pad, -1)).max(1).values
        self.cnt_i2t = torch.zeros(n_img, dtype=torch.int32, device=dev)
        self.cnt_t2i = torch.zeros(n_txt, dtype=torch.int32, device=dev)
        self._pos_txt = torch.full((n_txt,), -1, dtype=torch.long, device=dev)
        self._pos_img = torch.full((n_img,), -1, dtype=torch.long, device=dev)

    def reset(self) -> None:
        self.cnt_i2t.zero_()
        self.cnt_t2i.zero_()

    def _i2t_block(self, s: torch.Tensor, r: torch.Tensor, cols: torch.Tensor, segs) -> None:
        """Scores s (len r, len cols) of images r against captions cols (ascending; mapped in _pos_txt)."""
        u, b = self.u[r], self.b[r]
        cnt = _count_segments(s, u, b, cols, segs, query_dim=0)
        own = self.caps[r]  # the image's own captions never count (the best one is the ground truth)
        p = self._pos_txt[own.clamp(min=0)]
        m = (own >= 0) & (p >= 0)
        if m.any():
            sv = s.gather(1, p.clamp(min=0))
            uu, bb = u.unsqueeze(1), b.unsqueeze(1)
            beat = ((sv > uu) | ((sv == uu) & (own > bb))) & m
            cnt -= beat.sum(1, dtype=torch.int32)
        self.cnt_i2t[r] += cnt

    def _t2i_block(self, s: torch.Tensor, rows: torch.Tensor, c: torch.Tensor, segs) -> None:
        """Scores s (len rows, len c) of images rows (ascending; mapped in _pos_img) against captions c."""
        v, g = self.v[c], self.g[c]
        cnt = _count_segments(s, v, g, rows, segs, query_dim=1)
        p = self._pos_img[g]  # the caption's own image, if among rows, never counts
        m = p >= 0
        if m.any():
            sv = s[p[m], m.nonzero().squeeze(1)]
            cnt[m] -= (sv > v[m]).to(torch.int32)
        self.cnt_t2i[c] += cnt

    def i2t(self, rows: torch.Tensor, cols: torch.Tensor, chunk: int) -> None:
        """Add, for images ``rows``, the captions among ``cols`` (ascending) that beat their ground truth."""
        txt_c = self.txt[cols]
        self._pos_txt[cols] = torch.arange(cols.numel(), device=cols.device)
        segs = _segments(cols, _seg_width(self.txt.shape[0]))
        for r in rows.split(chunk):
            self._i2t_block(self.img[r] @ txt_c.T, r, cols, segs)
        self._pos_txt[cols] = -1

    def t2i(self, rows: torch.Tensor, cols: torch.Tensor, chunk: int) -> None:
        """Add, for captions ``cols``, the images among ``rows`` (ascending) that beat their ground truth."""
        img_r = self.img[rows]
        self._pos_img[rows] = torch.arange(rows.numel(), device=rows.device)
        segs = _segments(rows, _seg_width(self.img.shape[0]))
        for c in cols.split(max(1, chunk * 4)):
            self._t2i_block(img_r @ self.txt[c].T, rows, c, segs)
        self._pos_img[rows] = -1

    def joint(self, chunk: int) -> None:
        """Everything in one pass: each block of image rows × all captions serves both directions."""
        n_img, n_txt = self.img.shape[0], self.txt.shape[0]
        cols = torch.arange(n_txt, device=self.img.device)
        self._pos_txt[:] = cols
        segs_c = _segments(cols, _seg_width(n_txt))
        for r in torch.arange(n_img, device=self.img.device).split(chunk):
            s = self.img[r] @ self.txt.T
            self._i2t_block(s, r, cols, segs_c)
            self._pos_img[r] = torch.arange(r.numel(), device=r.device)
            self._t2i_block(s, r, cols, _segments(r, _seg_width(n_img)))
            self._pos_img[r] = -1
        self._pos_txt[:] = -1


#: candidates are split into about this many index ranges (each at least _MIN_WIDTH indices wide: fewer,
#: larger operations for small sets); queries whose ground truth lies inside a range get an extra exact
#: tie check there (about 1/_NSEG of the work)
_NSEG = 16
_MIN_WIDTH = 1024


def _seg_width(n: int) -> int:
    return max(1, n // _NSEG, min(_MIN_WIDTH, n))
#: "auto" switches to the joint pass when more than this fraction of images survive the caption probe
_JOINT_ABOVE = 0.25


def _segments(idx: torch.Tensor, width: int) -> list[tuple[int, int, int, int]]:
    """Runs of ascending ``idx`` whose values share ``value // width``: (p0, p1, lowest, highest index).

    Segments are narrow in INDEX space, so few queries have their ground truth inside one (those are
    resolved element by element), even when ``idx`` is a sparse probe subset.
    """
    if idx.numel() == 0:
        return []
    _, counts = torch.unique_consecutive(torch.div(idx, width, rounding_mode="floor"), return_counts=True)
    ends = counts.cumsum(0).tolist()
    out, p0 = [], 0
    for p1 in ends:
        out.append((p0, p1, int(idx[p0]), int(idx[p1 - 1])))
        p0 = p1
    return out


def _count_segments(s, thr, gt, idx, segs, query_dim: int) -> torch.Tensor:
    """Per query q: #candidates j with s[q, j] > thr[q], or == thr[q] with idx[j] > gt[q] (int32).

    ``query_dim`` 0: queries are the rows of ``s``, candidates its columns; 1: the other way round.
    Candidates come in segments of ascending index. In a segment wholly after gt[q] an equal score beats
    the ground truth, so the strict threshold becomes the next float below thr[q]; wholly before, it
    stays strict; only queries whose gt index falls inside a segment get an extra equality check there.
    Comparisons are written as 0/1 floats and summed by a matrix–vector product (exact below 2^24, and
    much faster on CPU than summing a bool tensor).
    """
    prev = torch.nextafter(thr, torch.full_like(thr, float("-inf")))
    f32 = torch.float32  # 0/1 values and their sums are exact in float32 below 2^24 (checked by the caller)
    cnt = torch.zeros(thr.shape[0], dtype=f32, device=s.device)
    buf = torch.empty(s.shape, dtype=f32, device=s.device)  # written in place segment by segment
    for p0, p1, lo, hi in segs:
        t = torch.where(gt < lo, prev, thr)
        mixed = ((gt >= lo) & (gt < hi)).nonzero().squeeze(1)
        ones = torch.ones(p1 - p0, dtype=f32, device=s.device)
        if query_dim == 0:
            blk = s[:, p0:p1]
            cnt += torch.gt(blk, t.unsqueeze(1), out=buf[:, p0:p1]) @ ones
            if mixed.numel():  # strict count done; equal scores with a larger index also beat the gt
                sub, tm = blk[mixed], thr[mixed].unsqueeze(1)
                eq = sub == tm
                if eq.any():
                    cnt[mixed] += (eq & (idx[p0:p1].unsqueeze(0) > gt[mixed].unsqueeze(1))).sum(1).to(f32)
        else:
            blk = s[p0:p1]
            cnt += ones @ torch.gt(blk, t.unsqueeze(0), out=buf[p0:p1])
            if mixed.numel():
                sub, tm = blk[:, mixed], thr[mixed].unsqueeze(0)
                eq = sub == tm
                if eq.any():
                    cnt[mixed] += (eq & (idx[p0:p1].unsqueeze(1) > gt[mixed].unsqueeze(0))).sum(0).to(f32)
    return cnt.round().to(torch.int32)


def _rounds(n: int, first: int, device) -> list[torch.Tensor]:
    """Disjoint ascending subsets of range(n) of sizes first, 4·first, 16·first, ... covering range(n).

    Taken from a fixed pseudo-random order, so each subset is spread over the whole index range.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    out, p, size = [], 0, first
    while p < n:
        out.append(order[p:p + size].sort().values)
        p, size = p + size, size * 4
    return out


@torch.no_grad()
def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    txt2img: Sequence[int] | torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    *,
    cap: int = max(_KS),
    chunk_size: int = 256,
    probe: int = 512,
    strategy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (0 = best) of the ground truth in both directions, exact below ``cap`` and clipped to ``cap``.

    Returns ``(i2t (n_img,), t2i (n_txt,))`` long tensors on CPU. See the module docstring for the
    tie-break. Work plan (``strategy``): "joint" computes each block of ``chunk_size`` image rows × all
    captions once and counts both directions from it. "probe" scores every image against ``probe``
    spread-out captions, then the images not yet beaten ``cap`` times (undecided: a decided one has rank
    ≥ cap whatever the rest holds) against 4× as many new captions, and so on until every caption was
    seen; likewise every caption against rounds of ``probe // 4``, ×4, ... images. Far less work when
    most queries miss (weak models, random embeddings). "auto" runs the first image round and goes on
    with "probe" if at most a quarter of the images are undecided, else switches to "joint". The counts, and so the metrics, do
    not depend on ``strategy``, ``probe`` or ``chunk_size``; only the work does.
    """
    if strategy not in ("auto", "joint", "probe"):
        raise ValueError(f"strategy must be 'auto', 'joint' or 'probe', got {strategy!r}")
    for name, val in (("cap", cap), ("chunk_size", chunk_size), ("probe", probe)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    img, txt = _validate_embeds(image_embeds, text_embeds)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if max(n_img, n_txt) >= 2**24:
        raise ValueError(f"at most 2^24 - 1 images and captions are supported, got {n_img} and {n_txt}")
    dev = img.device
    t2i_gt = _as_index_tensor(txt2img, n_txt, n_img, dev)
    caps_pad = _pad_img2txt(img2txt, n_img, n_txt, t2i_gt, dev)
    counter = _Counter(img, txt, t2i_gt, caps_pad, cap)
    all_img, all_txt = torch.arange(n_img, device=dev), torch.arange(n_txt, device=dev)

    col_rounds = _rounds(n_txt, probe, dev)
    if strategy == "auto":
        strategy = "joint"
        if len(col_rounds) > 1:  # probe: how many images are already beaten cap times by a few captions?
            counter.i2t(all_img, col_rounds[0], chunk_size)
            if float((counter.cnt_i2t < cap).float().mean()) <= _JOINT_ABOVE:
                strategy = "probe-started"
            else:
                counter.reset()
    if strategy == "joint":  # most queries need every candidate anyway: one product, both directions
        counter.joint(chunk_size)
    else:
        for k, cols in enumerate(col_rounds):
            if k == 0 and strategy == "probe-started":
                continue
            rows = all_img if k == 0 else (counter.cnt_i2t < cap).nonzero().squeeze(1)
            if rows.numel():
                counter.i2t(rows, cols, chunk_size)
        for k, rows in enumerate(_rounds(n_img, max(1, probe // 4), dev)):
            cols = all_txt if k == 0 else (counter.cnt_t2i < cap).nonzero().squeeze(1)
            if cols.numel():
                counter.t2i(rows, cols, chunk_size)
    return counter.cnt_i2t.clamp(max=cap).long().cpu(), counter.cnt_t2i.clamp(max=cap).long().cpu()


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    txt2img: Sequence[int] | torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    *,
    chunk_size: int = 256,
    probe: int = 512,
    strategy: str = "auto",
) -> dict[str, float]:
    """R@1/5/10 (percent) for image→text (``txt_r*``) and text→image (``img_r*``) retrieval, and their means.

    image_embeds (n_img, d), text_embeds (n_txt, d): features (L2-normalised by the caller), same device.
    txt2img: n_txt image indices (one per caption); img2txt: n_img caption-index lists (one per image),
    consistent with txt2img. Raises ValueError on bad shapes, dtypes, non-finite values or indices.
    ``chunk_size`` / ``probe`` / ``strategy`` change only the work, never the result (see :func:`retrieval_ranks`).
    """
    r_i2t, r_t2i = retrieval_ranks(
        image_embeds, text_embeds, txt2img, img2txt, cap=max(_KS), chunk_size=chunk_size, probe=probe,
        strategy=strategy,
    )
    out: dict[str, float] = {}
    for k in _KS:
        out[f"txt_r{k}"] = 100.0 * (r_i2t < k).sum().item() / r_i2t.numel()
    for k in _KS:
        out[f"img_r{k}"] = 100.0 * (r_t2i < k).sum().item() / r_t2i.numel()
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
