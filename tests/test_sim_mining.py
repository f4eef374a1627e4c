"""Issue 18: similarity diagnostics (update rates, caption agreement) and the S options (non-zero R,
per-factor lrs, Adam, caption init), on tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill_run import make_fixture, tiny_cfg  # noqa: E402  (tests/ is on sys.path under pytest)

from lors_fast.core.targets import LowRankSimilarity
from lors_fast.engine.sim_diagnostics import agreement, caption_cosine, sim_state, update_rates


def _loss_and_grads(sim, W):
    loss = (W * sim.dense()).sum()
    return torch.autograd.grad(loss, list(sim.parameters()))


def test_update_rates_equal_the_first_order_change_of_S():
    g = torch.Generator().manual_seed(0)
    sim = LowRankSimilarity(7, 3, alpha=2.0, generator=g, dtype=torch.float64)
    with torch.no_grad():
        sim.right.normal_(generator=g)
        sim.diag.normal_(generator=g)
    W = torch.randn(7, 7, generator=g, dtype=torch.float64)
    grads = _loss_and_grads(sim, W)
    S0 = sim.dense().detach()
    eps = 1e-6
    with torch.no_grad():
        for p, gr in zip(sim.parameters(), grads):
            p.sub_(eps * gr)
    dS = (sim.dense().detach() - S0) / eps  # finite-difference step of unit lr
    with torch.no_grad():
        for p, gr in zip(sim.parameters(), grads):
            p.add_(eps * gr)
    r = update_rates(sim, grads)
    off = ~torch.eye(7, dtype=torch.bool)
    assert r["sim_dS_diag"] == pytest.approx(float(dS.diagonal().abs().mean()), rel=1e-4)
    assert r["sim_dS_offdiag"] == pytest.approx(float(dS[off].abs().mean()), rel=1e-4)
    assert r["sim_dS_offdiag_signed"] == pytest.approx(float(dS[off].mean()), rel=1e-4, abs=1e-9)
    assert r["sim_dS_ratio"] == pytest.approx(r["sim_dS_offdiag"] / r["sim_dS_diag"])


def test_update_rates_see_the_zero_R_start():
    """With R = 0 the off-diagonal still moves (through R's gradient), but with R = 0 AND L = 0 it cannot."""
    sim = LowRankSimilarity(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = torch.ones(5, 5, dtype=torch.float64)
    assert update_rates(sim, _loss_and_grads(sim, W))["sim_dS_offdiag"] > 0
    with torch.no_grad():
        sim.left.zero_()
    r = update_rates(sim, _loss_and_grads(sim, W))
    assert r["sim_dS_offdiag"] == 0 and r["sim_dS_diag"] > 0 and r["sim_dS_ratio"] == 0


def test_agreement_and_state():
    S = torch.eye(4)
    S[0, 1] = S[1, 0] = 0.5
    S[2, 3] = 0.1
    cos = torch.full((4, 4), 0.1)
    cos[0, 1] = cos[1, 0] = 0.9
    a = agreement(S, cos, 0.8)
    assert a["sim_agree_hi"] == pytest.approx(0.5) and a["sim_agree_n_hi"] == 2
    assert a["sim_agree_lo"] == pytest.approx(0.1 / 10) and a["sim_agree_corr"] > 0.9
    st = sim_state(S)
    assert st["sim_offdiag_max"] == pytest.approx(0.5) and st["sim_offdiag_rowmass"] == pytest.approx(1.1 / 4)
    assert st["sim_diag_mean"] == pytest.approx(1.0)
    e = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    assert torch.allclose(caption_cosine(e).diagonal(), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="caption cosine matrix"):
        agreement(S, torch.eye(3), 0.8)


def test_init_right_and_init_from():
    sim = LowRankSimilarity(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sim.init_right_(0.1, generator=torch.Generator().manual_seed(1), nonneg=True)
    assert (sim.right > 0).all() and float(sim.right.detach().max()) < 1.0
    with pytest.raises(ValueError, match="std must be"):
        sim.init_right_(-1.0)
    # a block-structured K (two groups) is fitted exactly by rank 2, with the diagonal kept ~1
    K = torch.zeros(10, 10, dtype=torch.float64)
    K[:5, :5] = 0.3
    K[5:, 5:] = 0.2
    sim.init_from_(K, generator=torch.Generator().manual_seed(2), iters=500)
    S = sim.dense().detach()
    off = ~torch.eye(10, dtype=torch.bool)
    assert torch.allclose(S[off], K[off], atol=0.02)
    assert torch.allclose(S.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert all(bool((p >= 0).all()) for p in sim.parameters())
    with pytest.raises(ValueError, match="non-negative"):
        sim.init_from_(-K)


def _metrics(res_out):
    return [json.loads(x) for x in (res_out / "metrics.jsonl").read_text().splitlines()]


def test_every_lors_run_writes_diagnostics(tmp_path):
    from lors_fast.engine.distill import run

    ds, emb, store = make_fixture(tmp_path)
    res = run(tiny_cfg(tmp_path, store, artifacts=True, sim_constraint="nonneg"), dataset=ds, caption_emb=emb)
    ms = _metrics(res.out)
    for key in ("sim_dS_diag", "sim_dS_offdiag", "sim_dS_ratio", "sim_dS_offdiag_signed", "sim_agree_hi",
                "sim_agree_lo", "sim_agree_corr", "sim_offdiag_max", "sim_offdiag_rowmass"):
        assert all(key in m for m in ms), key
    assert ms[0]["sim_dS_diag"] > 0
    assert (res.out / "sim_diagnostics.png").is_file() and (res.out / "similarity.png").is_file()
    tm = run(tiny_cfg(tmp_path, store, out=str(tmp_path / "tm"), similarity="none"), dataset=ds, caption_emb=emb)
    assert "sim_dS_diag" not in _metrics(tm.out)[0]


def test_factor_lr_adam_and_right_init_change_the_off_diagonal(tmp_path):
    from lors_fast.engine.distill import run
    from lors_fast.engine.distill_config import DistillConfig

    ds, emb, store = make_fixture(tmp_path)

    def dense(name, **kw):
        res = run(tiny_cfg(tmp_path, store, out=str(tmp_path / name), sim_constraint="nonneg", **kw),
                  dataset=ds, caption_emb=emb)
        return res.distilled.similarity, _metrics(res.out)

    base, _ = dense("base")
    frozen, _ = dense("frozen", lr_sim_factors=0.0, sim_init_right=0.05)
    # lr 0 for L and R: the factors keep their start, only the diagonal learns
    start = LowRankSimilarity(12, 3)  # shape reference
    assert frozen.right.shape == start.right.shape
    r0 = frozen.right.detach().clone()
    assert float(r0.min()) >= 0 and float(r0.max()) > 0, "R did not start non-zero"
    fast, mf = dense("fast", lr_sim_factors=30.0, sim_init_right=0.05)
    assert not torch.allclose(fast.right, r0), "R never moved at lr_sim_factors 30"
    adam, ma = dense("adam", sim_optimizer="adam", lr_sim=0.01, sim_init_right=0.05)
    assert not torch.allclose(adam.dense(), base.dense())
    # Adam: every factor entry with a gradient moves by ~lr per step, whatever its gradient's scale
    assert float((adam.diag.detach() - 1).abs().max()) <= 0.01 * 4 + 1e-6
    with pytest.raises(ValueError, match="sim_optimizer must be one of"):
        DistillConfig(buffer="x", sim_optimizer="rmsprop")
    with pytest.raises(ValueError, match="apply to similarity='lowrank' only"):
        DistillConfig(buffer="x", similarity="none", sim_init_right=0.1)
    with pytest.raises(ValueError, match="caption_threshold must be a cosine"):
        DistillConfig(buffer="x", caption_threshold=1.5)


def test_adam_resume_equals_uninterrupted(tmp_path):
    from test_distill_run import _state

    from lors_fast.engine.distill import run

    ds, emb, store = make_fixture(tmp_path)
    kw = dict(sim_optimizer="adam", lr_sim=0.01, sim_init_right=0.01, sim_constraint="nonneg")
    full = run(tiny_cfg(tmp_path, store, out=str(tmp_path / "full"), **kw), dataset=ds, caption_emb=emb)
    first = tiny_cfg(tmp_path, store, out=str(tmp_path / "part"), iterations=2, **kw)
    run(first, dataset=ds, caption_emb=emb)
    resumed = run(first.replace(iterations=4, resume=str(tmp_path / "part")), dataset=ds, caption_emb=emb)
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    assert sorted(a) == sorted(b) and any(k.startswith("opt.sim_adam.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("similarity", ["lowrank", "full"])
def test_caption_init_follows_caption_similarity(tmp_path, similarity):
    from lors_fast.engine.distill import Distiller

    ds, emb, store = make_fixture(tmp_path)
    # embeddings where the first 6 init pairs' captions are near-duplicates of one another
    d = Distiller(tiny_cfg(tmp_path, store, similarity=similarity), dataset=ds, caption_emb=emb)
    cap = d.init_captions
    emb2 = emb.clone()
    emb2[cap[:6]] = torch.nn.functional.normalize(emb[cap[0]] + 0.05 * emb[cap[:6]], dim=1)
    cfg = tiny_cfg(tmp_path, store, similarity=similarity, sim_init="caption", sim_init_scale=0.3,
                   sim_constraint="nonneg", caption_threshold=0.8)
    S = Distiller(cfg, dataset=ds, caption_emb=emb2).sim.dense().detach()
    off = ~torch.eye(12, dtype=torch.bool)
    block = torch.zeros(12, 12, dtype=torch.bool)
    block[:6, :6] = True
    assert float(S[block & off].mean()) > 0.15 and float(S[~block & off].abs().mean()) < 0.05
    assert torch.allclose(S.diagonal(), torch.ones(12), atol=0.05)


def test_loss_matched_experts_use_caption_soft_targets(tmp_path):
    """Buffer option soft_target_weight: the expert target is I + w·[caption cosine > thr]; w = 0 is the
    identity (the reference), a threshold no pair reaches is the identity too, and w > 0 changes the expert."""
    from lors_fast.engine.buffer import BufferConfig, _soft_target
    from lors_fast.engine.buffer import run as run_buffer
    from lors_fast.engine.trajectories import TrajectoryStore

    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=1)
    cfg = BufferConfig.from_preset("synthetic", soft_target_weight=0.3, soft_target_threshold=0.8)
    T = _soft_target(cfg, emb, torch.tensor([0, 1, 2]), "cpu")
    assert torch.equal(T, torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert _soft_target(cfg.__class__.from_preset("synthetic"), emb, torch.tensor([0, 1]), "cpu") is None
    base = dict(cache_dir=str(tmp_path / "cache"), n_train=48, convnet_width=4, convnet_depth=1,
                text_encoder="hash:16", experts=1, epochs=1, batch_size=16, threads=1, eval_split=None)
    trajs = {}
    for name, kw in (("id", {}), ("none_close", dict(soft_target_weight=0.3, soft_target_threshold=0.9999)),
                     ("soft", dict(soft_target_weight=0.5, soft_target_threshold=-0.5))):
        c = BufferConfig.from_preset("synthetic", out=str(tmp_path / name), **base, **kw)
        run_buffer(c)
        st = TrajectoryStore(c.out)
        trajs[name] = st.read_expert(0)[0]
        assert st.meta.get("soft_target", {}).get("weight", 0.0) == c.soft_target_weight
        assert ("soft_target" in st.meta) == bool(c.soft_target_weight)
    assert torch.allclose(trajs["id"], trajs["none_close"], atol=1e-6)
    assert not torch.allclose(trajs["id"][1], trajs["soft"][1], atol=1e-4)
    with pytest.raises(ValueError, match="soft_target_weight must be a number >= 0"):
        BufferConfig.from_preset("synthetic", soft_target_weight=-1.0)
