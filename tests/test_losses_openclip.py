"""Drop-in open_clip losses (lors_fast.core.losses) against open_clip 3.x's own ClipLoss / SigLipLoss.

open_clip's ``loss.py`` imports nothing but torch (horovod optionally), so it is loaded straight from the
installed package file (importing the whole ``open_clip`` package costs 8–20 s). Distributed parity runs
world_size 2, 4 and 5 with gloo on CPU, one start of the worker processes per world size running every case
(fork where available: spawning re-imports torch in every child), and compares our loss and gradients with
open_clip's in the same processes.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_verbose

from lors_fast import LowRankTarget, contrastive_loss
from lors_fast.core.kinds import KINDS, interpreting
from lors_fast.core.losses import (
    ClipLoss,
    ContrastiveLoss,
    SigLipLoss,
    _MaterialisedPrimitives,
    clip_block_loss,
    siglip_negative_block,
)
from lors_fast.core.streaming import StreamingPrimitives

F64 = torch.float64
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}  # (atol, rtol)


def openclip_loss_module():
    """open_clip's loss module, loaded from its file without importing the open_clip package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("_openclip_loss_reference", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def make_inputs(seed, n, d, dtype, bias=True, world=1):
    """(image, text) features of all ranks (L2-normalised) and the raw logit_scale / logit_bias leaves."""
    g = torch.Generator().manual_seed(seed)
    U = F.normalize(torch.randn(world * n, d, generator=g, dtype=F64), dim=1).to(dtype)
    V = F.normalize(torch.randn(world * n, d, generator=g, dtype=F64), dim=1).to(dtype)
    log_s = torch.tensor(2.3, dtype=dtype)
    b = torch.tensor(-1.7, dtype=dtype) if bias else None
    return U, V, log_s, b


def loss_and_grads(loss_fn, U, V, log_s, b, call_bias):
    """Loss and d/d(U, V, log_s[, b]) on fresh leaves; ``call_bias``: how the bias is passed."""
    leaves = [t.clone().requires_grad_(True) for t in (U, V, log_s)]
    bl = None if b is None else b.clone().requires_grad_(True)
    loss = call_bias(loss_fn, leaves[0], leaves[1], leaves[2].exp(), bl)
    wrt = leaves + ([bl] if bl is not None else [])
    return loss.detach(), torch.autograd.grad(loss, wrt)


def call_clip(fn, U, V, s, b):
    return fn(U, V, s) if b is None else fn(U, V, s, logit_bias=b)


def call_siglip(fn, U, V, s, b):
    return fn(U, V, s, b)


def compare(ours, theirs, dtype, tag):
    atol, rtol = TOL[dtype]
    assert_close_verbose(ours[0], theirs[0], atol, rtol, f"{tag} loss")
    assert len(ours[1]) == len(theirs[1]), f"{tag}: {len(ours[1])} grads vs {len(theirs[1])}"
    for name, go, gt in zip(("dU", "dV", "dlog_s", "dbias"), ours[1], theirs[1]):
        assert_close_verbose(go, gt, atol, rtol, f"{tag} {name}")


# ------------------------------------------------------------------------------------ single process
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,chunk", [("reference", None), ("streaming", 3), ("auto", None)])
@pytest.mark.parametrize("bias", [False, True])
def test_clip_parity(dtype, backend, chunk, bias):
    oc = openclip_loss_module()
    U, V, log_s, b = make_inputs(0, 11, 6, dtype, bias)
    ours = loss_and_grads(ClipLoss(backend=backend, chunk_size=chunk), U, V, log_s, b, call_clip)
    theirs = loss_and_grads(oc.ClipLoss(), U, V, log_s, b, call_clip)
    compare(ours, theirs, dtype, f"[clip {backend} {dtype} bias={bias}]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,chunk", [("reference", None), ("streaming", 3), ("auto", None)])
