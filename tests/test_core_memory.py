"""Peak memory of the streaming loss at N = 16384, d = 256: forward + backward must stay far below one
N×N float32 matrix (1 GiB).

Measured in a fresh subprocess (torch's CPU allocations are invisible to tracemalloc): the inputs are built,
the peak resident set (VmHWM) is reset through /proc/self/clear_refs, the loss and all first-order gradients
are computed, and the increase of VmHWM is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NN_FP32 = 16384 * 16384 * 4  # one N×N float32 matrix: 1 GiB
LIMIT = 256 * 2**20

SCRIPT = r"""
import json, sys, torch
import torch.nn.functional as F
from lors_fast import LowRankTarget, contrastive_loss

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

n, d, r, kind = int(sys.argv[1]), int(sys.argv[2]), 10, sys.argv[3]
g = torch.Generator().manual_seed(0)
U = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
V = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
a = torch.ones(n, requires_grad=True)
L = torch.randn(n, r, generator=g).requires_grad_(True)
R = (0.1 * torch.randn(n, r, generator=g)).requires_grad_(True)
scale = torch.tensor(1 / 0.07, requires_grad=True)
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base, reset = status("VmHWM"), True
except OSError:
    base, reset = status("VmRSS"), False
loss = contrastive_loss(U, V, scale, LowRankTarget(a, L, R, 0.1), kind=kind, backend="streaming")
grads = torch.autograd.grad(loss, [U, V, scale, a, L, R])
ok = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(x).all()) for x in grads)
print(json.dumps({"peak_increase": status("VmHWM") - base, "reset": reset, "finite": ok}))
"""


def _peak(kind: str, n: int = 16384, d: int = 256) -> dict:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) to read the peak resident set")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(d), kind], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, f"memory probe failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(res: dict, kind: str):
    mib = res["peak_increase"] / 2**20
    print(f"[{kind}] N=16384 d=256 streaming fwd+bwd peak increase {mib:.1f} MiB "
          f"({100 * res['peak_increase'] / NN_FP32:.1f} % of one N×N fp32 matrix), VmHWM reset: {res['reset']}")
    assert res["finite"], f"[{kind}] non-finite loss or gradient"
    assert res["peak_increase"] < LIMIT, (
        f"[{kind}] streaming fwd+bwd at N=16384 raised the peak RSS by {mib:.1f} MiB; expected < "
        f"{LIMIT / 2**20:.0f} MiB (one N×N fp32 matrix is 1024 MiB)")


def test_streaming_memory_infonce_16384():
    _check(_peak("infonce"), "infonce")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wbce", "siglip", "bce"])
def test_streaming_memory_pairwise_16384(kind):
    _check(_peak(kind), kind)
