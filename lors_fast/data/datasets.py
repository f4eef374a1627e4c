"""Image–caption datasets in one shape (:class:`PairDataset`), whatever the source.

Sources (``load_split``):

* ``"synthetic"`` — the embedded default (:mod:`lors_fast.data.synthetic`), rendered in memory.
* ``"synthetic-mm"`` — its many-to-many variant (three objects per image, captions naming only part of it).
* ``"flickr"`` / ``"coco"`` — Karpathy-split JSONs as the reference uses them (docs/LORS_NOTES.md §6): the train
  file has one entry per caption ``{"image", "caption", "image_id"}``; val/test files one entry per
  image ``{"image", "caption": [5 (or 6) strings]}``; image paths are relative to ``root``. Images are
  decoded and resized once (the reference's test transform: bicubic resize to ``image_size`` square, no
  crop) into a uint8 ``.npy`` memory map under the cache folder, so epochs never decode JPEGs again.
  Training-time augmentation is applied on these tensors by the stage that needs it (buffer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lors_fast.data.io import atomic_write, read_json_checked

__all__ = [
    "PairDataset",
    "load_split",
    "pre_caption",
    "default_cache_dir",
    "read_karpathy",
    "decode_image",
    "JpegPairDataset",
    "CLIP_MEAN",
    "CLIP_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the reference's normalisation for Flickr/COCO
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANN_FILES = {
    "flickr": {"train": "flickr30k_train.json", "val": "flickr30k_val.json", "test": "flickr30k_test.json"},
    "coco": {
        "train": "coco_karpathy_train.json",
        "val": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
}
#: the embedded, rendered datasets (``"synthetic-mm"``: the many-to-many variant of lors_fast.data.synthetic)
SYNTHETIC_DATASETS = ("synthetic", "synthetic-mm")
DATASETS = ("synthetic", "flickr", "coco", "synthetic-mm")
SPLITS = ("train", "val", "test")


def is_synthetic(dataset) -> bool:
    """True for the embedded, rendered datasets (they take ``seed`` / ``n_images``, no files)."""
    return dataset in SYNTHETIC_DATASETS


def default_cache_dir() -> Path:
    """``$LORS_FAST_CACHE`` or ``~/.cache/lors_fast``."""
    return Path(os.environ.get("LORS_FAST_CACHE", Path.home() / ".cache" / "lors_fast"))


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The reference's caption cleaning: lowercase, drop . ! " ( ) * # : ; ~, squeeze spaces, cut words."""
    caption = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


