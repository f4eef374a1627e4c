"""retrieval_metrics against a brute-force oracle: random scores, ties, 6-caption images, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lors_fast.engine.metrics import retrieval_metrics, retrieval_ranks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KEYS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"]


def brute_ranks(img, txt, txt2img, img2txt, k_fill=None):
    """The reference's ranking, written out: full scores, optional top-k fill with -100, per-row stable argsort."""
    sims = (img @ txt.T).numpy()

    def fill(s):
        if k_fill is None or k_fill >= s.shape[1]:
            return s
        out = np.full_like(s, -100.0)
        idx = np.argsort(s, axis=1, kind="stable")[:, ::-1][:, :k_fill]
        np.put_along_axis(out, idx, np.take_along_axis(s, idx, 1), 1)
        return out

    s_i2t, s_t2i = fill(sims), fill(np.ascontiguousarray(sims.T))
    r_i2t = np.array(
        [min(int(np.where(np.argsort(row, kind="stable")[::-1] == c)[0][0]) for c in img2txt[i]) for i, row in enumerate(s_i2t)]
    )
    r_t2i = np.array(
        [int(np.where(np.argsort(row, kind="stable")[::-1] == txt2img[t])[0][0]) for t, row in enumerate(s_t2i)]
    )
    return r_i2t, r_t2i


def brute_metrics(img, txt, txt2img, img2txt, k_fill=None):
    r_i2t, r_t2i = brute_ranks(img, txt, txt2img, img2txt, k_fill)
    out = {f"txt_r{k}": 100.0 * (r_i2t < k).sum() / len(r_i2t) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * (r_t2i < k).sum() / len(r_t2i) for k in (1, 5, 10)})
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def make_index(n_img, n_six, shuffle_seed=None):
    """5 captions per image, 6 for the first n_six images; optionally captions in a shuffled order."""
    owners = []
    for i in range(n_img):
        owners += [i] * (6 if i < n_six else 5)
    owners = np.array(owners)
    if shuffle_seed is not None:
        owners = owners[np.random.default_rng(shuffle_seed).permutation(len(owners))]
    img2txt = [np.nonzero(owners == i)[0].tolist() for i in range(n_img)]
    return owners.tolist(), img2txt


def make_embeds(n_img, txt2img, d, seed, signal=0.5):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=1)
    txt = torch.randn(len(txt2img), d, generator=g) + signal * d**0.5 * img[torch.tensor(txt2img)]
    return img, torch.nn.functional.normalize(txt, dim=1)


def assert_same(ours, ref):
    assert list(ours) == KEYS
    for k in KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), (k, ours[k], ref[k])


@pytest.mark.parametrize("n_img,n_six,d,chunk,shuffle", [
    (37, 4, 16, 7, None), (64, 0, 8, 64, 1), (50, 10, 32, 1000, 2), (13, 13, 4, 1, None),
])
def test_parity_random(n_img, n_six, d, chunk, shuffle):
    txt2img, img2txt = make_index(n_img, n_six, shuffle)
    for signal in (0.0, 0.3, 1.0):
        img, txt = make_embeds(n_img, txt2img, d, seed=n_img + d, signal=signal)
        ref = brute_metrics(img, txt, txt2img, img2txt)
        for probe in (1, 8, 40, 1024):  # two-phase (probe < n) and single-phase paths
            for strategy in ("auto", "joint", "probe"):
                got = retrieval_metrics(img, txt, txt2img, img2txt, chunk_size=chunk, probe=probe, strategy=strategy)
                assert_same(got, ref)


def test_ranks_exact_below_cap(seg):
    txt2img, img2txt = make_index(41, 3, shuffle_seed=5)
    img, txt = make_embeds(41, txt2img, 6, seed=3, signal=0.4)
    r_i2t, r_t2i = brute_ranks(img, txt, txt2img, img2txt)
    for cap in (1, 10, 1000):
        for probe, strategy in ((3, "probe"), (50, "auto"), (1024, "auto"), (7, "joint")):
            ours_i2t, ours_t2i = retrieval_ranks(img, txt, txt2img, img2txt, cap=cap, chunk_size=9, probe=probe,
                                                 strategy=strategy)
            assert np.array_equal(ours_i2t.numpy(), np.minimum(r_i2t, cap))
            assert np.array_equal(ours_t2i.numpy(), np.minimum(r_t2i, cap))


