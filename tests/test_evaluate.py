"""The evaluation protocol on tiny stand-in data: batching, final vs val-selected, determinism, targets, inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lors_fast.core.targets import LowRankTarget
from lors_fast.engine.evaluate import (
    METRIC_KEYS,
    EvalConfig,
    RetrievalSet,
    epoch_batches,
    evaluate_real_subset,
    evaluate_synset,
    summarize,
    train_on_synset,
)
from lors_fast.models import StudentSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread avoids OpenMP oversubscription when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPEC = StudentSpec(image_size=8, text_dim=12, convnet_width=4, convnet_depth=1)


def toy(n_img, caps, seed):
    """Images and caption embeddings that are a fixed linear function of the pixels (+ noise): learnable."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * 8 * 8, 12, generator=torch.Generator().manual_seed(99)) / 8
    x = torch.randn(n_img, 3, 8, 8, generator=g)
    t2i = torch.arange(n_img).repeat_interleave(caps)
    y = x.flatten(1)[t2i] @ w + 0.3 * torch.randn(len(t2i), 12, generator=g)
    return x, y, t2i, [list(range(i * caps, (i + 1) * caps)) for i in range(n_img)]


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = toy(24, 1, 0)
    val = RetrievalSet(*toy(16, 5, 1), name="val")
    test = RetrievalSet(*toy(20, 5, 2), name="test")
    return x, y, val, test


def cfg(**kw):
    base = dict(epochs=6, batch_size=10, runs=1, eval_every=2, momentum=0.9, weight_decay=5e-4)
    return EvalConfig(**{**base, **kw})


def test_epoch_batches_cover_each_index_once():
    gen = torch.Generator().manual_seed(0)
    for n, b in ((99, 128), (199, 128), (499, 128), (10, 3), (7, 7)):
        batches = epoch_batches(n, b, gen)
        assert len(batches) == math.ceil(n / b)
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
        assert max(len(x) for x in batches) - min(len(x) for x in batches) <= 1


def test_final_vs_val_selected(data):
    x, y, val, test = data
    r = train_on_synset(SPEC, x, y, None, 0.05, 0.05, cfg(report_best_on_test=True), seed=3, val=val, test=test)
    hist = r["history"]
    assert [h["epoch"] for h in hist] == [2, 4, 6]
    assert all(set(METRIC_KEYS) <= set(h["val"]) for h in hist)
    # final = the test result after the last epoch
    assert r["final"] == hist[-1]["test"]
    # val-selected = the first epoch with the best val r_mean, and the test result of THAT epoch
    best = max(h["val"]["r_mean"] for h in hist)
    sel = next(h for h in hist if h["val"]["r_mean"] == best)
    assert r["val_selected"]["epoch"] == sel["epoch"]
    assert r["val_selected"]["test"] == sel["test"]
    # best-on-test is labelled and is the max over the test evaluations
    assert r["best_on_test"]["test"]["r_mean"] == max(h["test"]["r_mean"] for h in hist)
    assert "TEST" in r["best_on_test"]["note"]


def test_val_selected_restores_the_selected_state(data):
    """Without report_best_on_test the selected epoch's weights are restored and tested at the end:
    the numbers must equal those measured at that epoch (same seed, deterministic run)."""
    x, y, val, test = data
    c_on = cfg(report_best_on_test=True, eval_every=1)
    c_off = cfg(eval_every=1)
    a = train_on_synset(SPEC, x, y, None, 0.05, 0.05, c_on, seed=5, val=val, test=test)
    b = train_on_synset(SPEC, x, y, None, 0.05, 0.05, c_off, seed=5, val=val, test=test)
    assert "best_on_test" not in b and all("test" not in h for h in b["history"])
    assert a["val_selected"] == b["val_selected"]
    assert a["final"] == b["final"]


def test_training_learns_and_is_deterministic(data):
    x, y, val, test = data
    c = cfg(epochs=8, eval_every=8)
    r1 = train_on_synset(SPEC, x, y, None, 0.05, 0.05, c, seed=0, val=None, test=test)
    r2 = train_on_synset(SPEC, x, y, None, 0.05, 0.05, c, seed=0, val=None, test=test)
    assert r1 == r2
    assert r1["val_selected"] is None
    assert r1["history"][-1]["loss"] < math.log(10)  # below chance InfoNCE on batches of ~10
    r0 = train_on_synset(SPEC, x, y, None, 0.0, 0.0, c, seed=0, test=test)  # lr 0: the untrained network
    assert r1["final"]["r_mean"] > r0["final"]["r_mean"]


@pytest.mark.parametrize("kind", ["infonce", "wbce"])
def test_targets_lowrank_dense_and_identity_agree(data, kind):
    """S = I as LowRankTarget (L R^T = 0), as a dense eye and as None give the same training run."""
    x, y, _, test = data
    n = x.shape[0]
    c = cfg(epochs=2, eval_every=2, loss=kind)
    lr = LowRankTarget(torch.ones(n), torch.randn(n, 2), torch.zeros(n, 2), 0.5)
    runs = [train_on_synset(SPEC, x, y, t, 0.05, 0.05, c, seed=1, test=test) for t in (None, torch.eye(n), lr)]
    assert runs[0]["final"] == runs[1]["final"] == runs[2]["final"]
    for r in runs[1:]:
        assert r["history"][-1]["loss"] == pytest.approx(runs[0]["history"][-1]["loss"], rel=1e-4)


