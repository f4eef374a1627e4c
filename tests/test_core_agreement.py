"""Streaming backend vs the materialised reference: every kind × target type, loss and every gradient.

float64: ≤ 1e-10 relative (per tensor: atol = 1e-10·max|expected|, with a floor scaled by the largest
gradient of the case for gradients that are mathematically zero, e.g. ∂/∂bias of the softmax kinds).
float32: the streaming error against a float64 oracle must stay within a small multiple of the reference's
own float32 error (STYLE.md lesson 6).
Second order: ``torch.autograd.grad(create_graph=True)`` then the grad of a random linear function of the
gradients, and the same through ``.backward(create_graph=True)``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KINDS, TARGETS, LossCase, assert_close_verbose

from lors_fast.core.kinds import LSE_KINDS, PAIR_KINDS
from lors_fast.core.streaming import pairsum

CHUNK = 4  # rows per streaming chunk: N = 11 gives chunks of 4, 4, 3
N = 11
RTOL64 = 1e-10


def _grads(case: LossCase, backend: str, leaves=None, create_graph=False):
    x = case.leaves if leaves is None else leaves
    kw = {"chunk_size": CHUNK} if backend == "streaming" else {}
    loss = case.loss(backend, x, **kw)
    x = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}  # python floats have no gradient
    g = torch.autograd.grad(loss, list(x.values()), create_graph=create_graph, allow_unused=True,
                            materialize_grads=True)
    return loss, dict(zip(x, g))


def _scale_of(grads: dict) -> float:
    return max(float(g.detach().abs().max()) for g in grads.values())


def _compare_f64(actual: dict, expected: dict, tag: str):
    floor = _scale_of(expected)
    for name in expected:
        e = expected[name]
        atol = RTOL64 * max(float(e.detach().abs().max()), 1e-3 * floor)
        assert_close_verbose(actual[name], e, atol=atol, rtol=RTOL64, tag=f"{tag} d{name}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_float64_loss_and_grads(kind, target):
    case = LossCase(kind, target, N, seed=1)
    ls, gs = _grads(case, "streaming")
    lr, gr = _grads(case, "reference")
    assert_close_verbose(ls, lr, atol=0.0, rtol=RTOL64, tag=f"[{kind}/{target}] loss")
    _compare_f64(gs, gr, f"[{kind}/{target}]")


@pytest.mark.parametrize("kind", KINDS)
def test_float64_float_scales(kind):
    """logit_scale as a Python float, no bias, LowRankTarget.scale as a float."""
    case = LossCase(kind, "lowrank", N, seed=2, bias=False, tensor_scale=False)
    x = dict(case.leaves)
    x["scale"] = 4.0
    ls, gs = _grads(case, "streaming", x)
    lr, gr = _grads(case, "reference", x)
    assert_close_verbose(ls, lr, atol=0.0, rtol=RTOL64, tag=f"[{kind}] loss")
    assert "scale" not in gs and "c" not in gs
    _compare_f64(gs, gr, f"[{kind}/float scales]")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_loss_and_grads(kind, target):
    case64 = LossCase(kind, target, N, seed=3)
    case32 = LossCase(kind, target, N, seed=3, dtype=torch.float32)
    l64, g64 = _grads(case64, "reference")
    l_ref, g_ref = _grads(case32, "reference")
    l_str, g_str = _grads(case32, "streaming")
    assert l_str.dtype == torch.float32, f"streaming float32 loss came back as {l_str.dtype}"
    scale = _scale_of(g64)

    def check(actual, ref32, exact, tag):
        ref_err = float((ref32.detach().double() - exact.detach().double()).abs().max())
        mag = float(exact.detach().abs().max())
        # 4× the reference's own float32 error, plus ~16 ulps of the case's largest gradient (covers the
        # gradients that are mathematically 0, where both sides hold only rounding noise)
        atol = 4 * ref_err + 2e-6 * max(mag, scale)
        assert_close_verbose(actual, exact, atol=atol, rtol=0.0, tag=tag)

    check(l_str, l_ref, l64, f"[{kind}/{target}/f32] loss")
    for name in g64:
        check(g_str[name], g_ref[name], g64[name], f"[{kind}/{target}/f32] d{name}")


def _linear_of_grads(grads: dict, weights: dict):
    total = None
    for name, g in grads.items():
        if g.requires_grad:
            term = (g * weights[name]).sum()
            total = term if total is None else total + term
    return total


def _weights(case: LossCase, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in case.leaves.items()}


def _second_order_grad(case: LossCase, backend: str, w: dict) -> dict:
    _, g = _grads(case, backend, create_graph=True)
    f = _linear_of_grads(g, w)
    h = torch.autograd.grad(f, list(case.leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(case.leaves, h))


def _second_order_backward(case: LossCase, backend: str, w: dict) -> dict:
    """The engine's way: loss.backward(create_graph=True), then backward of a function of the .grad fields."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.leaves.items()}
    kw = {"chunk_size": CHUNK} if backend == "streaming" else {}
    case.loss(backend, leaves, **kw).backward(create_graph=True)
    g = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    _linear_of_grads(g, w).backward()
    out = {k: (v.grad.detach() if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None  # break the .grad -> graph reference cycle
    return out


# CLOSED_FORM_HVP only concerns the pairwise kinds: the softmax kinds run once, with the default
_HVP_CASES = [(k, h) for k in KINDS for h in (("closed",) if k in LSE_KINDS else ("closed", "autograd"))]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("kind", "hvp"), _HVP_CASES)
def test_float64_double_backward(kind, hvp, target, monkeypatch):
    """``hvp``: pairsum's double backward in closed form (the default) or by autograd of the closed-form
    first derivatives (lors_fast.core.streaming.pairsum.CLOSED_FORM_HVP = False)."""
    if hvp == "autograd":
        monkeypatch.setattr(pairsum, "CLOSED_FORM_HVP", False)
    case = LossCase(kind, target, N, seed=4)
    w = _weights(case, 40)
    hs = _second_order_grad(case, "streaming", w)
    hr = _second_order_grad(case, "reference", w)
    _compare_f64(hs, hr, f"[{kind}/{target}] grad-of-grad")
    bs = _second_order_backward(case, "streaming", w)
    _compare_f64(bs, hr, f"[{kind}/{target}] backward(create_graph)")


@pytest.mark.parametrize("hvp", ["closed", "autograd"])
@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_float64_saturated_logits(kind, hvp, monkeypatch):
    """|Z| up to ~150: bce's −100 log clamp is active on some entries, σ saturates; first and second order."""
    monkeypatch.setattr(pairsum, "CLOSED_FORM_HVP", hvp == "closed")
    case = LossCase(kind, "lowrank", N, seed=5)
    with torch.no_grad():
        case.leaves["scale"].fill_(150.0)
    ls, gs = _grads(case, "streaming")
    lr, gr = _grads(case, "reference")
    assert_close_verbose(ls, lr, atol=0.0, rtol=RTOL64, tag=f"[{kind}/saturated] loss")
    _compare_f64(gs, gr, f"[{kind}/saturated]")
    w = _weights(case, 50)
    _compare_f64(_second_order_grad(case, "streaming", w), _second_order_grad(case, "reference", w),
                 f"[{kind}/saturated] grad-of-grad")
