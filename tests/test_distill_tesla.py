"""Gradient parity of the distillation maths (float64, tiny student).

(a) our O(P) TESLA == the reference-structured TESLA (K stored θ, autograd.grad create_graph), for every
    similarity kind and every activation-checkpoint backend; (b) mtt == an independent full-unroll autograd.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lors_fast import FullSimilarity, LowRankSimilarity, contrastive_loss  # noqa: E402
from lors_fast.engine.tesla import (  # noqa: E402
    SimSlicer,
    Student,
    make_plan,
    mtt_iteration,
    reference_tesla_iteration,
    tesla_iteration,
)
from lors_fast.models import FlatModel, StudentSpec, build_student  # noqa: E402

N, B, K, D_TXT = 10, 4, 5, 6


from helpers import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def assert_close_rel(actual, expected, tol, tag):
    """max|a − e| ≤ tol·max(max|e|, tiny); prints the margin."""
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{tag}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{tag}: non-finite values in actual"
    scale = max(float(e.abs().max()), 1e-300)
    err = float((a - e).abs().max()) if a.numel() else 0.0
    print(f"{tag}: max abs err {err:.3e}, rel {err / scale:.3e}")
    assert err <= tol * scale, f"{tag}: max abs err {err:.3e} > {tol:g} × {scale:.3e}"


def make_setup(sim_kind: str, *, dropout: bool = False, kind: str = "infonce", checkpoint: str = "none"):
    g = torch.Generator().manual_seed(0)
    spec = StudentSpec(image_size=8, convnet_width=4, convnet_depth=1, text_dim=D_TXT,
                       text_head="projection" if dropout else "linear", head_dropout=0.1 if dropout else 0.0)
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img.double()), FlatModel(txt.double())
    student = Student(fi, ft, logit_scale=1 / 0.07, checkpoint=checkpoint)
    images = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64).requires_grad_()
    texts = torch.randn(N, D_TXT, generator=g, dtype=torch.float64).requires_grad_()
    if sim_kind == "lowrank":
        sim = LowRankSimilarity(N, 3, alpha=1.0, generator=g, dtype=torch.float64)
        with torch.no_grad():  # move off S = I so every factor gets a non-zero gradient
            sim.right.copy_(0.1 * torch.randn(N, 3, generator=g, dtype=torch.float64))
            sim.diag.add_(0.05 * torch.randn(N, generator=g, dtype=torch.float64))
    elif sim_kind == "full":
        sim = FullSimilarity(N, dtype=torch.float64)
        with torch.no_grad():
            sim.full.add_(0.05 * torch.rand(N, N, generator=g, dtype=torch.float64))
    else:
        sim = None
    start = (fi.flat(), ft.flat())
    target = (start[0] + 0.05 * torch.randn(start[0].shape, generator=g, dtype=torch.float64),
              start[1] + 0.05 * torch.randn(start[1].shape, generator=g, dtype=torch.float64))
    lrs = (torch.tensor(0.05, dtype=torch.float64, requires_grad=True),
           torch.tensor(0.08, dtype=torch.float64, requires_grad=True))
    plan = make_plan(N, B, K, torch.Generator().manual_seed(1))

    def loss_fn(f, h, t):
        return contrastive_loss(f, h, student.logit_scale, t, kind=kind, backend="reference")

    return student, loss_fn, images, texts, SimSlicer(sim), lrs, start, target, plan


def compare(ours, ref, tol, tag):
    assert_close_rel(ours.grad_images, ref.grad_images, tol, f"{tag} dX")
    assert_close_rel(ours.grad_texts, ref.grad_texts, tol, f"{tag} dY")
    assert len(ours.grad_sim) == len(ref.grad_sim)
    for j, (a, e) in enumerate(zip(ours.grad_sim, ref.grad_sim)):
        assert_close_rel(a, e, tol, f"{tag} dS[{j}]")
    assert_close_rel(ours.grad_lr_img, ref.grad_lr_img, tol, f"{tag} dlr_img")
    assert_close_rel(ours.grad_lr_txt, ref.grad_lr_txt, tol, f"{tag} dlr_txt")
    assert abs(ours.loss - ref.loss) <= tol * abs(ref.loss), f"{tag}: loss {ours.loss} != {ref.loss}"


@pytest.mark.parametrize("checkpoint", ["none", "torch", "deepspeed"])
@pytest.mark.parametrize("sim_kind", ["lowrank", "full", "none"])
def test_tesla_matches_reference(sim_kind, checkpoint):
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup(sim_kind, checkpoint=checkpoint)
    ours = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    st_ref, *_ = make_setup(sim_kind)
    ref = reference_tesla_iteration(st_ref, lf, X, Y, sim, *lrs, start, target, plan)
    compare(ours, ref, 1e-8, f"{sim_kind}/{checkpoint}")
    # GroupNorm's backward uses another formula under create_graph (PyTorch), so pass 2 may differ by ulps
    assert ours.drift <= 1e-13, f"pass-2 θ_K differs from pass 1 by {ours.drift}"
    for g in (ours.grad_images, ours.grad_texts, *ours.grad_sim):
        assert float(g.abs().max()) > 0, "a gradient is identically zero: the test would prove nothing"


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kind", ["wbce", "cwcl"])
def test_tesla_matches_reference_other_losses(kind, merge):
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup("lowrank", kind=kind)
    ours = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan, merge_branches=merge)
    ref = reference_tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan, merge_branches=merge)
    compare(ours, ref, 1e-8, f"{kind}/merge={merge}")


def test_checkpointing_gives_identical_gradients():
    results = {}
    for ck in ("none", "torch", "deepspeed"):
        st, lf, X, Y, sim, lrs, start, target, plan = make_setup("lowrank", dropout=True, checkpoint=ck)
        results[ck] = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    base = results["none"]
    for ck in ("torch", "deepspeed"):
        r = results[ck]
        for a, b, name in ((r.grad_images, base.grad_images, "dX"), (r.grad_texts, base.grad_texts, "dY"),
                           (r.grad_lr_img, base.grad_lr_img, "dlr_img")):
            assert torch.equal(a, b), f"{ck} {name} differs: {float((a - b).abs().max()):.3e}"
        for a, b in zip(r.grad_sim, base.grad_sim):
            assert torch.equal(a, b), f"{ck} dS differs"


def test_replay_is_bitwise_without_norm_layers():
    """Linear student branches: pass 2 re-walks exactly pass 1's θ_i (drift exactly 0)."""
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup("lowrank")
    flat_x = X.detach().flatten(1)
    lin = FlatModel(torch.nn.Linear(flat_x.shape[1], 5).double())
    lin_t = FlatModel(torch.nn.Linear(D_TXT, 5).double())
    st = Student(lambda th, x: lin(th, x.flatten(1)), lin_t, logit_scale=st.logit_scale)
    start = (lin.flat(), lin_t.flat())
    target = (start[0] + 0.05, start[1] - 0.05)
    ours = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    assert ours.drift == 0.0, f"θ_K recomputed in pass 2 differs from pass 1 by {ours.drift}"


