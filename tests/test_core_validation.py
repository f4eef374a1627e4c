"""Bad input to the loss core: each case raises ValueError whose message names the bad value and what was
expected (checked with ``pytest.raises(match=...)``)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LossCase

from lors_fast import FullSimilarity, LowRankSimilarity, LowRankTarget, contrastive_loss
from lors_fast.core.streaming import StreamingPrimitives

N, D = 6, 4


def feats(n=N, d=D, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g, dtype=dtype).to(device),
            torch.randn(n, d, generator=g, dtype=dtype).to(device))


def lowrank(n=N, r=2, dtype=torch.float32):
    return LowRankTarget(torch.ones(n, dtype=dtype), torch.randn(n, r, dtype=dtype),
                         torch.zeros(n, r, dtype=dtype), 0.5)


def test_features_not_2d():
    U, V = feats()
    with pytest.raises(ValueError, match=r"image_features must be 2-D \(N, d\), got shape \(24,\)"):
        contrastive_loss(U.reshape(-1), V, 10.0)


def test_features_shape_mismatch():
    U, _ = feats()
    _, V = feats(n=N + 1)
    with pytest.raises(ValueError, match=r"image_features \(6, 4\) and text_features \(7, 4\) must have the same"):
        contrastive_loss(U, V, 10.0)


def test_features_dtype_mismatch():
    U, V = feats()
    with pytest.raises(ValueError, match=r"dtype torch.float32 differs from text_features dtype torch.float64"):
        contrastive_loss(U, V.double(), 10.0)


def test_features_integer_dtype():
    U, V = feats()
    with pytest.raises(ValueError, match=r"image_features must be floating point .* got torch.int64"):
        contrastive_loss(U.long(), V.long(), 10.0)


def test_features_device_mismatch():
    U, V = feats()
    with pytest.raises(ValueError, match=r"image_features on meta but text_features on cpu"):
        contrastive_loss(U.to("meta"), V, 10.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_features_non_finite(bad, monkeypatch):
    """Value checks run in validation mode only (argument or LORS_FAST_VALIDATE); off by default."""
    U, V = feats()
    V[2, 1] = bad
    with pytest.raises(ValueError, match=r"text_features contains non-finite values"):
        contrastive_loss(U, V, 10.0, backend="streaming", validate=True)
    monkeypatch.setenv("LORS_FAST_VALIDATE", "1")
    with pytest.raises(ValueError, match=r"text_features contains non-finite values"):
        contrastive_loss(U, V, 10.0, backend="streaming")
    monkeypatch.delenv("LORS_FAST_VALIDATE")
    assert not torch.isfinite(contrastive_loss(U, V, 10.0, backend="streaming"))  # no check, nan/inf flows


def test_tensor_scale_non_finite_in_validation_mode():
    U, V = feats()
    with pytest.raises(ValueError, match=r"logit_scale must be finite, got nan"):
        contrastive_loss(U, V, torch.tensor(math.nan), validate=True)
    with pytest.raises(ValueError, match=r"logit_bias must be finite, got inf"):
        contrastive_loss(U, V, 10.0, logit_bias=torch.tensor(math.inf), kind="siglip", validate=True)


def test_unknown_kind():
    U, V = feats()
    with pytest.raises(ValueError, match=r"unknown loss kind 'focal'; expected one of \('infonce'"):
        contrastive_loss(U, V, 10.0, kind="focal")


def test_unknown_backend():
    U, V = feats()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of \('auto', 'reference'"):
        contrastive_loss(U, V, 10.0, backend="cuda")


def test_triton_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    U, V = feats()
    with pytest.raises(ValueError, match=r"backend='triton' needs (CUDA tensors \(got device cpu\)|the triton)"):
        contrastive_loss(U, V, 10.0, backend="triton")


def test_float64_on_cuda_never_goes_to_the_kernels(monkeypatch):
    """fp64 is the exact mode: "auto" serves it with the chunked torch path on CUDA, and an explicit triton
    request says why not (decided from the device and dtype alone, so no GPU is needed to test it)."""
    from lors_fast.core import functional

    monkeypatch.setattr(functional, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert functional.resolve_backend("auto", cuda, "infonce", torch.float64) == "streaming"
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert functional.resolve_backend("auto", cuda, "infonce", dt) == "triton"
    assert functional.resolve_backend("auto", cuda, "kl", torch.float32) == "streaming"
    with pytest.raises(ValueError, match=r"backend='triton' runs float16/bfloat16/float32 on CUDA, got float64"):
        functional.resolve_backend("triton", cuda, "infonce", torch.float64)


def test_rank_zero():
    with pytest.raises(ValueError, match=r"rank must be >= 1, got left of shape \(6, 0\)"):
        LowRankTarget(torch.ones(N), torch.zeros(N, 0), torch.zeros(N, 0))
    with pytest.raises(ValueError, match=r"LowRankSimilarity rank must be a positive int, got 0"):
        LowRankSimilarity(N, 0)


def test_empty_batch():
    U, V = feats(n=0)
    with pytest.raises(ValueError, match=r"empty batch: image_features has N = 0 rows; expected N >= 1"):
        contrastive_loss(U, V, 10.0)


def test_zero_feature_dim():
    U, V = feats(d=0)
    with pytest.raises(ValueError, match=r"feature dimension d = 0; expected d >= 1"):
        contrastive_loss(U, V, 10.0)


def test_lowrank_target_size_mismatch():
    U, V = feats()
    with pytest.raises(ValueError, match=r"target has N = 7 but the batch has N = 6"):
        contrastive_loss(U, V, 10.0, lowrank(n=N + 1), kind="wbce")


def test_dense_target_size_mismatch():
    U, V = feats()
    with pytest.raises(ValueError, match=r"target must have shape \(6, 6\), got \(6, 7\)"):
        contrastive_loss(U, V, 10.0, torch.rand(N, N + 1), kind="bce")


def test_dense_target_dtype_mismatch():
    U, V = feats()
    with pytest.raises(ValueError, match=r"target has dtype torch.float64 but the features have dtype torch.float32"):
        contrastive_loss(U, V, 10.0, torch.rand(N, N, dtype=torch.float64), kind="bce")


def test_target_non_finite():
    U, V = feats()
    t = lowrank()
    t.left[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"target.left contains non-finite values"):
        contrastive_loss(U, V, 10.0, t, kind="infonce", validate=True)


def test_target_wrong_type():
    U, V = feats()
    with pytest.raises(ValueError, match=r"target must be None, a LowRankTarget or a dense \(N, N\) tensor, got list"):
        contrastive_loss(U, V, 10.0, [[1.0]])


def test_lowrank_factor_shapes():
    with pytest.raises(ValueError, match=r"LowRankTarget.right must have the shape of left \(6, 2\), got \(6, 3\)"):
        LowRankTarget(torch.ones(N), torch.zeros(N, 2), torch.zeros(N, 3))
    with pytest.raises(ValueError, match=r"LowRankTarget.left must have shape \(6, r\), got \(5, 2\)"):
        LowRankTarget(torch.ones(N), torch.zeros(N - 1, 2), torch.zeros(N - 1, 2))


@pytest.mark.parametrize("scale, pattern", [
    (math.nan, r"logit_scale must be finite, got nan"),
    (math.inf, r"logit_scale must be finite, got inf"),
    (torch.ones(2), r"logit_scale must be a scalar \(float or 0-dim tensor\), got shape \(2,\)"),
    ("10", r"logit_scale must be a float or a 0-dim tensor, got str"),
    (True, r"logit_scale must be a float or a 0-dim tensor, got bool"),
], ids=["nan", "inf", "vector", "str", "bool"])
def test_bad_logit_scale(scale, pattern):
    U, V = feats()
    with pytest.raises(ValueError, match=pattern):
        contrastive_loss(U, V, scale)


def test_logit_scale_on_other_device():
    U, V = feats()
    with pytest.raises(ValueError, match=r"logit_scale is on meta but the features are on cpu"):
        contrastive_loss(U, V, torch.tensor(10.0, device="meta"))


def test_bad_logit_bias():
    U, V = feats()
    with pytest.raises(ValueError, match=r"logit_bias must be finite, got nan"):
        contrastive_loss(U, V, 10.0, logit_bias=math.nan, kind="siglip")


@pytest.mark.parametrize("chunk", [0, -3])
def test_bad_chunk_size(chunk):
    U, V = feats()
    with pytest.raises(ValueError, match=rf"chunk must be a positive int, got {chunk}"):
        contrastive_loss(U, V, 10.0, backend="streaming", chunk_size=chunk)


def test_streaming_unknown_pairwise_kind():
    U, V = feats()
    s = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"unknown pairwise kind 'hinge'; expected bce, wbce, mse or softplus"):
        StreamingPrimitives(4).pairsum("hinge", U, V, s, None, None)


def test_select_out_of_range():
    t = lowrank()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\), got range \[0, 6\]"):
        t.select([0, 6])
    with pytest.raises(ValueError, match=r"indices must be integers, got dtype torch.float32"):
        FullSimilarity(N).target(torch.tensor([0.0, 1.0]))


def test_similarity_bad_sizes():
    with pytest.raises(ValueError, match=r"FullSimilarity n must be a positive int, got 0"):
        FullSimilarity(0)
    with pytest.raises(ValueError, match=r"LowRankSimilarity n must be a positive int, got -1"):
        LowRankSimilarity(-1, 2)


def test_valid_case_still_runs():
    """Sanity: the validation above is not rejecting good input (every kind, float32, CPU)."""
    for kind in ("infonce", "wbce", "siglip"):
        loss = LossCase(kind, "lowrank", N, dtype=torch.float32).loss("streaming")
        assert torch.isfinite(loss), f"{kind}: loss {loss}"


def test_a_triton_too_old_for_the_kernels_is_named(monkeypatch):
    """Triton <= 3.2 has no tl.range(flatten=): "auto" falls back to the chunked torch path, an explicit
    backend='triton' says which version it found and what it needs."""
    import triton
    import triton.language as tl

    from lors_fast.core import functional

    class OldRange:  # the signature of triton 3.0-3.2
        def __init__(self, arg1, arg2=None, step=None, num_stages=None, loop_unroll_factor=None):
            pass

    monkeypatch.setattr(tl, "range", OldRange)
    functional.triton_problem.cache_clear()
    try:
        assert not functional.triton_available()
        cuda = torch.device("cuda")
        assert functional.resolve_backend("auto", cuda, "infonce", torch.bfloat16) == "streaming"
        with pytest.raises(ValueError, match=rf"triton {triton.__version__} is too old.*triton >= 3\.3"):
            functional.resolve_backend("triton", cuda, "infonce", torch.bfloat16)
    finally:
        functional.triton_problem.cache_clear()
    monkeypatch.undo()
    assert functional.triton_available(), functional.triton_problem()