@pytest.mark.parametrize("bias", [False, True])
def test_siglip_parity(dtype, backend, chunk, bias):
    oc = openclip_loss_module()
    U, V, log_s, b = make_inputs(1, 11, 6, dtype, bias)
    ours = loss_and_grads(SigLipLoss(backend=backend, chunk_size=chunk), U, V, log_s, b, call_siglip)
    theirs = loss_and_grads(oc.SigLipLoss(), U, V, log_s, b, call_siglip)
    compare(ours, theirs, dtype, f"[siglip {backend} {dtype} bias={bias}]")


def test_output_dict_and_helpers():
    oc = openclip_loss_module()
    U, V, log_s, b = make_inputs(2, 5, 4, F64)
    s = log_s.exp()
    for ours, theirs, args in ((ClipLoss(), oc.ClipLoss(), (U, V, s)), (SigLipLoss(), oc.SigLipLoss(), (U, V, s, b))):
        out, ref = ours(*args, output_dict=True), theirs(*args, output_dict=True)
        assert isinstance(out, dict) and set(out) == {"contrastive_loss"}, f"output_dict gave {out!r}"
        assert_close_verbose(out["contrastive_loss"], ref["contrastive_loss"], 1e-12, 1e-10,
                             f"[{type(ours).__name__} output_dict]")
        assert out["contrastive_loss"].dim() == 0, f"loss is not 0-dim: {out['contrastive_loss'].shape}"
    for got, want in zip(ClipLoss().get_logits(U, V, s, b), oc.ClipLoss().get_logits(U, V, s, b)):
        assert_close_verbose(got, want, 1e-12, 1e-12, "[clip get_logits]")
    assert_close_verbose(SigLipLoss().get_logits(U, V, s, b), oc.SigLipLoss().get_logits(U, V, s, b),
                         1e-12, 1e-12, "[siglip get_logits]")
    assert_close_verbose(ClipLoss(local_loss=True, rank=1, world_size=2).get_ground_truth("cpu", 5),
                         oc.ClipLoss(local_loss=True, rank=1, world_size=2).get_ground_truth("cpu", 5), 0, 0,
                         "[clip get_ground_truth]")
    for neg in (False, True):
        assert_close_verbose(SigLipLoss().get_ground_truth("cpu", F64, 4, neg),
                             oc.SigLipLoss().get_ground_truth("cpu", F64, 4, neg), 0, 0,
                             f"[siglip get_ground_truth negative_only={neg}]")


def test_double_backward_matches_reference():
    """Second-order gradients through ClipLoss / SigLipLoss (streaming) equal the materialised ones."""
    U, V, log_s, b = make_inputs(3, 9, 5, F64)
    for cls, call in ((ClipLoss, call_clip), (SigLipLoss, call_siglip)):
        res = []
        for backend, chunk in (("reference", None), ("streaming", 2)):
            Ul = U.clone().requires_grad_(True)
            loss = call(cls(backend=backend, chunk_size=chunk), Ul, V, log_s.exp(), b)
            (gU,) = torch.autograd.grad(loss, Ul, create_graph=True)
            (ggU,) = torch.autograd.grad((gU * V).sum(), Ul)
            res.append(ggU)
        assert_close_verbose(res[1], res[0], 1e-12, 1e-10, f"[{cls.__name__} double backward]")


# ------------------------------------------------------------------------------ rectangular blocks
def _block_cases():
    U, V, log_s, b = make_inputs(4, 6, 5, F64, world=3)  # U: 18 rows; take 6 local rows vs all 18
    return U[6:12], V, log_s.exp(), b