@dataclass
class PairDataset:
    """Images (uint8, maybe memory-mapped) with their cleaned captions and the caption↔image maps."""

    images: torch.Tensor  # (n_img, 3, H, W) uint8
    captions: list[str]  # (n_cap,)
    txt2img: torch.Tensor  # (n_cap,) long
    img2txt: list[list[int]]  # per image, its caption indices
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    fingerprint: str
    _mean_t: torch.Tensor = field(init=False, repr=False)
    _std_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        errs = []
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            errs.append(
                f"images must be (n, 3, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.txt2img.shape != (len(self.captions),):
            errs.append(f"txt2img has shape {tuple(self.txt2img.shape)}, expected ({len(self.captions)},)")
        if len(self.img2txt) != self.images.shape[0]:
            errs.append(
                f"img2txt has {len(self.img2txt)} entries, expected {self.images.shape[0]} (one per image)"
            )
        if errs:
            raise ValueError(f"PairDataset {self.name!r}: " + "; ".join(errs))
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def n_images(self) -> int:
        """Number of images of the split."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        return self.n_images

    def normalized(self, idx) -> torch.Tensor:
        """float32 (len(idx), 3, H, W): ``(x/255 - mean)/std`` for images ``idx`` (tensor, list or slice)."""
        x = self.images[idx]
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.normalize_uint8(x)

    def normalize_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 (or 0–255 float) batch with this dataset's statistics."""
        x = torch.as_tensor(x).float().div_(255.0)
        return x.sub_(self._mean_t.to(x.device)).div_(self._std_t.to(x.device))

    def subset(self, image_idx) -> PairDataset:
        """The images ``image_idx`` (in that order) with all their captions; a new fingerprint."""
        idx = torch.as_tensor(image_idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n_images):
            raise ValueError(
                f"subset indices must lie in [0, {self.n_images}), got range [{int(idx.min())}, {int(idx.max())}]"
            )
        caps, t2i, i2t = [], [], []
        for new_i, i in enumerate(idx.tolist()):
            i2t.append(list(range(len(caps), len(caps) + len(self.img2txt[i]))))
            for t in self.img2txt[i]:
                caps.append(self.captions[t])
                t2i.append(new_i)
        fp = hashlib.sha256((self.fingerprint + ":" + ",".join(map(str, idx.tolist()))).encode()).hexdigest()
        return PairDataset(
            images=self.images[idx].clone(),
            captions=caps,
            txt2img=torch.tensor(t2i, dtype=torch.long),
            img2txt=i2t,
            mean=self.mean,
            std=self.std,
            name=f"{self.name}[subset {len(idx)}]",
            fingerprint=fp,
        )


def _maps_from_groups(groups: list[list[str]]) -> tuple[list[str], torch.Tensor, list[list[int]]]:
    caps, t2i, i2t = [], [], []
    for i, g in enumerate(groups):
        i2t.append(list(range(len(caps), len(caps) + len(g))))
        caps.extend(g)
        t2i.extend([i] * len(g))
    return caps, torch.tensor(t2i, dtype=torch.long), i2t


def _synthetic(split: str, image_size: int | None, seed: int, n_images: int | None,
               dataset: str = "synthetic") -> PairDataset:
    from lors_fast.data import synthetic

    size = 32 if image_size is None else int(image_size)
    variant = "mm" if dataset == "synthetic-mm" else "default"
    s = synthetic.render_split(split, seed=seed, n_images=n_images, image_size=size, variant=variant)
    groups = [s.captions[5 * i : 5 * i + 5] for i in range(len(s.images))]
    caps, t2i, i2t = _maps_from_groups(groups)
    h = hashlib.sha256(f"{dataset}/v{synthetic.VERSION}/{split}/{seed}/{size}".encode())
    h.update(s.images.tobytes())
    h.update("\n".join(caps).encode())
    return PairDataset(
        images=torch.from_numpy(s.images),
        captions=caps,
        txt2img=t2i,
        img2txt=i2t,
        mean=synthetic.MEAN,
        std=synthetic.STD,
        name=f"{dataset}/{split}",
        fingerprint=h.hexdigest(),
    )


def read_karpathy(ann_file: Path, split: str) -> tuple[list[str], list[list[str]]]:
    """Parse a Karpathy JSON into (relative image paths, per-image cleaned captions).

    train: one entry per caption (grouped by image, first-appearance order); val/test: one per image.
    """
    data = read_json_checked(ann_file)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{ann_file}: expected a non-empty JSON list of entries, got {type(data).__name__}")
    order: dict[str, int] = {}
    groups: list[list[str]] = []
    for k, e in enumerate(data):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ValueError(
                f"{ann_file}: entry {k} must be an object with 'image' and 'caption', got {str(e)[:80]!r}"
            )
        caps = e["caption"]
        if split == "train":
            if not isinstance(caps, str):
                raise ValueError(
                    f"{ann_file}: train entry {k} must have one caption string, got {type(caps).__name__}"
                )
            caps = [caps]
        elif not (isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)):
            raise ValueError(f"{ann_file}: {split} entry {k} must have a non-empty list of caption strings")
        img = e["image"]
        if img not in order:
            order[img] = len(groups)
            groups.append([])
        groups[order[img]].extend(pre_caption(c) for c in caps)
    return list(order), groups


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode an image file to RGB, bicubic-resize to (size, size): uint8 (3, size, size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return np.array(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e


def _build_memmap(paths: list[Path], size: int, out: Path, progress: bool, desc: str) -> None:
    from tqdm import tqdm

    def write(tmp: Path) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, unit="img")):
            arr[i] = decode_image(p, size)
        arr.flush()
        del arr

    atomic_write(out, write)


