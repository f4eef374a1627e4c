"""Shared test helpers: one self-explaining closeness assert (STYLE.md lesson 8).

``assert_close_verbose(actual, expected, atol, rtol, tag)`` passes when, element by element,
``|actual − expected| ≤ atol + rtol·|expected|`` and NaN/±inf sit at the same places with the same values.
On failure the message names the tag, the shapes, the number of mismatches, the max/mean absolute and
relative differences and the first few mismatching indices with both values. With ``pytest -s`` the margin is
printed even when the check passes.
"""

from __future__ import annotations

import pytest
import torch

__all__ = ["assert_close_verbose", "SHOW"]

#: how many mismatching entries a failure message lists
SHOW = 8


def _as_tensor(x, tag: str, side: str) -> torch.Tensor:
    if x is None:
        raise AssertionError(f"{tag}: {side} is None")
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.detach().to("cpu", torch.float64)


def assert_close_verbose(actual, expected, atol: float = 0.0, rtol: float = 0.0, tag: str = "") -> None:
    """Assert ``|actual − expected| ≤ atol + rtol·|expected|`` elementwise, with a readable report.

    Args:
        actual, expected: tensors (or numbers) of the same shape; compared in float64 on CPU.
        atol, rtol: absolute and relative tolerances (non-negative).
        tag: a short label naming what is compared, e.g. "[wbce/lowrank] dU".
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    a, e = _as_tensor(actual, tag, "actual"), _as_tensor(expected, tag, "expected")
    if a.shape != e.shape:
        raise AssertionError(f"{tag}: shape mismatch, actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    a, e = a.reshape(-1), e.reshape(-1)
    fin_a, fin_e = torch.isfinite(a), torch.isfinite(e)
    # non-finite entries must agree exactly (same NaN positions, same infinities)
    nonfin_bad = (fin_a != fin_e) | (~fin_a & ~fin_e & ~((a == e) | (a.isnan() & e.isnan())))
    both = fin_a & fin_e
    diff = torch.where(both, (a - e).abs(), torch.zeros_like(a))
    allowed = atol + rtol * e.abs()
    bad = nonfin_bad | (both & (diff > allowed))
    rel = torch.where(both & (e != 0), diff / e.abs().clamp_min(1e-300), torch.zeros_like(a))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    summary = (f"{tag}: max|Δ| {max_abs:.3e}, mean|Δ| {mean_abs:.3e}, max rel {max_rel:.3e} "
               f"(atol {atol:.1e}, rtol {rtol:.1e}, {a.numel()} elements)")
    n_bad = int(bad.sum())
    if n_bad == 0:
        print(summary)
        return
    idx = torch.nonzero(bad).reshape(-1)[:SHOW].tolist()
    lines = [f"{summary}", f"{n_bad} mismatched ({int(nonfin_bad.sum())} of them NaN/inf)"]
    for i in idx:
        lines.append(f"  flat[{i}] actual {a[i].item():.17g} expected {e[i].item():.17g} "
                     f"|Δ| {abs(a[i].item() - e[i].item()):.3e}")
    raise AssertionError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# loss-core cases: deterministic inputs for contrastive_loss, shared by the tests/test_core_*.py files
# ----------------------------------------------------------------------------------------------------
from lors_fast.core.kinds import KINDS  # noqa: E402,F401  (re-exported to the tests)

TARGETS = ("identity", "lowrank", "dense")


class LossCase:
    """Leaf tensors of one contrastive_loss call and a way to evaluate it on any backend.

    ``leaves`` maps a name ("U", "V", "scale", "bias", "a", "L", "R", "c" or "S") to a leaf tensor that
    requires grad; ``loss(backend, **kw)`` calls the public API on those leaves.
    """

    def __init__(self, kind: str, target: str, n: int, d: int = 5, r: int = 3, *, dtype=torch.float64,
                 seed: int = 0, bias: bool = True, tensor_scale: bool = True, margin: float = 0.0):
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(seed)
        self.kind, self.target_type = kind, target

        def leaf(t):
            return t.to(dtype).requires_grad_(True)

        self.leaves = {
            "U": leaf(F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)),
            "V": leaf(F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)),
            "scale": leaf(torch.tensor(4.0, dtype=torch.float64)),
        }
        if bias:
            self.leaves["bias"] = leaf(torch.tensor(-1.25, dtype=torch.float64))
        for _ in range(100):  # redraw until no target entry sits within `margin` of wbce's 0.5 threshold
            if target == "lowrank":
                t = {"a": 1.2 * torch.rand(n, generator=g, dtype=torch.float64),
                     "L": 0.8 * torch.randn(n, r, generator=g, dtype=torch.float64),
                     "R": 0.8 * torch.randn(n, r, generator=g, dtype=torch.float64)}
                c = torch.tensor(0.5, dtype=torch.float64)
                dense = torch.diag(t["a"]) + c * t["L"] @ t["R"].T
                if tensor_scale:
                    t["c"] = c
            elif target == "dense":
                t = {"S": torch.rand(n, n, generator=g, dtype=torch.float64)}
                dense = t["S"]
            else:
                t, dense = {}, torch.eye(n, dtype=torch.float64)
            if margin <= 0 or float((dense - 0.5).abs().min()) > margin:
                break
        else:
            raise RuntimeError(f"no target with margin {margin} found")
        self.leaves.update({k: leaf(v) for k, v in t.items()})
        self.tensor_scale = tensor_scale

    def target(self, leaves=None):
        from lors_fast import LowRankTarget

        x = self.leaves if leaves is None else leaves
        if self.target_type == "lowrank":
            return LowRankTarget(x["a"], x["L"], x["R"], x["c"] if self.tensor_scale else 0.5)
        if self.target_type == "dense":
            return x["S"]
        return None

    def loss(self, backend: str, leaves=None, **kw):
        from lors_fast import contrastive_loss

        x = self.leaves if leaves is None else leaves
        return contrastive_loss(x["U"], x["V"], x["scale"], self.target(x), kind=self.kind,
                                logit_bias=x.get("bias"), backend=backend, **kw)

    def names(self):
        return list(self.leaves)

    def as_function(self, backend: str, **kw):
        """f(*leaf tensors in names() order) -> loss, for gradcheck."""
        names = self.names()

        def f(*xs):
            return self.loss(backend, dict(zip(names, xs)), **kw)

        return f


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than oversubscribed ones (and deterministic).
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
