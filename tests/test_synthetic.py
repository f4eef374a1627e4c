"""The embedded default dataset: determinism, shapes, caption grammar, rendering."""

import numpy as np
import pytest

from lors_fast.data import synthetic
from lors_fast.data.datasets import load_split


def test_deterministic_and_seed_dependent():
    a = synthetic.render_split("val", seed=3, n_images=40)
    b = synthetic.render_split("val", seed=3, n_images=40)
    c = synthetic.render_split("val", seed=4, n_images=40)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == np.uint8


def test_splits_differ():
    tr = synthetic.render_split("train", n_images=30)
    te = synthetic.render_split("test", n_images=30)
    assert not np.array_equal(tr.images, te.images)


def test_five_distinct_captions_and_attributes_mentioned():
    s = synthetic.render_split("train", n_images=60)
    assert len(s.captions) == 300
    for i in range(60):
        caps = s.captions[5 * i : 5 * i + 5]
        assert len(set(caps)) == 5, caps
        colour = list(synthetic.COLOURS)[s.attributes["colour"][i, 0]]
        shape = synthetic.SHAPES[s.attributes["shape"][i, 0]]
        for c in caps:  # every caption names the first object's colour and shape through a synonym
            assert any(w in c for w in synthetic.SYN[colour]), (c, colour)
            assert any(w in c for w in synthetic.SYN[shape]), (c, shape)
    assert 0.45 < (s.attributes["n_obj"] == 1).mean() < 0.75


def test_render_size_and_objects_visible():
    s = synthetic.render_split("test", n_images=20, image_size=64)
    assert s.images.shape == (20, 3, 64, 64)
    # an object's colour differs from the background: pixel std per image is clearly > noise
    assert (s.images.reshape(20, -1).std(1) > 10).all()


def test_default_sizes_and_stats():
    assert synthetic.SPLIT_SIZES == {"train": 5000, "val": 500, "test": 1000}
    s = synthetic.render_split("train", n_images=2000)
    x = s.images / 255.0
    assert np.allclose(x.mean((0, 2, 3)), synthetic.MEAN, atol=0.02)
    assert np.allclose(x.std((0, 2, 3)), synthetic.STD, atol=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="split"):
        synthetic.render_split("training")
    with pytest.raises(ValueError, match="n_images"):
        synthetic.render_split("val", n_images=0)
    with pytest.raises(ValueError, match="dataset"):
        load_split("imagenet", "train")


# ----- the many-to-many variant ("synthetic-mm")
def _objects_named(caption: str, vocab_shapes, vocab_colours) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption can be naming (synonym match; "ring" never occurs in the mm vocab)."""
    out = set()
    for s in vocab_shapes:
        for c in vocab_colours:
            if any(w in caption for w in synthetic.SYN[s]) and any(w in caption for w in synthetic.SYN[c]):
                out.add((c, s))
    return out


def test_mm_partial_captions_fit_several_images():
    s = synthetic.render_split("train", n_images=200, variant="mm")
    assert s.images.shape == (200, 3, 32, 32)
    assert (s.attributes["n_obj"] == synthetic.MM_OBJECTS).all()
    assert s.attributes["shape"].max() < synthetic.MM_SHAPES and s.attributes["colour"].max() < synthetic.MM_COLOURS
    shapes = synthetic.SHAPES[: synthetic.MM_SHAPES]
    colours = list(synthetic.COLOURS)[: synthetic.MM_COLOURS]
    objs = [{(colours[s.attributes["colour"][i, k]], shapes[s.attributes["shape"][i, k]])
             for k in range(synthetic.MM_OBJECTS)} for i in range(200)]
    partial = fits_others = 0
    for i in range(200):
        caps = s.captions[5 * i : 5 * i + 5]
        assert len(set(caps)) == 5
        for c in caps:
            named = _objects_named(c, shapes, colours) & objs[i]
            assert named, (c, objs[i])  # every caption truly describes something in its image
            partial += len(named) < len(objs[i])
            fits_others += sum(1 for j in range(200) if j != i and named <= objs[j]) > 0
    assert partial / 1000 > 0.6, "captions should name only part of an image"
    assert fits_others / 1000 > 0.9, "most captions should also fit another image (many-to-many)"


def test_mm_registered_deterministic_and_distinct_from_default():
    a = load_split("synthetic-mm", "val", n_images=30)
    b = load_split("synthetic-mm", "val", n_images=30)
    d = load_split("synthetic", "val", n_images=30)
    assert a.name == "synthetic-mm/val" and a.fingerprint == b.fingerprint and a.captions == b.captions
    assert a.fingerprint != d.fingerprint and not np.array_equal(a.images.numpy(), d.images.numpy())
    assert len(a.captions) == 150 and a.img2txt[3] == [15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="variant must be one of"):
        synthetic.render_split("val", n_images=3, variant="m2m")