def test_lowrank_target_matches_its_dense_form(data):
    x, y, _, test = data
    n = x.shape[0]
    g = torch.Generator().manual_seed(0)
    lr = LowRankTarget(torch.rand(n, generator=g) + 0.5, torch.randn(n, 3, generator=g) * 0.2,
                       torch.randn(n, 3, generator=g) * 0.2, 0.7)
    c = cfg(epochs=2, eval_every=2, loss="infonce")
    a = train_on_synset(SPEC, x, y, lr, 0.05, 0.05, c, seed=2, test=test)
    b = train_on_synset(SPEC, x, y, lr.dense(), 0.05, 0.05, c, seed=2, test=test)
    assert a["history"][-1]["loss"] == pytest.approx(b["history"][-1]["loss"], rel=1e-4)


def test_evaluate_synset_mean_std_and_real_subset(data):
    x, y, val, test = data
    c = cfg(epochs=2, runs=2, eval_every=2, lr_img=0.02)
    res = evaluate_synset(SPEC, x, y, None, 99.0, 0.05, c, val=val, test=test)
    assert res["lr_img"] == 0.02 and res["lr_txt"] == 0.05  # cfg override wins
    s = res["summary"]
    assert s["runs"] == 2 and [r["seed"] for r in res["runs"]] == [0, 1]
    vals = [r["final"]["r_mean"] for r in res["runs"]]
    assert s["final"]["r_mean"]["mean"] == pytest.approx(sum(vals) / 2)
    assert s["final"]["r_mean"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2)
    assert "val_selected" in s and "best_on_test" not in s
    real = evaluate_real_subset(SPEC, x, y, 0.05, cfg(epochs=2, runs=1, eval_every=2), test=test)
    assert real["lr_img"] == real["lr_txt"] == 0.05 and "final" in real["summary"]
    assert summarize([])["runs"] == 0


def test_cross_arch_override(data):
    x, y, _, test = data
    c = cfg(epochs=1, eval_every=1, arch="resnet10t")
    pytest.importorskip("timm")
    r = train_on_synset(SPEC, x, y, None, 0.01, 0.01, c, seed=0, test=test)
    assert 0.0 <= r["final"]["r_mean"] <= 100.0


def test_bad_inputs(data):
    x, y, val, test = data
    c = cfg()
    with pytest.raises(ValueError, match="texts have width 5, but spec.text_dim = 12"):
        train_on_synset(SPEC, x, y[:, :5], None, 0.1, 0.1, c, seed=0)
    with pytest.raises(ValueError, match="same count"):
        train_on_synset(SPEC, x[:5], y, None, 0.1, 0.1, c, seed=0)
    with pytest.raises(ValueError, match="lr_img"):
        train_on_synset(SPEC, x, y, None, float("nan"), 0.1, c, seed=0)
    with pytest.raises(ValueError, match=r"dense target must have shape \(24, 24\)"):
        train_on_synset(SPEC, x, y, torch.eye(3), 0.1, 0.1, c, seed=0)
    with pytest.raises(ValueError, match="val must be a RetrievalSet"):
        train_on_synset(SPEC, x, y, None, 0.1, 0.1, c, seed=0, val={"images": 1})
    with pytest.raises(ValueError, match="texts must be"):
        RetrievalSet(test.images, test.texts[:3], test.txt2img, test.img2txt)


def test_config_collects_all_errors():
    with pytest.raises(ValueError) as e:
        EvalConfig(epochs=0, momentum=1.5, loss="nope", temperature=-1, arch_weights="w.pt", val_split="test")
    msg = str(e.value)
    for name in ("epochs", "momentum", "loss", "temperature", "arch_weights", "val_split"):
        assert name in msg


# ---------------------------------------------------------------- CLI (wiring, on stand-in data)
@pytest.fixture
def toy_splits(monkeypatch):
    import lors_fast.engine.evaluate as ev

    def fake(dataset, split, **kw):
        return RetrievalSet(*toy(12 if split == "val" else 15, 5, {"val": 1, "test": 2}[split]), name=split)

    monkeypatch.setattr(ev, "load_retrieval_set", fake)


def test_cli_eval_reference_checkpoint(tmp_path, toy_splits):
    import json

    from click.testing import CliRunner
    from lors_fast.cli import main

    x, y, _, _ = toy(10, 1, 0)
    s = torch.eye(10)
    torch.save({"image": x, "text": y, "similarity_params": [s], "similarity_mat": s,
                "syn_lr_img": torch.tensor(0.05), "syn_lr_txt": torch.tensor(0.05)}, tmp_path / "distilled_5.pt")
    out = tmp_path / "res.json"
    args = ["eval", "--ckpt", str(tmp_path / "distilled_5.pt"), "--dataset", "synthetic", "--runs", "2",
            "--epochs", "2", "--eval-every", "1", "--loss", "infonce", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "selected on val" in r.output and "final epoch" in r.output and "TEST" not in r.output
    res = json.loads(out.read_text())
    assert res["summary"]["runs"] == 2 and res["loss"] == "infonce" and res["spec"]["text_dim"] == 12
    r = CliRunner().invoke(main, args + ["--report-best-on-test"])
    assert r.exit_code == 0 and "best on TEST" in r.output
    r = CliRunner().invoke(main, ["eval", "--ckpt", str(tmp_path / "distilled_5.pt"), "--runs", "1"])
    assert r.exit_code != 0 and "pass --dataset" in r.output
    r = CliRunner().invoke(main, ["eval", "--ckpt", str(tmp_path / "nope.pt"), "--dataset", "synthetic"])
    assert r.exit_code != 0 and "nope.pt" in r.output