@pytest.mark.parametrize("bias", [False, True])
def test_rectangular_blocks_streaming_vs_materialised(bias):
    Ul, V_all, s, b = _block_cases()
    b = b if bias else None

    def run(prims, fn):
        U = Ul.clone().requires_grad_(True)
        Vv = V_all.clone().requires_grad_(True)
        sl = s.clone().requires_grad_(True)
        out = fn(prims, U, Vv, sl)
        return [out.detach(), *torch.autograd.grad(out, [U, Vv, sl])]

    for name, fn in (("clip_block", lambda p, U, Vv, sl: clip_block_loss(p, U, Vv, 6, sl, b)),
                     ("siglip_neg", lambda p, U, Vv, sl: siglip_negative_block(p, U, Vv[:6], sl, b))):
        want = run(_MaterialisedPrimitives(), fn)
        for chunk in (1, 4, 100):
            got = run(StreamingPrimitives(chunk), fn)
            for tag, g, w in zip(("loss", "dU", "dV", "ds"), got, want):
                assert_close_verbose(g, w, 1e-12, 1e-10, f"[{name} chunk={chunk} bias={bias}] {tag}")


def test_clip_block_equals_cross_entropy():
    """clip_block_loss is F.cross_entropy of the rectangular logits with labels offset + i."""
    Ul, V_all, s, b = _block_cases()
    logits = s * Ul @ V_all.T + b
    want = F.cross_entropy(logits, torch.arange(6) + 6)
    got = clip_block_loss(StreamingPrimitives(), Ul, V_all, 6, s, b)
    assert_close_verbose(got, want, 1e-12, 1e-12, "[clip_block vs cross_entropy]")


def test_rectangular_blocks_triton_interpreted():
    """The Triton primitives on the rectangular blocks (interpreter on CPU, tiny sizes)."""
    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    pytest.importorskip("triton")
    try:
        from lors_fast.ops import TritonPrimitives
    except ImportError as e:
        pytest.skip(f"triton backend not importable: {e}")
    dev = "cuda" if not interpreting() else "cpu"
    Ul, V_all, s, b = (t.to(dev) for t in _block_cases())
    for name, fn in (("clip_block", lambda p, U: clip_block_loss(p, U, V_all, 6, s, b)),
                     ("siglip_neg", lambda p, U: siglip_negative_block(p, U, V_all[:6], s, b))):
        res = []
        for prims in (_MaterialisedPrimitives(), TritonPrimitives(fp32_precision="ieee")):
            U = Ul.clone().requires_grad_(True)
            out = fn(prims, U)
            res.append((out.detach(), torch.autograd.grad(out, U)[0]))
        assert_close_verbose(res[1][0], res[0][0], 1e-10, 1e-9, f"[triton {name}] loss")
        assert_close_verbose(res[1][1], res[0][1], 1e-10, 1e-9, f"[triton {name}] dU")


# ------------------------------------------------------------------------------- ContrastiveLoss
def test_contrastive_loss_module_equals_function():
    g = torch.Generator().manual_seed(5)
    n, d, r = 7, 4, 2
    U = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    V = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    low = LowRankTarget(torch.rand(n, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64),
                        0.1 * torch.randn(n, r, generator=g, dtype=F64), 0.5)
    dense = torch.rand(n, n, generator=g, dtype=F64)
    for kind in KINDS:
        for tname, target in (("identity", None), ("lowrank", low), ("dense", dense)):
            got = ContrastiveLoss(kind, backend="streaming", kl_temperature=3.0)(U, V, 9.0, target, logit_bias=-0.5)
            want = contrastive_loss(U, V, 9.0, target, kind=kind, logit_bias=-0.5, backend="streaming",
                                    kl_temperature=3.0)
            assert_close_verbose(got, want, 0, 0, f"[ContrastiveLoss {kind}/{tname}]")
            ref = ContrastiveLoss(kind, backend="reference", kl_temperature=3.0)(U, V, 9.0, target, logit_bias=-0.5)
            assert_close_verbose(got, ref, 1e-12, 1e-10, f"[ContrastiveLoss {kind}/{tname} vs reference]")


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("factory,needle", [
    (lambda: ClipLoss(rank=2, world_size=2), "rank"),
    (lambda: ClipLoss(rank=-1), "rank"),
    (lambda: ClipLoss(world_size=0), "world_size"),
    (lambda: ClipLoss(local_loss="yes"), "local_loss"),
    (lambda: ClipLoss(gather_with_grad=1), "gather_with_grad"),
    (lambda: ClipLoss(use_horovod=True), "horovod"),
    (lambda: ClipLoss(backend="cuda"), "backend"),
    (lambda: ClipLoss(chunk_size=0), "chunk_size"),
    (lambda: SigLipLoss(dist_impl="ring"), "dist_impl"),
    (lambda: SigLipLoss(rank=3, world_size=3), "rank"),
    (lambda: SigLipLoss(world_size=1.5), "world_size"),
    (lambda: SigLipLoss(cache_labels=None), "cache_labels"),
    (lambda: ContrastiveLoss("hinge"), "kind"),
    (lambda: ContrastiveLoss(backend="fast"), "backend"),
    (lambda: ContrastiveLoss(kl_temperature=0.0), "kl_temperature"),
    (lambda: ContrastiveLoss(kl_temperature=float("nan")), "kl_temperature"),
])
def test_bad_constructor_args(factory, needle):
    with pytest.raises(ValueError, match=needle):
        factory()


