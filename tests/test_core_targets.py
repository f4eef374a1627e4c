"""Targets: LowRankTarget.select / dense / row and column sums, LowRankSimilarity and FullSimilarity, and
awkward batch sizes (N = 1, 2, 17, chunk − 1, chunk + 1) of the streaming loss against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import KINDS, TARGETS, LossCase, assert_close_verbose

from lors_fast import FullSimilarity, LowRankSimilarity, LowRankTarget, contrastive_loss

F64 = torch.float64


def _lowrank(n=9, r=3, seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    return LowRankTarget(torch.randn(n, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64),
                         torch.randn(n, r, generator=g, dtype=F64), scale)


def test_lowrank_dense_is_definition():
    t = _lowrank()
    expected = torch.diag(t.diag) + 0.4 * t.left @ t.right.T
    assert_close_verbose(t.dense(), expected, atol=1e-15, rtol=0.0, tag="dense()")
    assert_close_verbose(t.row_sums(), expected.sum(1), atol=1e-13, rtol=0.0, tag="row_sums()")
    assert_close_verbose(t.col_sums(), expected.sum(0), atol=1e-13, rtol=0.0, tag="col_sums()")
    assert t.shape == (9, 9) and t.rank == 3 and t.n == 9


@pytest.mark.parametrize("idx", [[4, 0, 7], [2, 2, 5], list(range(9)), [8]], ids=["perm", "repeat", "all", "one"])
def test_select_equals_dense_block(idx):
    t = _lowrank()
    sel = t.select(torch.tensor(idx))
    full = t.dense()
    expected = full[torch.tensor(idx)][:, torch.tensor(idx)]
    if len(set(idx)) < len(idx):
        # a repeated index puts a diagonal entry off the diagonal of the block: select keeps the low-rank
        # part there (the reference's minibatch target from indexed factors does the same)
        ii = torch.tensor(idx)
        expected = torch.diag(t.diag[ii]) + 0.4 * t.left[ii] @ t.right[ii].T
    assert_close_verbose(sel.dense(), expected, atol=1e-14, rtol=0.0, tag=f"select({idx})")


def test_select_gradients_reach_factors():
    sim = LowRankSimilarity(10, 2, alpha=3.0, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        sim.right.normal_()
    idx = torch.tensor([3, 1, 8])
    sim.target(idx).dense().sum().backward()
    touched = torch.zeros(10, dtype=torch.bool)
    touched[idx] = True
    assert bool((sim.diag.grad[touched] == 1).all()), f"diag grad {sim.diag.grad}"
    assert bool((sim.diag.grad[~touched] == 0).all()), f"untouched rows got gradient: {sim.diag.grad}"
    assert bool((sim.left.grad[~touched] == 0).all()) and bool((sim.left.grad[touched] != 0).any())


def test_lowrank_similarity_init_is_identity():
    sim = LowRankSimilarity(12, 4, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert_close_verbose(sim.dense(), torch.eye(12), atol=0.0, rtol=0.0, tag="LowRankSimilarity init")
    assert sim.scale == 0.5, f"scale should be alpha/rank = 0.5, got {sim.scale}"
    assert bool((sim.diag == 1).all()) and bool((sim.right == 0).all())
    assert float(sim.left.detach().std()) > 0.5, "left should be drawn from N(0, 1)"
    t = sim.target()
    assert isinstance(t, LowRankTarget) and t.scale == 0.5 and t.rank == 4


def test_full_similarity():
    sim = FullSimilarity(7, dtype=F64)
    assert_close_verbose(sim.dense(), torch.eye(7, dtype=F64), atol=0.0, rtol=0.0, tag="FullSimilarity init")
    with torch.no_grad():
        sim.full.copy_(torch.arange(49, dtype=F64).reshape(7, 7))
    idx = torch.tensor([5, 0, 3])
    assert_close_verbose(sim.target(idx), sim.full[idx][:, idx], atol=0.0, rtol=0.0, tag="FullSimilarity block")
    assert sim.target() is sim.full
    sim.target(idx).sum().backward()
    assert int((sim.full.grad != 0).sum()) == 9, f"gradient should touch the 3×3 block only:\n{sim.full.grad}"


def test_similarity_modules_feed_the_loss():
    """A minibatch target from each module works through contrastive_loss, both backends agreeing."""
    g = torch.Generator().manual_seed(3)
    U = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=F64), dim=1)
    V = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=F64), dim=1)
    idx = torch.tensor([9, 2, 4, 0, 7])
    for sim in (LowRankSimilarity(10, 3, generator=g, dtype=F64), FullSimilarity(10, dtype=F64)):
        vals = [contrastive_loss(U, V, 5.0, sim.target(idx), kind="wbce", backend=b) for b in
                ("reference", "streaming")]
        assert_close_verbose(vals[0], vals[1], atol=0.0, rtol=1e-12, tag=type(sim).__name__)


CHUNK = 8


@pytest.mark.parametrize("n", [1, 2, 17, CHUNK - 1, CHUNK + 1], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_awkward_batch_sizes(kind, target, n):
    case = LossCase(kind, target, n, d=3, r=2, seed=n)
    leaves = list(case.leaves.values())
    out = {}
    for backend in ("streaming", "reference"):
        kw = {"chunk_size": CHUNK} if backend == "streaming" else {}
        loss = case.loss(backend, **kw)
        out[backend] = (loss, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    (ls, gs), (lr, gr) = out["streaming"], out["reference"]
    assert_close_verbose(ls, lr, atol=1e-13, rtol=1e-10, tag=f"[{kind}/{target}/N={n}] loss")
    floor = max(float(g.abs().max()) for g in gr)
    for name, a, e in zip(case.leaves, gs, gr):
        assert_close_verbose(a, e, atol=1e-10 * max(float(e.abs().max()), 1e-3 * floor, 1e-3), rtol=1e-10,
                             tag=f"[{kind}/{target}/N={n}] d{name}")