def test_dropout_consistent_recomputation():
    """With dropout on, pass 2 replays pass 1's masks (θ_K agrees) and matches the seeded reference."""
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup("lowrank", dropout=True)
    ours = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    assert ours.drift <= 1e-13, f"θ_K recomputed in pass 2 differs from pass 1 by {ours.drift}"
    ref = reference_tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    compare(ours, ref, 1e-8, "dropout")
    buggy = reference_tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan, consistent_dropout=False)
    assert float((buggy.grad_images - ref.grad_images).abs().max()) > 1e-6, "dropout had no effect"


def _full_unroll(st, lf, X, Y, sim_mod, lrs, start, target, plan):
    """Independent exact MTT: differentiable unroll, grads w.r.t. every leaf via one backward."""
    th = [start[0].clone().requires_grad_(), start[1].clone().requires_grad_()]
    for idx, seed in zip(plan.batches, plan.seeds):
        if sim_mod is None:
            t = None
        elif isinstance(sim_mod, FullSimilarity):
            t = sim_mod.full[idx[:, None], idx]
        else:
            t = sim_mod.target(idx)
        from lors_fast.models import seeded

        with seeded(seed):
            f, h = st.features(th[0], th[1], X[idx], Y[idx], checkpointed=False)
            loss = lf(f, h, t)
        g = torch.autograd.grad(loss, th, create_graph=True)
        th = [th[0] - lrs[0] * g[0], th[1] - lrs[1] * g[1]]
    obj = sum(torch.sum((th[b] - target[b]) ** 2) / torch.sum((start[b] - target[b]) ** 2) for b in range(2))
    params = [] if sim_mod is None else list(sim_mod.parameters())
    return torch.autograd.grad(obj, [X, Y, *params, *lrs]), float(obj)


@pytest.mark.parametrize("checkpoint", ["none", "torch"])
@pytest.mark.parametrize("sim_kind", ["lowrank", "full", "none"])
def test_mtt_matches_full_unroll(sim_kind, checkpoint):
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup(sim_kind, dropout=True, checkpoint=checkpoint)
    ours = mtt_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    grads, obj = _full_unroll(st, lf, X, Y, sim.sim, lrs, start, target, plan)
    assert_close_rel(ours.grad_images, grads[0], 1e-10, "mtt dX")
    assert_close_rel(ours.grad_texts, grads[1], 1e-10, "mtt dY")
    for j, g in enumerate(ours.grad_sim):
        assert_close_rel(g, grads[2 + j], 1e-10, f"mtt dS[{j}]")
    assert_close_rel(ours.grad_lr_img, grads[-2], 1e-10, "mtt dlr_img")
    assert_close_rel(ours.grad_lr_txt, grads[-1], 1e-10, "mtt dlr_txt")
    assert abs(ours.loss - obj) <= 1e-12 * obj


def test_mtt_differs_from_tesla_by_cross_terms():
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup("lowrank")
    m = mtt_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    t = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)
    assert abs(m.loss - t.loss) <= 1e-12 * t.loss, "both evaluate the same matching loss"
    assert float((m.grad_images - t.grad_images).abs().max()) > 1e-9, "cross terms should matter"


def test_mtt_refuses_deepspeed():
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup("none", checkpoint="deepspeed")
    with pytest.raises(ValueError, match="mtt"):
        mtt_iteration(st, lf, X, Y, sim, *lrs, start, target, plan)


@pytest.mark.parametrize("checkpoint", ["none", "deepspeed"])
@pytest.mark.parametrize("sim_kind,dropout,merge", [("lowrank", True, False), ("full", False, True),
                                                    ("none", False, False)])
def test_chunked_pass2_matches_reference(sim_kind, dropout, merge, checkpoint):
    st, lf, X, Y, sim, lrs, start, target, plan = make_setup(sim_kind, dropout=dropout, checkpoint=checkpoint)
    ours = tesla_iteration(st, lf, X, Y, sim, *lrs, start, target, plan, merge_branches=merge, chunk=3)
    st_ref, *_ = make_setup(sim_kind, dropout=dropout)
    ref = reference_tesla_iteration(st_ref, lf, X, Y, sim, *lrs, start, target, plan, merge_branches=merge)
    compare(ours, ref, 1e-8, f"chunked {sim_kind}/{checkpoint}")
    assert ours.drift <= 1e-13, f"pass-2 θ_K differs from pass 1 by {ours.drift}"
