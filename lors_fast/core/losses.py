"""Drop-in open_clip losses computed by the lors_fast core: ``ClipLoss``, ``SigLipLoss``, ``ContrastiveLoss``.

``ClipLoss`` and ``SigLipLoss`` take the constructor arguments, forward signatures and return values of
open_clip 3.x's classes of the same names (the loss tensor, or ``{"contrastive_loss": loss}`` with
``output_dict=True``), plus keyword-only extras ``backend`` ("auto" | "reference" | "streaming" | "triton"),
``chunk_size`` (rows per chunk of the streaming backend) and ``validate`` (finiteness checks, host reads;
default ``LORS_FAST_VALIDATE``). Under autocast the loss is fp32, as open_clip's. No logit matrix is ever materialised
(except by ``backend="reference"`` and the compatibility helper ``get_logits``).

How each case maps onto the core (Z = s·U·Vᵀ + b; M local rows per rank, W = world_size, r = rank):

- square blocks with identity labels (W = 1, or W > 1 without ``local_loss``, over the gathered features):
  ``contrastive_loss(kind="infonce")`` for CLIP, ``contrastive_loss(kind="siglip")`` for SigLIP's own block;
- CLIP ``local_loss`` (local rows vs all W·M columns, labels r·M + i): the row log-sum-exp primitive on
  the rectangular block minus the label logit Z_{i, rM+i}, computed directly in O(M·d), for images vs all
  texts and texts vs all images;
- SigLIP's blocks against other ranks' texts (all labels −1): the ``pairsum("softplus")`` primitive / M.

Distributed communication follows open_clip: ``gather_features`` (all_gather; without
``gather_with_grad`` the local slice stays differentiable unless ``local_loss``; with it,
``torch.distributed.nn.all_gather``), and SigLIP's neighbour exchanges ("bidir", "shift") or collectives
("reduce", "gather") with gradients sent back along the same links.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from lors_fast.core.compose import CastPrimitives
from lors_fast.core.functional import (
    BACKENDS,
    _check_scalar,
    _validate,
    amp_inputs,
    amp_region,
    contrastive_loss,
    resolve_backend,
    validation_enabled,
)
from lors_fast.core.kinds import KINDS
from lors_fast.core.streaming import StreamingPrimitives

__all__ = ["ClipLoss", "SigLipLoss", "ContrastiveLoss", "gather_features", "block_primitives", "clip_block_loss",
           "siglip_negative_block"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


# ------------------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_common(errors: list, *, rank, world_size, backend, chunk_size, flags: dict):
    for name, value in flags.items():
        if not isinstance(value, bool):
            errors.append(f"{name} must be a bool, got {value!r}")
    if not _is_int(world_size) or world_size < 1:
        errors.append(f"world_size must be an int >= 1, got {world_size!r}")
    if not _is_int(rank) or rank < 0:
        errors.append(f"rank must be an int >= 0, got {rank!r}")
    elif _is_int(world_size) and world_size >= 1 and rank >= world_size:
        errors.append(f"rank must be < world_size = {world_size}, got rank = {rank}")
    if backend not in BACKENDS:
        errors.append(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        errors.append(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _raise(cls: str, errors: list):
    if errors:
        raise ValueError(f"invalid {cls} arguments: " + "; ".join(errors))


def _check_process_group(rank: int, world_size: int):
    """With world_size > 1 (and no horovod) the default process group must exist and agree."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size = {world_size} needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group), but none is initialised")
    if torch.distributed.get_world_size() != world_size or torch.distributed.get_rank() != rank:
        raise ValueError(f"the loss was built with rank = {rank}, world_size = {world_size} but the process group "
                         f"has rank {torch.distributed.get_rank()}, world size {torch.distributed.get_world_size()}")


def _scalars(U, logit_scale, logit_bias, validate=False):
    scale = _check_scalar("logit_scale", logit_scale, U, validate)
    bias = None if logit_bias is None else _check_scalar("logit_bias", logit_bias, U, validate)
    return scale, bias


def _amp_blocks(U, V, backend, kind, chunk_size):
    """(U, V, primitives) of the rectangular blocks under the AMP contract of ``contrastive_loss`` (call
    inside :func:`amp_region`)."""
    which = resolve_backend(backend, U.device, kind, U.dtype)
    amp = torch.amp.is_autocast_available(U.device.type) and torch.is_autocast_enabled(U.device.type)
    U, V, _, prim = amp_inputs(U, V, None, which, amp)
    prims = block_primitives(backend, U.device, kind, chunk_size, U.dtype)
    return U, V, (prims if prim is None else CastPrimitives(prims, prim))


