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
