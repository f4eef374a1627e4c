"""PairDataset, caption cleaning and the Karpathy loaders (tiny generated fixture)."""

import json

import numpy as np
import pytest
import torch
from fixtures.karpathy import make_karpathy

from lors_fast.data.datasets import CLIP_MEAN, JpegPairDataset, decode_image, load_split, pre_caption


def test_pre_caption_matches_reference_rules():
    assert pre_caption("A Dog.  Runs (fast)!\n") == "a dog runs fast"
    assert pre_caption("x;y:z~w#v*u") == "x y z w v u"
    assert pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    assert pre_caption("keep, commas-and-dashes") == "keep, commas-and-dashes"


def test_synthetic_pair_dataset():
    ds = load_split("synthetic", "val", n_images=12)
    assert ds.images.shape == (12, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert len(ds.captions) == 60 and ds.txt2img.tolist() == [i // 5 for i in range(60)]
    assert ds.img2txt[3] == [15, 16, 17, 18, 19]
    x = ds.normalized(torch.tensor([0, 5]))
    ref = (ds.images[[0, 5]].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(
        ds.std
    ).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, ref, atol=1e-6)
    assert load_split("synthetic", "val", n_images=12).fingerprint == ds.fingerprint
    assert load_split("synthetic", "val", n_images=12, seed=1).fingerprint != ds.fingerprint
    sub = ds.subset([4, 1])
    assert sub.captions[:5] == ds.captions[20:25] and sub.txt2img.tolist() == [0] * 5 + [1] * 5
    assert torch.equal(sub.images[1], ds.images[1]) and sub.fingerprint != ds.fingerprint


@pytest.mark.parametrize("dataset", ["flickr", "coco"])
def test_karpathy_splits_and_memmap_cache(tmp_path, dataset):
    root, ann = make_karpathy(tmp_path, dataset)
    cache = tmp_path / "cache"
    tr = load_split(dataset, "train", root=root, ann_root=ann, cache_dir=cache, image_size=16)
    assert tr.images.shape == (6, 3, 16, 16) and len(tr.captions) == 30
    assert tr.captions[0] == "a photo 0 thing number 0 of image 0"
    assert tr.img2txt[1] == [5, 6, 7, 8, 9] and tr.mean == CLIP_MEAN
    te = load_split(dataset, "test", root=root, ann_root=ann, cache_dir=cache, image_size=16)
    assert len(te.img2txt[0]) == 6 and len(te.captions) == 21 and te.txt2img[6].item() == 1
    # the cache holds exactly what decoding gives, and is reused (not rebuilt) on the next load
    files = list((cache / "images").glob("*.npy"))
    assert len(files) == 2
    mtime = files[0].stat().st_mtime_ns
    again = load_split(dataset, "train", root=root, ann_root=ann, cache_dir=cache, image_size=16)
    assert min(f.stat().st_mtime_ns for f in files) <= mtime and torch.equal(again.images, tr.images)
    jp = JpegPairDataset(dataset, "train", root=root, ann_root=ann, image_size=16)
    assert len(jp) == 6 and torch.equal(jp[2], tr.images[2])
    assert np.array_equal(decode_image(jp.paths[0], 16), tr.images[0].numpy())


def test_karpathy_bad_inputs(tmp_path):
    root, ann = make_karpathy(tmp_path, "flickr")
    with pytest.raises(FileNotFoundError, match="image root folder not found.*nope"):
        load_split("flickr", "train", root=tmp_path / "nope", ann_root=ann, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="ann_root"):
        load_split("flickr", "train", root=root, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="flickr30k_val.json"):
        load_split("flickr", "val", root=root, ann_root=tmp_path, cache_dir=tmp_path)
    (ann / "flickr30k_val.json").write_text('[{"image": "x.jpg", "caption": ')
    with pytest.raises(ValueError, match=r"flickr30k_val\.json: malformed JSON"):
        load_split("flickr", "val", root=root, ann_root=ann, cache_dir=tmp_path)
    (ann / "flickr30k_val.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(ValueError, match="entry 0 must be an object with 'image' and 'caption'"):
        load_split("flickr", "val", root=root, ann_root=ann, cache_dir=tmp_path)
    (ann / "flickr30k_val.json").write_text(json.dumps([{"image": "missing.jpg", "caption": ["a"]}]))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_split("flickr", "val", root=root, ann_root=ann, cache_dir=tmp_path)
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    (ann / "flickr30k_val.json").write_text(json.dumps([{"image": "bad.jpg", "caption": ["a"]}]))
    with pytest.raises(ValueError, match="bad.jpg: cannot decode image"):
        load_split("flickr", "val", root=root, ann_root=ann, cache_dir=tmp_path / "c2")
    with pytest.raises(ValueError, match="n_images applies to the synthetic"):
        load_split("flickr", "val", root=root, ann_root=ann, n_images=3)