# ------------------------------------------------------------------------------------- primitives
class _MaterialisedPrimitives:
    """The rectangular primitives written plainly on the full M×N logits (``backend="reference"``)."""

    name = "reference"

    @staticmethod
    def _z(U, V, scale, bias):
        Z = (U @ V.T) * scale
        return Z if bias is None else Z + bias

    def lse(self, U, V, scale, bias):
        Z = self._z(U, V, scale, bias)
        return torch.logsumexp(Z, 1), torch.logsumexp(Z, 0)

    def pairsum(self, kind, U, V, scale, bias, target, npos=None, nneg=None):
        if kind != "softplus" or target is not None:
            raise ValueError(f"the materialised block primitives only provide pairsum('softplus'), got {kind!r}")
        return (-F.logsigmoid(-self._z(U, V, scale, bias))).sum()


def block_primitives(backend: str, device: torch.device, kind: str, chunk_size: int | None = None,
                     dtype: torch.dtype | None = None):
    """The primitives that ``backend`` resolves to on ``device`` for ``dtype`` (for the rectangular blocks)."""
    which = resolve_backend(backend, device, kind, dtype)
    if which == "reference":
        return _MaterialisedPrimitives()
    if which == "streaming":
        return StreamingPrimitives(chunk_size)
    from lors_fast.ops import TritonPrimitives

    return TritonPrimitives()


def clip_block_loss(prims, U, V_all, offset: int, scale, bias=None):
    """Mean over i of the cross-entropy of row i of Z = s·U·V_allᵀ + b with label ``offset + i``:
    (1/M) Σ_i [LSE_j Z_ij − Z_{i, offset+i}] (no M×N tensor with streaming/triton primitives)."""
    m = U.shape[0]
    lse_row, _ = prims.lse(U, V_all, scale, bias)
    label_logit = scale * (U * V_all[offset:offset + m]).sum(1)
    if bias is not None:
        label_logit = label_logit + bias
    return (lse_row - label_logit).mean()


def siglip_negative_block(prims, U, V, scale, bias=None):
    """SigLIP loss of a block whose labels are all −1: (1/M) Σ_ij softplus(Z_ij)."""
    return prims.pairsum("softplus", U, V, scale, bias, None) / U.shape[0]


# ------------------------------------------------------------------------------------ communication
def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0,
                    world_size=1, use_horovod=False):
    """All ranks' features concatenated along dim 0, as open_clip gathers them (same arguments).

    Without ``gather_with_grad`` the gathered copies carry no gradient, except that the local rank's slice
    is the (differentiable) local tensor when ``local_loss`` is False."""
    if use_horovod:
        import horovod.torch as hvd

        if gather_with_grad:
            return hvd.allgather(image_features), hvd.allgather(text_features)
        with torch.no_grad():
            all_img, all_txt = hvd.allgather(image_features), hvd.allgather(text_features)
        img_parts, txt_parts = list(all_img.chunk(world_size)), list(all_txt.chunk(world_size))
    elif gather_with_grad:
        img = torch.distributed.nn.all_gather(image_features)
        txt = torch.distributed.nn.all_gather(text_features)
        return torch.cat(img), torch.cat(txt)
    else:
        img_parts = [torch.empty_like(image_features) for _ in range(world_size)]
        txt_parts = [torch.empty_like(text_features) for _ in range(world_size)]
        torch.distributed.all_gather(img_parts, image_features.detach())
        torch.distributed.all_gather(txt_parts, text_features.detach())
    if not local_loss:
        img_parts[rank], txt_parts[rank] = image_features, text_features
    return torch.cat(img_parts), torch.cat(txt_parts)


