"""The public loss: ``contrastive_loss`` — validation, then dispatch to a backend."""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch

from lors_fast.core.compose import compose_loss
from lors_fast.core.kinds import KINDS, TRITON_KINDS, interpreting
from lors_fast.core.reference import reference_loss
from lors_fast.core.streaming import StreamingPrimitives
from lors_fast.core.targets import LowRankTarget

__all__ = ["contrastive_loss", "BACKENDS", "resolve_backend", "triton_available", "triton_problem"]

BACKENDS = ("auto", "reference", "streaming", "triton")


def triton_available() -> bool:
    """Whether the fused Triton kernels can run here (see :func:`triton_problem`)."""
    return triton_problem() is None


@functools.cache
def triton_problem() -> str | None:
    """Why the fused kernels cannot run here (no triton, or one older than the kernels need), or None."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"the triton package is not importable here ({type(e).__name__}: {e})"
    if "flatten" not in inspect.signature(tl.range.__init__).parameters:
        return (f"triton {triton.__version__} is too old: the fused kernels need triton >= 3.3 "
                "(tl.range(flatten=...)); upgrade it, or use backend='streaming'")
    return None


def resolve_backend(backend: str, device: torch.device, kind: str = "infonce",
                    dtype: torch.dtype | None = None) -> str:
    """The backend that will run: "auto" is triton on CUDA (for the kinds it fuses, in fp32/bf16/fp16),
    streaming otherwise. float64 never goes to the compiled kernels: it is the exact-arithmetic mode (tests,
    oracles), which the chunked torch path serves; fp64 ``tl.dot`` is only exercised in the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_available() and kind in TRITON_KINDS and dtype != torch.float64:
            return "triton"
        return "streaming"
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"backend='triton' cannot run: {triton_problem()}")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU in the interpreter, or use backend='streaming'")
        if device.type == "cuda" and dtype == torch.float64:
            raise ValueError(
                "backend='triton' runs float16/bfloat16/float32 on CUDA, got float64 (fp64 kernels are for the "
                "CPU interpreter only); use backend='streaming' (or 'auto') for exact float64 on the GPU")
    return backend


def _finite(t) -> bool:
    """Finiteness check of an input (a host sync). Skipped while torch.compile traces: a data-dependent branch
    would break the graph; compiled code trades this early error for the speed it asked for."""
    if getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling():
        return True
    return bool(torch.isfinite(t.detach()).all())


def _check_scalar(name, x, like):
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (float or 0-dim tensor), got shape {tuple(x.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
        if not _finite(x):
            raise ValueError(f"{name} must be finite, got {x.item()}")
        return x.reshape(()).to(like.dtype)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a float or a 0-dim tensor, got {type(x).__name__}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _check_tensor(name, t, like, shape):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the features have dtype {like.dtype}")
    if not _finite(t):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _validate(U, V, target, kind):
    for name, t in (("image_features", U), ("text_features", V)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
    if U.shape != V.shape:
        raise ValueError(
            f"image_features {tuple(U.shape)} and text_features {tuple(V.shape)} must have the same shape (N, d)")
    if U.shape[0] == 0:
        raise ValueError("empty batch: image_features has N = 0 rows; expected N >= 1")
    if U.shape[1] == 0:
        raise ValueError("image_features has feature dimension d = 0; expected d >= 1")
    if U.dtype != V.dtype:
        raise ValueError(f"image_features dtype {U.dtype} differs from text_features dtype {V.dtype}")
    if U.device != V.device:
        raise ValueError(f"image_features on {U.device} but text_features on {V.device}")
    for name, t in (("image_features", U), ("text_features", V)):
        if not _finite(t):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    n = U.shape[0]
    if target is None:
        return
    if isinstance(target, LowRankTarget):
        if target.n != n:
            raise ValueError(f"target has N = {target.n} but the batch has N = {n}")
        r = target.rank
        _check_tensor("target.diag", target.diag, U, (n,))
        _check_tensor("target.left", target.left, U, (n, r))
        _check_tensor("target.right", target.right, U, (n, r))
        if isinstance(target.scale, torch.Tensor):
            _check_scalar("target.scale", target.scale, U)
        elif not math.isfinite(float(target.scale)):
            raise ValueError(f"target.scale must be finite, got {target.scale}")
        return
    if isinstance(target, torch.Tensor):
        _check_tensor("target", target, U, (n, n))
        return
    raise ValueError(f"target must be None, a LowRankTarget or a dense (N, N) tensor, got {type(target).__name__}")


def contrastive_loss(image_features, text_features, logit_scale, target=None, *, kind="infonce",
                     logit_bias=None, backend="auto", kl_temperature: float = 10.0,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Contrastive loss of Z = logit_scale·U·Vᵀ (+ logit_bias) against the target S.

    Args:
        image_features, text_features: (N, d) tensors, used as given (callers L2-normalise).
        logit_scale: the multiplier (open_clip convention: already exponentiated), float or 0-dim tensor.
        target: None (identity: hard CLIP labels), a :class:`LowRankTarget`, or a dense (N, N) tensor.
        kind: one of :data:`lors_fast.core.kinds.KINDS` (reference semantics:
            :mod:`lors_fast.core.reference`).
        logit_bias: optional additive bias, float or 0-dim tensor.
        backend: "auto" (triton on CUDA, streaming otherwise), "reference", "streaming" or "triton".
        kl_temperature: τ of the "kl" kind's target softmax(τ·S) (the reference's hidden factor 10).
        chunk_size: rows per chunk of the streaming backend (default: about 2M elements per tile).

    Returns a 0-dim tensor, differentiable twice in the features, logit_scale, logit_bias and the target.
    """
    _validate(image_features, text_features, target, kind)
    if kind == "kl" and not (isinstance(kl_temperature, numbers.Real) and not isinstance(kl_temperature, bool)
                             and math.isfinite(kl_temperature) and kl_temperature > 0):
        raise ValueError(f"kl_temperature must be a finite number > 0, got {kl_temperature!r}")
    U, V = image_features, text_features
    scale = _check_scalar("logit_scale", logit_scale, U)
    bias = None if logit_bias is None else _check_scalar("logit_bias", logit_bias, U)
    which = resolve_backend(backend, U.device, kind, U.dtype)
    if which == "reference":
        return reference_loss(U, V, scale, target, kind=kind, logit_bias=bias, kl_temperature=kl_temperature)
    streaming = StreamingPrimitives(chunk_size)
    if which == "streaming":
        return compose_loss(streaming, U, V, scale, target, kind, bias, kl_temperature=kl_temperature)
    from lors_fast.ops import TritonPrimitives

    return compose_loss(TritonPrimitives(), U, V, scale, target, kind, bias, kl_temperature=kl_temperature,
                        fallback=streaming)