@pytest.fixture(params=[1, 16, 60], ids=lambda s: f"nseg{s}")
def seg(request, monkeypatch):
    """Many narrow candidate segments exercise the segment-boundary tie logic at test sizes."""
    import lors_fast.engine.metrics as m

    monkeypatch.setattr(m, "_NSEG", request.param)
    monkeypatch.setattr(m, "_MIN_WIDTH", 1)
    return request.param


def test_parity_with_ties(seg):
    """Quantised embeddings, duplicated captions and duplicated images: many exactly equal scores."""
    n_img, n_six = 30, 5
    txt2img, img2txt = make_index(n_img, n_six, shuffle_seed=0)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(-1, 2, (n_img, 3), generator=g).float()
    img[7] = img[3]  # duplicate images
    img[20] = img[3]
    txt = torch.randint(-1, 2, (len(txt2img), 3), generator=g).float()
    txt[img2txt[4][0]] = txt[img2txt[9][1]]  # duplicate captions of different images
    ref = brute_metrics(img, txt, txt2img, img2txt)
    r_i2t, r_t2i = brute_ranks(img, txt, txt2img, img2txt)
    for probe, strategy in ((2, "probe"), (16, "probe"), (16, "joint"), (1024, "auto")):
        assert_same(retrieval_metrics(img, txt, txt2img, img2txt, chunk_size=4, probe=probe, strategy=strategy), ref)
        for cap in (10, 10_000):
            o_i2t, o_t2i = retrieval_ranks(img, txt, txt2img, img2txt, cap=cap, chunk_size=7, probe=probe,
                                           strategy=strategy)
            assert np.array_equal(o_i2t.numpy(), np.minimum(r_i2t, cap))
            assert np.array_equal(o_t2i.numpy(), np.minimum(r_t2i, cap))


def test_all_equal_scores(seg):
    """Every score equal: the larger index wins every tie."""
    txt2img, img2txt = make_index(12, 2)
    img, txt = torch.ones(12, 4), torch.ones(len(txt2img), 4)
    b_i2t, b_t2i = brute_ranks(img, txt, txt2img, img2txt)
    for probe, strategy in ((3, "probe"), (3, "joint"), (1024, "auto")):
        r_i2t, r_t2i = retrieval_ranks(img, txt, txt2img, img2txt, cap=10_000, chunk_size=5, probe=probe,
                                       strategy=strategy)
        assert np.array_equal(r_i2t.numpy(), b_i2t) and np.array_equal(r_t2i.numpy(), b_t2i)
        assert r_t2i[-1] == 0 and r_i2t[-1] == 0


def test_topk_fill_does_not_change_metrics():
    """The reference's top-k fill with -100 only moves ranks >= k, so R@1/5/10 are unchanged (k >= 10)."""
    txt2img, img2txt = make_index(60, 6, shuffle_seed=3)
    img, txt = make_embeds(60, txt2img, 8, seed=11, signal=0.3)
    full = brute_metrics(img, txt, txt2img, img2txt)
    for k in (10, 12, 40):
        assert_same(full, brute_metrics(img, txt, txt2img, img2txt, k_fill=k))
    assert_same(retrieval_metrics(img, txt, txt2img, img2txt), full)