def test_errors_are_collected():
    with pytest.raises(ValueError) as e:
        ClipLoss(world_size=0, backend="x", local_loss=None)
    msg = str(e.value)
    assert all(k in msg for k in ("world_size", "backend", "local_loss")), msg


def test_bad_forward_inputs():
    U, V, log_s, b = make_inputs(6, 4, 3, F64)
    with pytest.raises(ValueError, match="world_size = 2"):
        ClipLoss(rank=0, world_size=2)(U, V, 1.0)  # no process group
    with pytest.raises(ValueError, match="shape"):
        ClipLoss()(U, V[:3], 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        SigLipLoss()(U, V, torch.ones(2), b)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(U, V, 1.0, float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        ClipLoss(validate=True)(U.clone().fill_(float("nan")), V, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        SigLipLoss(validate=True)(U, V.clone().fill_(float("inf")), 1.0, b)


# ------------------------------------------------------------------------------------ distributed
M, D = 4, 5
DIST_TIMEOUT_S = 180


def _dist_cases(world):
    """Every option at world_size 2; at larger sizes the paths whose communication changes with it."""
    cases = []
    for local in (False, True):
        for with_grad in (False, True):
            for bias in ((False, True) if world == 2 else (True,)):
                if world == 2 or local:
                    cases.append(("clip", dict(local_loss=local, gather_with_grad=with_grad), bias))
    impls = ("bidir", "shift", "reduce", "gather") if world == 2 else ("bidir", "shift", "gather")
    for impl in impls:
        cases.append(("siglip", dict(dist_impl=impl), True))
    if world == 2:
        cases.append(("siglip", dict(dist_impl=None), False))
    return cases


def _dist_worker(rank, world, init_file, backends):
    # a forked child must not enter the parent's OpenMP thread pool (libgomp deadlocks after fork)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        oc = openclip_loss_module()
        for i, (which, kw, bias) in enumerate(_dist_cases(world)):
            U_all, V_all, log_s, b = make_inputs(100 + i, M, D, F64, bias, world=world)
            U, V = U_all[rank * M:(rank + 1) * M], V_all[rank * M:(rank + 1) * M]
            call = call_clip if which == "clip" else call_siglip
            theirs_cls = oc.ClipLoss if which == "clip" else oc.SigLipLoss
            theirs = loss_and_grads(theirs_cls(rank=rank, world_size=world, **kw), U, V, log_s, b, call)
            for backend, chunk in backends:
                ours_cls = ClipLoss if which == "clip" else SigLipLoss
                ours = loss_and_grads(ours_cls(rank=rank, world_size=world, backend=backend, chunk_size=chunk,
                                               **kw), U, V, log_s, b, call)
                compare(ours, theirs, F64, f"[rank {rank}/{world} {which} {kw} bias={bias} {backend}]")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4, 5])
def test_distributed_parity(world, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    openclip_loss_module()  # skip early when open_clip is missing
    backends = [("streaming", 3), ("reference", None)] if world == 2 else [("streaming", None)]
    # fork: a spawned child re-imports torch (10-40 s on a loaded 2-core machine); fork takes < 1 s
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    ctx = torch.multiprocessing.start_processes(_dist_worker, args=(world, str(tmp_path / "rendezvous"), backends),
                                                nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + DIST_TIMEOUT_S
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException when a worker's assert fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers (world_size={world}) did not finish within {DIST_TIMEOUT_S} s")


# ---------------------------------------------------------------------------------------------- GPU
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_triton_matches_reference(dtype):
    """On CUDA, backend "auto" (Triton) against the materialised reference: whole losses and the blocks."""
    _cuda_or_skip()
    # float32 runs tf32 dot products by default: a looser tolerance
    atol, rtol = (1e-10, 1e-9) if dtype == F64 else (2e-3, 2e-3)
    U, V, log_s, b = (None if t is None else t.cuda() for t in make_inputs(7, 300, 64, dtype, True, world=2))
    Ul = U[:300]
    for cls, call in ((ClipLoss, call_clip), (SigLipLoss, call_siglip)):
        want = loss_and_grads(cls(backend="reference"), Ul, V[:300], log_s, b, call)
        got = loss_and_grads(cls(backend="auto"), Ul, V[:300], log_s, b, call)
        for tag, g, w in zip(("loss", "dU", "dV", "dlog_s", "dbias"), [got[0], *got[1]], [want[0], *want[1]]):
            assert_close_verbose(g, w, atol, rtol, f"[gpu {cls.__name__} {dtype}] {tag}")
    from lors_fast.core.losses import block_primitives

    tri = block_primitives("auto", U.device, "infonce")
    assert type(tri).__name__ == "TritonPrimitives", f"auto on CUDA resolved to {type(tri).__name__}"
    s = log_s.exp()
    for name, fn in (("clip_block", lambda p, X: clip_block_loss(p, X, V, 300, s, b)),
                     ("siglip_neg", lambda p, X: siglip_negative_block(p, X, V[300:], s, b))):
        res = []
        for prims in (_MaterialisedPrimitives(), tri):
            X = Ul.clone().requires_grad_(True)
            out = fn(prims, X)
            res.append((out.detach(), torch.autograd.grad(out, X)[0]))
        assert_close_verbose(res[1][0], res[0][0], atol, rtol, f"[gpu {name} {dtype}] loss")
        assert_close_verbose(res[1][1], res[0][1], atol, rtol, f"[gpu {name} {dtype}] dU")


@pytest.mark.gpu
def test_gpu_memory_and_time():
    """ClipLoss / SigLipLoss fwd+bwd at N = 16384, d = 512 fp32: Triton vs materialised (printed; peak asserted)."""
    _cuda_or_skip()
    n, d = 16384, 512
    U, V, log_s, b = (t.cuda() for t in make_inputs(8, n, d, torch.float32))
    nn_bytes = n * n * 4
    for cls, call in ((ClipLoss, call_clip), (SigLipLoss, call_siglip)):
        stats = {}
        for backend in ("reference", "auto"):
            fn = cls(backend=backend)
            loss_and_grads(fn, U, V, log_s, b, call)  # warm-up (compilation)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(5):
                loss_and_grads(fn, U, V, log_s, b, call)
            torch.cuda.synchronize()
            stats[backend] = ((time.perf_counter() - t0) / 5 * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20)
        print(f"[gpu {cls.__name__} N={n} d={d} fp32 fwd+bwd] reference {stats['reference'][0]:.2f} ms "
              f"{stats['reference'][1]:.0f} MiB peak; triton {stats['auto'][0]:.2f} ms {stats['auto'][1]:.0f} MiB peak")
        # the O(N·d) leaves, their clones and gradients alone take 128 MiB here; one N×N fp32 matrix is 1 GiB
        assert stats["auto"][1] * 2**20 < 0.25 * nn_bytes, f"{cls.__name__} triton peak {stats['auto'][1]:.0f} MiB"
