"""``torch.autograd.gradcheck`` / ``gradgradcheck`` of the public API with backend="streaming".

Float64, tiny sizes (N = 5, d = 3, r = 2) and chunk_size = 2, so every call runs three chunks (2, 2, 1) and
the chunk seams are inside the checked function. Every input that carries a gradient is checked: the
features, logit_scale, logit_bias and the target (diag, left, right and the LowRankTarget scale, or the
dense S). wbce targets are drawn at least 1e-3 away from the S > 0.5 threshold, so the finite differences
never flip the mask.

The default run uses ``fast_mode=True`` (checks a random projection of the Jacobian against finite
differences, which catches any wrong derivative with probability 1); the full Jacobian check is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KINDS, TARGETS, LossCase

N, D, R, CHUNK = 5, 3, 2, 2


def _case(kind, target):
    return LossCase(kind, target, N, D, R, seed=7, margin=1e-3)


FAST = [pytest.param(True, id="fast"), pytest.param(False, id="full", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_streaming(kind, target, fast):
    case = _case(kind, target)
    f = case.as_function("streaming", chunk_size=CHUNK)
    assert torch.autograd.gradcheck(f, tuple(case.leaves.values()), eps=1e-6, atol=1e-7, rtol=1e-6,
                                    fast_mode=fast), f"gradcheck failed for {kind}/{target}"


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck_streaming(kind, target, fast):
    case = _case(kind, target)
    f = case.as_function("streaming", chunk_size=CHUNK)
    assert torch.autograd.gradgradcheck(f, tuple(case.leaves.values()), eps=1e-6, atol=1e-6, rtol=1e-5,
                                        fast_mode=fast), f"gradgradcheck failed for {kind}/{target}"