def _karpathy(dataset, split, root, ann_root, cache_dir, image_size, progress) -> PairDataset:
    errs = []
    if root is None:
        errs.append(f"root (the image folder) is required for dataset {dataset!r}")
    if ann_root is None:
        errs.append(
            f"ann_root (the folder with {ANN_FILES[dataset][split]}) is required for dataset {dataset!r}"
        )
    if errs:
        raise ValueError("; ".join(errs))
    root, ann_root = Path(root), Path(ann_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root folder not found: {root}")
    ann_file = ann_root / ANN_FILES[dataset][split]
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file not found: {ann_file} (expected Karpathy JSON for {dataset}/{split})"
        )
    rel, groups = read_karpathy(ann_file, split)
    paths = [root / r for r in rel]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {ann_file} are missing under {root}, e.g. {missing[:3]}"
        )
    size = 224 if image_size is None else int(image_size)
    caps, t2i, i2t = _maps_from_groups(groups)
    h = hashlib.sha256(f"{dataset}/{split}/{size}".encode())
    h.update(json.dumps([rel, groups]).encode())
    h.update(json.dumps([p.stat().st_size for p in paths]).encode())
    fp = h.hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    mm = cache / "images" / f"{dataset}-{split}-{size}-{fp[:16]}.npy"
    if not mm.is_file():
        _build_memmap(paths, size, mm, progress, desc=f"decoding {dataset}/{split}")
    try:
        arr = np.load(mm, mmap_mode="c")  # copy-on-write: a writable view, the file is never modified
    except Exception as e:
        raise ValueError(f"{mm}: corrupt image cache ({e}); delete it to rebuild") from e
    if arr.shape != (len(paths), 3, size, size) or arr.dtype != np.uint8:
        raise ValueError(
            f"{mm}: image cache has shape {arr.shape} {arr.dtype}, expected {(len(paths), 3, size, size)} uint8; delete it to rebuild"
        )
    return PairDataset(
        images=torch.from_numpy(arr),
        captions=caps,
        txt2img=t2i,
        img2txt=i2t,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        name=f"{dataset}/{split}",
        fingerprint=fp,
    )


def load_split(
    dataset: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    ann_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    seed: int = 0,
    n_images: int | None = None,
    progress: bool = False,
) -> PairDataset:
    """Load one split as a :class:`PairDataset`.

    ``dataset``: "synthetic" | "flickr" | "coco"; ``split``: "train" | "val" | "test".
    ``image_size`` defaults to 32 (synthetic) / 224 (flickr, coco). ``seed`` and ``n_images`` apply to
    "synthetic" only (defaults: seed 0, :data:`lors_fast.data.synthetic.SPLIT_SIZES`).
    """
    errs = []
    if dataset not in DATASETS:
        errs.append(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if split not in SPLITS:
        errs.append(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        errs.append(f"image_size must be an int >= 8, got {image_size!r}")
    if not is_synthetic(dataset) and n_images is not None:
        errs.append(f"n_images applies to the synthetic dataset only (got dataset={dataset!r})")
    if errs:
        raise ValueError("; ".join(errs))
    if is_synthetic(dataset):
        return _synthetic(split, image_size, seed, n_images, dataset)
    return _karpathy(dataset, split, root, ann_root, cache_dir, image_size, progress)


class JpegPairDataset(torch.utils.data.Dataset):
    """Decode-every-time view of a Karpathy split (the reference's way; for benchmarks and comparisons).

    ``ds[i]`` decodes image i from disk and resizes it: uint8 (3, size, size).
    """

    def __init__(self, dataset: str, split: str, *, root, ann_root, image_size: int = 224):
        ann_file = Path(ann_root) / ANN_FILES[dataset][split]
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        rel, _ = read_karpathy(ann_file, split)
        self.paths = [Path(root) / r for r in rel]
        self.size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.paths[i], self.size))
