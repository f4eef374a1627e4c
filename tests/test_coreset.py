"""Coreset selection: each method against a plain re-statement of its rule, determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch

from lors_fast.data.io import save_safetensors_atomic
from lors_fast.engine.coreset import (
    CoresetConfig,
    forgetting_pairs,
    herding_pairs,
    kcenter_pairs,
    load_forgetting_events,
    random_pairs,
    select_pairs,
)


def index(n_img, caps=5, n_six=0):
    img2txt, txt2img, c = [], [], 0
    for i in range(n_img):
        k = caps + (1 if i < n_six else 0)
        img2txt.append(list(range(c, c + k)))
        txt2img += [i] * k
        c += k
    return torch.tensor(txt2img), img2txt


def check_pairs(img, cap, txt2img, n):
    assert img.shape == cap.shape == (n,)
    assert len(set(img.tolist())) == n  # distinct images
    assert torch.equal(txt2img[cap], img)  # each caption belongs to its image


def feats(n_cap, d=6, seed=0):
    return torch.randn(n_cap, d, generator=torch.Generator().manual_seed(seed))


def test_random_pairs():
    t2i, i2t = index(30, n_six=4)
    img, cap = random_pairs(12, i2t, seed=3)
    check_pairs(img, cap, t2i, 12)
    img2, cap2 = random_pairs(12, i2t, seed=3)
    assert torch.equal(img, img2) and torch.equal(cap, cap2)
    assert not torch.equal(random_pairs(12, i2t, seed=4)[0], img)


def naive_herding(x, owners, n):
    x = x.double()
    mu, chosen, used = x.mean(0), [], set()
    for k in range(1, n + 1):
        best, best_d = None, None
        s = x[chosen].sum(0) if chosen else torch.zeros_like(mu)
        for c in range(x.shape[0]):
            if int(owners[c]) in used:
                continue
            d = float(((mu - (s + x[c]) / k) ** 2).sum())
            if best_d is None or d < best_d - 1e-12:
                best, best_d = c, d
        chosen.append(best)
        used.add(int(owners[best]))
    return chosen


def naive_kcenter(x, owners, n):
    x = x.double()
    mu = x.mean(0)
    first = min(range(x.shape[0]), key=lambda c: float(((x[c] - mu) ** 2).sum()))
    chosen, used = [first], {int(owners[first])}
    for _ in range(n - 1):
        cand = [c for c in range(x.shape[0]) if int(owners[c]) not in used]
        dist = {c: min(float(((x[c] - x[s]) ** 2).sum()) for s in chosen) for c in cand}
        best = max(cand, key=lambda c: (dist[c], -c))
        chosen.append(best)
        used.add(int(owners[best]))
    return chosen


def test_herding_matches_naive():
    t2i, _ = index(15, caps=3, n_six=2)
    x = feats(len(t2i), seed=1)
    img, cap = herding_pairs(x, t2i, 8)
    check_pairs(img, cap, t2i, 8)
    assert cap.tolist() == naive_herding(x, t2i, 8)
    # the herded mean is closer to the full mean than a random subset's, on average
    mu = x.mean(0)
    err_h = float((x[cap].mean(0) - mu).norm())
    errs = [float((x[random_pairs(8, index(15, 3, 2)[1], seed=s)[1]].mean(0) - mu).norm()) for s in range(20)]
    assert err_h < sum(errs) / len(errs)


def test_kcenter_matches_naive():
    t2i, _ = index(15, caps=3, n_six=2)
    x = feats(len(t2i), seed=2)
    img, cap = kcenter_pairs(x, t2i, 7)
    check_pairs(img, cap, t2i, 7)
    assert cap.tolist() == naive_kcenter(x, t2i, 7)


def test_forgetting_picks_most_forgotten():
    t2i, i2t = index(10)
    events = torch.tensor([0, 5, 1, 9, 5, 0, 2, 7, 3, 5])
    img, cap = forgetting_pairs(events, i2t, 3, seed=0)
    check_pairs(img, cap, t2i, 3)
    assert img.tolist() == [3, 7, img[2].item()] and img[2].item() in (1, 4, 9)  # the tie at 5 is seeded
    img4, _ = forgetting_pairs(events, i2t, 5, seed=1)
    assert set(img4.tolist()) == {3, 7, 1, 4, 9}
    assert torch.equal(forgetting_pairs(events, i2t, 5, seed=1)[0], img4)


def test_forgetting_file(tmp_path):
    save_safetensors_atomic({"events": torch.tensor([1, 0, 4])}, tmp_path / "forgetting.safetensors")
    assert load_forgetting_events(tmp_path).tolist() == [1, 0, 4]
    with pytest.raises(FileNotFoundError, match="forgetting.safetensors"):
        load_forgetting_events(tmp_path / "nowhere")
    save_safetensors_atomic({"other": torch.zeros(3)}, tmp_path / "b" / "forgetting.safetensors")
    with pytest.raises(ValueError, match="events"):
        load_forgetting_events(tmp_path / "b")


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "forgetting"])
def test_select_pairs_dispatch(method):
    t2i, i2t = index(12, n_six=3)
    img, cap = select_pairs(method, 6, txt2img=t2i, img2txt=i2t, features=feats(len(t2i)),
                            events=torch.arange(12), seed=0)
    check_pairs(img, cap, t2i, 6)


def test_bad_inputs():
    t2i, i2t = index(5)
    with pytest.raises(ValueError, match="method must be one of"):
        select_pairs("best", 2, txt2img=t2i, img2txt=i2t)
    with pytest.raises(ValueError, match="exceeds the number of images"):
        random_pairs(6, i2t)
    with pytest.raises(ValueError, match="positive int"):
        random_pairs(0, i2t)
    with pytest.raises(ValueError, match="needs features"):
        select_pairs("herding", 2, txt2img=t2i, img2txt=i2t)
    with pytest.raises(ValueError, match="needs events"):
        select_pairs("forgetting", 2, txt2img=t2i, img2txt=i2t)
    with pytest.raises(ValueError, match="one per caption"):
        herding_pairs(feats(7), t2i, 2)
    with pytest.raises(ValueError, match="NaN"):
        kcenter_pairs(torch.full((25, 3), float("nan")), t2i, 2)
    with pytest.raises(ValueError, match=r"events must have shape \(5,\)"):
        forgetting_pairs(torch.zeros(4), i2t, 2)
    with pytest.raises(ValueError) as e:
        CoresetConfig(method="forgetting", n=0, lr=-1, dataset="imagenet")
    for name in ("buffer", "n must", "lr must", "dataset"):
        assert name in str(e.value)


def test_cli_coreset_wiring(tmp_path, monkeypatch):
    """`lors-fast coreset` end to end on a tiny stand-in train split (no text model, no rendering)."""
    import json

    from click.testing import CliRunner
    from lors_fast.cli import main

    import lors_fast.data.datasets as data
    import lors_fast.data.text as text
    import lors_fast.engine.evaluate as ev
    from lors_fast.engine.evaluate import RetrievalSet

    real_load = data.load_split
    monkeypatch.setattr(data, "load_split", lambda d, s, **kw: real_load("synthetic", s, n_images=30))
    monkeypatch.setattr(text, "caption_embeddings", lambda ds, enc, **kw: feats(len(ds.captions), d=12, seed=1))

    def fake_split(dataset, split, **kw):
        ds = real_load("synthetic", split, n_images=10)
        return RetrievalSet(ds.images, feats(len(ds.captions), d=12, seed=2), ds.txt2img, ds.img2txt,
                            ds.mean, ds.std, split)

    monkeypatch.setattr(ev, "load_retrieval_set", fake_split)
    save_safetensors_atomic({"events": torch.arange(30)}, tmp_path / "forgetting.safetensors")
    out = tmp_path / "c.json"
    r = CliRunner().invoke(main, ["coreset", "--method", "forgetting", "--n", "6", "--buffer", str(tmp_path),
                                  "--runs", "1", "--epochs", "1", "--eval-every", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert sorted(res["image_idx"]) == list(range(24, 30)) and res["method"] == "forgetting"
    r = CliRunner().invoke(main, ["coreset", "--method", "forgetting", "--n", "6"])
    assert r.exit_code != 0 and "needs buffer" in r.output


@pytest.mark.slow
def test_cli_coreset_synthetic_end_to_end(tmp_path):
    """Real data: the synthetic dataset, MiniLM caption embeddings (cached), herding, one short run."""
    import json
    import os

    from click.testing import CliRunner
    from lors_fast.cli import main

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path / "herding.json"
    r = CliRunner().invoke(main, ["coreset", "--method", "herding", "--n", "50", "--runs", "1", "--epochs", "4",
                                  "--eval-every", "2", "--dataset", "synthetic", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(set(res["image_idx"])) == 50 and res["summary"]["final"]["r_mean"]["mean"] > 0.0