def _p2p(sends, recv_from):
    """Send each (tensor, dst) of ``sends`` and receive one tensor like ``sends[0][0]`` from each rank of
    ``recv_from`` (in that order); all operations are posted together."""
    dist = torch.distributed
    recvs = [torch.empty_like(sends[0][0]) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for t, dst in sends]
    ops += [dist.P2POp(dist.irecv, buf, src) for buf, src in zip(recvs, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recvs


class _Shift(torch.autograd.Function):
    """Send ``x`` to ``dst``, return what ``src`` sent; the gradient travels back dst → here → src."""

    @staticmethod
    def forward(ctx, src: int, dst: int, x):
        ctx.src, ctx.dst = src, dst
        return _p2p([(x.detach(), dst)], [src])[0]

    @staticmethod
    def backward(ctx, grad):
        return None, None, _Shift.apply(ctx.dst, ctx.src, grad)


class _SwapBoth(torch.autograd.Function):
    """Send ``to_left`` left and ``to_right`` right; return (from right, from left)."""

    @staticmethod
    def forward(ctx, left: int, right: int, to_left, to_right):
        ctx.left, ctx.right = left, right
        from_right, from_left = _p2p([(to_right.detach(), right), (to_left.detach(), left)], [right, left])
        return from_right, from_left

    @staticmethod
    def backward(ctx, g_from_right, g_from_left):
        # what we took from the right goes back right, what we took from the left goes back left; what
        # arrives from the left is the gradient of what we sent left, and likewise on the right
        g_to_left, g_to_right = _SwapBoth.apply(ctx.left, ctx.right, g_from_left, g_from_right)[::-1]
        return None, None, g_to_left, g_to_right


# ------------------------------------------------------------------------------------------- modules
class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (CLIP InfoNCE with hard labels), computed without the logit matrices.

    Args (as open_clip): local_loss, gather_with_grad, cache_labels (kept for compatibility: no labels are
    built), rank, world_size, use_horovod. Extras: ``backend``, ``chunk_size`` (see module docstring).
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend: str = "auto", chunk_size: int | None = None,
                 validate: bool | None = None):
        super().__init__()
        errors: list = []
        _check_common(errors, rank=rank, world_size=world_size, backend=backend, chunk_size=chunk_size,
                      flags={"local_loss": local_loss, "gather_with_grad": gather_with_grad,
                             "cache_labels": cache_labels, "use_horovod": use_horovod})
        if use_horovod is True:
            try:
                import horovod.torch  # noqa: F401
            except ImportError:
                errors.append("use_horovod=True needs horovod (horovod.torch is not importable)")
        _raise("ClipLoss", errors)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend, self.chunk_size, self.validate = backend, chunk_size, validate
        self.prev_num_logits = 0
        self.labels = {}

    def _gather(self, image_features, text_features):
        if not self.use_horovod:
            _check_process_group(self.rank, self.world_size)
        return gather_features(image_features, text_features, self.local_loss, self.gather_with_grad,
                               self.rank, self.world_size, self.use_horovod)

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """The hard labels open_clip would use (compatibility helper; the loss never builds them)."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """(logits_per_image, logits_per_text), materialised (compatibility helper, e.g. for logging)."""
        img_all, txt_all = image_features, text_features
        if self.world_size > 1:
            img_all, txt_all = self._gather(image_features, text_features)
        rows_i = image_features if (self.world_size > 1 and self.local_loss) else img_all
        rows_t = text_features if (self.world_size > 1 and self.local_loss) else txt_all
        per_image, per_text = logit_scale * rows_i @ txt_all.T, logit_scale * rows_t @ img_all.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """open_clip's ClipLoss interface: the symmetric InfoNCE loss of the features (a dict with
        ``contrastive_loss`` when ``output_dict``)."""
        check = validation_enabled(self.validate)
        _validate(image_features, text_features, None, "infonce", check)
        scale, bias = _scalars(image_features, logit_scale, logit_bias, check)
        kw = dict(kind="infonce", logit_bias=bias, backend=self.backend, chunk_size=self.chunk_size, validate=False)
        if self.world_size == 1:
            loss = contrastive_loss(image_features, text_features, scale, **kw)
        else:
            img_all, txt_all = self._gather(image_features, text_features)
            if self.local_loss:
                m = image_features.shape[0]
                with amp_region(image_features.device):
                    img, img_all, prims = _amp_blocks(image_features, img_all, self.backend, "infonce",
                                                      self.chunk_size)
                    txt, txt_all, _ = _amp_blocks(text_features, txt_all, self.backend, "infonce", self.chunk_size)
                    loss = 0.5 * (clip_block_loss(prims, img, txt_all, m * self.rank, scale, bias)
                                  + clip_block_loss(prims, txt, img_all, m * self.rank, scale, bias))
            else:
                loss = contrastive_loss(img_all, txt_all, scale, **kw)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (sigmoid loss, labels +1 on the diagonal, −1 elsewhere).

    Args (as open_clip): cache_labels (compatibility only), rank, world_size, dist_impl (None = "bidir",
    "shift", "reduce" or "gather": how other ranks' text features reach this rank). Extras: ``backend``,
    ``chunk_size``. The loss of this rank is (1/M)·Σ over its images and all ranks' texts.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, backend: str = "auto", chunk_size: int | None = None,
                 validate: bool | None = None):
        super().__init__()
        errors: list = []
        _check_common(errors, rank=rank, world_size=world_size, backend=backend, chunk_size=chunk_size,
                      flags={"cache_labels": cache_labels})
        if dist_impl is not None and dist_impl not in DIST_IMPLS:
            errors.append(f"dist_impl must be None or one of {DIST_IMPLS}, got {dist_impl!r}")
        _raise("SigLipLoss", errors)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        self.backend, self.chunk_size, self.validate = backend, chunk_size, validate
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """The ±1 label matrix open_clip would use (compatibility helper)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """The local logits, materialised (compatibility helper)."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def _remote_blocks(self, U, V, scale, bias):
        """Σ of the negative-only blocks of this rank's images against the other ranks' texts."""
        U, _, prims = _amp_blocks(U, U, self.backend, "siglip", self.chunk_size)
        cdt = U.dtype
        neg = lambda T: siglip_negative_block(prims, U, T.to(cdt), scale, bias)  # noqa: E731
        w, r = self.world_size, self.rank
        left, right = (r - 1) % w, (r + 1) % w
        total = 0.0
        if self.dist_impl == "bidir":
            to_left = to_right = V
            n_pairs, odd = divmod(w - 1, 2)
            for _ in range(n_pairs):
                from_right, from_left = _SwapBoth.apply(left, right, to_left, to_right)
                total = total + neg(from_right) + neg(from_left)
                to_left, to_right = from_right, from_left
            if odd:
                total = total + neg(_Shift.apply(left, right, to_right))
        elif self.dist_impl == "shift":
            to_right = V
            for _ in range(w - 1):
                to_right = _Shift.apply(left, right, to_right)
                total = total + neg(to_right)
        elif self.dist_impl == "reduce":
            for i in range(w):
                # every rank joins every all_reduce, forward and backward: keep this rank's own block in the
                # graph with weight 0 (as open_clip), so that the collectives' backward order matches
                other = torch.distributed.nn.all_reduce(V * (r == i), torch.distributed.ReduceOp.SUM)
                total = total + float(i != r) * neg(other)
        else:  # gather: one collective; this rank's own slice is simply skipped
            for i, T in enumerate(torch.distributed.nn.all_gather(V)):
                if i != r:
                    total = total + neg(T)
        return total

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        """open_clip's SigLipLoss interface: the sigmoid pair loss of the features (a dict with
        ``contrastive_loss`` when ``output_dict``)."""
        check = validation_enabled(self.validate)
        _validate(image_features, text_features, None, "siglip", check)
        scale, bias = _scalars(image_features, logit_scale, logit_bias, check)
        loss = contrastive_loss(image_features, text_features, scale, kind="siglip", logit_bias=bias,
                                backend=self.backend, chunk_size=self.chunk_size, validate=False)
        if self.world_size > 1:
            _check_process_group(self.rank, self.world_size)
            with amp_region(image_features.device):
                loss = loss + self._remote_blocks(image_features, text_features, scale, bias)
        return {"contrastive_loss": loss} if output_dict else loss


class ContrastiveLoss(nn.Module):
    """Module form of :func:`lors_fast.contrastive_loss` (soft targets: identity, low-rank or dense S).

    Args:
        kind: one of :data:`lors_fast.core.kinds.KINDS`.
        backend: "auto" | "reference" | "streaming" | "triton".
        kl_temperature: τ of the "kl" kind (finite, > 0).
        chunk_size: rows per chunk of the streaming backend (None: automatic).
        validate: finiteness checks (host reads); None: ``LORS_FAST_VALIDATE``.
    """

    def __init__(self, kind: str = "infonce", backend: str = "auto", kl_temperature: float = 10.0, *,
                 chunk_size: int | None = None, validate: bool | None = None):
        super().__init__()
        errors: list = []
        if kind not in KINDS:
            errors.append(f"kind must be one of {KINDS}, got {kind!r}")
        if backend not in BACKENDS:
            errors.append(f"backend must be one of {BACKENDS}, got {backend!r}")
        if (isinstance(kl_temperature, bool) or not isinstance(kl_temperature, numbers.Real)
                or not math.isfinite(float(kl_temperature)) or kl_temperature <= 0):
            errors.append(f"kl_temperature must be a finite number > 0, got {kl_temperature!r}")
        if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
            errors.append(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        _raise("ContrastiveLoss", errors)
        self.kind, self.backend, self.kl_temperature = kind, backend, float(kl_temperature)
        self.chunk_size, self.validate = chunk_size, validate

    def forward(self, image_features, text_features, logit_scale, target=None, logit_bias=None):
        """``contrastive_loss`` of the features with this module's kind and backend against ``target``
        (identity when None)."""
        return contrastive_loss(image_features, text_features, logit_scale, target, kind=self.kind,
                                logit_bias=logit_bias, backend=self.backend, kl_temperature=self.kl_temperature,
                                chunk_size=self.chunk_size, validate=self.validate)

    def extra_repr(self) -> str:
        """``kind``, ``backend`` and ``kl_temperature`` for the module's repr."""
        return f"kind={self.kind!r}, backend={self.backend!r}, kl_temperature={self.kl_temperature}"
