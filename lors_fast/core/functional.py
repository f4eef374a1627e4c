"""The public loss: ``contrastive_loss`` — validation, then dispatch to a backend."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os

import torch

from lors_fast.core.compose import compose_loss
from lors_fast.core.kinds import KINDS, TRITON_KINDS, interpreting
from lors_fast.core.reference import reference_loss
from lors_fast.core.streaming import StreamingPrimitives
from lors_fast.core.targets import LowRankTarget

__all__ = ["contrastive_loss", "BACKENDS", "resolve_backend", "triton_available", "triton_problem",
           "validation_enabled", "amp_region", "amp_inputs"]

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


def validation_enabled(validate: bool | None = None) -> bool:
    """Whether the value checks (finiteness: a host read, i.e. a GPU stall per call) run: ``validate`` if
    given, else the environment variable ``LORS_FAST_VALIDATE`` (1/true/on/yes). Off by default, as open_clip
    (shape / dtype / device checks always run: they read no tensor values)."""
    if validate is None:
        return os.environ.get("LORS_FAST_VALIDATE", "").strip().lower() in ("1", "true", "on", "yes", "y")
    return bool(validate)


def _finite(t, validate: bool) -> bool:
    """Finiteness check of an input (a host sync), only in validation mode, never while torch.compile traces
    (a data-dependent branch would break the graph)."""
    if not validate or (getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()):
        return True
    return bool(torch.isfinite(t.detach()).all())


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: float64 stays, everything else (16-bit, fp32) is fp32."""
    return torch.float64 if dt == torch.float64 else torch.float32


def amp_region(device: torch.device):
    """The losses run with autocast off (they pick their own dtypes, :func:`amp_inputs`), as open_clip's
    fp32 loss under AMP."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def amp_inputs(U, V, target, which: str, autocast_on: bool):
    """The AMP contract: (U, V, target) in the compute dtype (fp32 for 16-bit inputs, differentiable casts)
    and the dtype the Triton primitives read (16-bit inputs, or fp32 features under autocast: the autocast
    dtype; None: the compute dtype). ``autocast_on``: autocast was enabled at the call."""
    prim = None
    if which == "triton" and U.dtype in (torch.bfloat16, torch.float16):
        prim = U.dtype
    elif which == "triton" and U.dtype == torch.float32 and autocast_on:
        prim = torch.get_autocast_dtype(U.device.type)
    c = _compute_dtype(U.dtype)
    if U.dtype != c:
        U, V = U.to(c), V.to(c)
        target = target.to(c) if target is not None else None
    return U, V, target, prim


def _check_scalar(name, x, like, validate=False):
    """The scalar as a 0-dim tensor in the compute dtype (python floats are always checked: no host read)."""
    dt = _compute_dtype(like.dtype)
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (float or 0-dim tensor), got shape {tuple(x.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
        if not _finite(x, validate):
            raise ValueError(f"{name} must be finite, got {x.item()}")
        return x.reshape(()).to(dt)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a float or a 0-dim tensor, got {type(x).__name__}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")
    return torch.tensor(float(x), dtype=dt, device=like.device)


def _check_tensor(name, t, like, shape, validate=False):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the features have dtype {like.dtype}")
    if not _finite(t, validate):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _validate(U, V, target, kind, validate=False):
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
        if not _finite(t, validate):
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
        _check_tensor("target.diag", target.diag, U, (n,), validate)
        _check_tensor("target.left", target.left, U, (n, r), validate)
        _check_tensor("target.right", target.right, U, (n, r), validate)
        if isinstance(target.scale, torch.Tensor):
            _check_scalar("target.scale", target.scale, U, validate)
        elif not math.isfinite(float(target.scale)):
            raise ValueError(f"target.scale must be finite, got {target.scale}")
        return
    if isinstance(target, torch.Tensor):
        _check_tensor("target", target, U, (n, n), validate)
        return
    raise ValueError(f"target must be None, a LowRankTarget or a dense (N, N) tensor, got {type(target).__name__}")


def contrastive_loss(image_features, text_features, logit_scale, target=None, *, kind="infonce",
                     logit_bias=None, backend="auto", kl_temperature: float = 10.0,
                     chunk_size: int | None = None, validate: bool | None = None) -> torch.Tensor:
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
        validate: also check that the tensors are finite (host reads; default: ``LORS_FAST_VALIDATE``).

    Mixed precision (as open_clip): the loss is computed with autocast off and returned in fp32 (float64
    for float64 inputs); 16-bit inputs are computed in fp32, except that the Triton kernels read them (or,
    under autocast, fp32 features cast to the autocast dtype) in 16-bit with fp32 accumulation.

    Returns a 0-dim tensor, differentiable twice in the features, logit_scale, logit_bias and the target.
    """
    check = validation_enabled(validate)
    _validate(image_features, text_features, target, kind, check)
    if kind == "kl" and not (isinstance(kl_temperature, numbers.Real) and not isinstance(kl_temperature, bool)
                             and math.isfinite(kl_temperature) and kl_temperature > 0):
        raise ValueError(f"kl_temperature must be a finite number > 0, got {kl_temperature!r}")
    U, V = image_features, text_features
    scale = _check_scalar("logit_scale", logit_scale, U, check)
    bias = None if logit_bias is None else _check_scalar("logit_bias", logit_bias, U, check)
    which = resolve_backend(backend, U.device, kind, U.dtype)
    amp = torch.amp.is_autocast_available(U.device.type) and torch.is_autocast_enabled(U.device.type)
    with amp_region(U.device):
        U, V, target, prim_dtype = amp_inputs(U, V, target, which, amp)
        if which == "reference":
            return reference_loss(U, V, scale, target, kind=kind, logit_bias=bias, kl_temperature=kl_temperature)
        streaming = StreamingPrimitives(chunk_size)
        if which == "streaming":
            return compose_loss(streaming, U, V, scale, target, kind, bias, kl_temperature=kl_temperature)
        from lors_fast.ops import TritonPrimitives

        return compose_loss(TritonPrimitives(), U, V, scale, target, kind, bias, kl_temperature=kl_temperature,
                            fallback=streaming, prim_dtype=prim_dtype)