def test_six_captions_best_one_counts():
    # image 0 has 6 captions; only its 6th caption is close to it
    txt2img, img2txt = make_index(8, 1)
    assert len(img2txt[0]) == 6
    img = torch.eye(8)
    txt = -img[torch.tensor(txt2img)]  # every caption is far from its own image ...
    txt[img2txt[0][5]] = img[0]  # ... except the 6th caption of image 0
    m = retrieval_metrics(img, txt, txt2img, img2txt)
    assert m["txt_r1"] == pytest.approx(100.0 / 8)
    assert m["img_r1"] == pytest.approx(100.0 / len(txt2img))
    assert_same(m, brute_metrics(img, txt, txt2img, img2txt))


def test_inputs_as_tensors_and_float64():
    txt2img, img2txt = make_index(20, 2)
    img, txt = make_embeds(20, txt2img, 5, seed=1)
    ref = brute_metrics(img, txt, txt2img, img2txt)
    assert_same(retrieval_metrics(img, txt, torch.tensor(txt2img), img2txt), ref)
    assert_same(retrieval_metrics(img.double(), txt.double(), np.array(txt2img), img2txt),
                brute_metrics(img.double(), txt.double(), txt2img, img2txt))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "image_embeds": a["image_embeds"][0]}, "image_embeds must be a 2-D"),
    (lambda a: {**a, "text_embeds": a["text_embeds"][:, :3]}, "widths differ"),
    (lambda a: {**a, "image_embeds": a["image_embeds"].long()}, "image_embeds must be a 2-D float"),
    (lambda a: {**a, "image_embeds": a["image_embeds"].numpy()}, "must be a torch.Tensor"),
    (lambda a: {**a, "text_embeds": torch.full_like(a["text_embeds"], float("nan"))}, "NaN"),
    (lambda a: {**a, "txt2img": a["txt2img"][:-1]}, "txt2img has"),
    (lambda a: {**a, "txt2img": [99] + a["txt2img"][1:]}, r"txt2img values must lie in \[0, 6\)"),
    (lambda a: {**a, "txt2img": [float(x) for x in a["txt2img"]]}, "integer image indices"),
    (lambda a: {**a, "img2txt": a["img2txt"][:-1]}, "img2txt has"),
    (lambda a: {**a, "img2txt": [[]] + a["img2txt"][1:]}, r"img2txt\[0\] is empty"),
    (lambda a: {**a, "img2txt": [[0, 1, 2, 3, 500]] + a["img2txt"][1:]}, "caption indices must lie"),
    (lambda a: {**a, "img2txt": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] + a["img2txt"][1:]}, "integer caption indices"),
    (lambda a: {**a, "img2txt": [a["img2txt"][1]] + [a["img2txt"][0]] + a["img2txt"][2:]}, "disagree"),
])
def test_bad_inputs(mutate, match):
    txt2img, img2txt = make_index(6, 1)
    img, txt = make_embeds(6, txt2img, 4, seed=0)
    args = dict(image_embeds=img, text_embeds=txt, txt2img=txt2img, img2txt=img2txt)
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**mutate(args))


def test_bad_chunk_size_and_probe():
    txt2img, img2txt = make_index(3, 0)
    img, txt = make_embeds(3, txt2img, 4, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(img, txt, txt2img, img2txt, chunk_size=0)
    with pytest.raises(ValueError, match="probe"):
        retrieval_metrics(img, txt, txt2img, img2txt, probe=-1)
    with pytest.raises(ValueError, match="cap"):
        retrieval_ranks(img, txt, txt2img, img2txt, cap=0)
    with pytest.raises(ValueError, match="strategy"):
        retrieval_metrics(img, txt, txt2img, img2txt, strategy="fast")


def test_bigger_two_phase_parity(seg):
    """A few hundred images with captions in shuffled order: both phases do real work."""
    txt2img, img2txt = make_index(300, 10, shuffle_seed=7)
    for signal in (0.0, 0.25):
        img, txt = make_embeds(300, txt2img, 24, seed=4, signal=signal)
        ref = brute_metrics(img, txt, txt2img, img2txt)
        for strategy in ("auto", "joint", "probe"):
            assert_same(retrieval_metrics(img, txt, txt2img, img2txt, chunk_size=64, probe=128, strategy=strategy), ref)
