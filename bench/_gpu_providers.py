"""The outside providers of bench/gpu_check.py (open_clip ClipLoss, Inf-CL) behind lors_fast.contrastive_loss's
call signature, and whether they can run here."""

from __future__ import annotations

import torch

_OTHER_PROVIDERS = ("openclip", "infcl")
_OTHER_FNS: dict = {}
OTHER_NOTES = {
    "openclip": "open_clip.loss.ClipLoss (world_size 1): ½(CE(s·U·Vᵀ) + CE(s·V·Uᵀ)), two N×N logits in the "
                "input dtype — the same quantity as ours (infonce, identity target)",
    "infcl": "Inf-CL inf_cl.cal_flash_loss (single-GPU entry; one direction per call, unreduced): "
             "½[mean cal_flash_loss(U, V, scale=s) + mean cal_flash_loss(V, U, scale=s)] — the same quantity as "
             "ours; inputs cast to fp32 inside, TF32 dots (a bf16 row = bf16 inputs, fp32/TF32 compute)",
}


def _fits_materialised(N, dtype):
    """The grid's rule for materialised providers: ~8 N×N matrices in the input dtype under ~100 GiB."""
    return 8 * N * N * (2 if dtype in (torch.bfloat16, torch.float16) else 4) < 100 * 2**30


def _infcl_head_dim(d):
    """Inf-CL splits d into heads of head_dim (default 256); it must divide d and be a power of two ≥ 16."""
    for hd in (256, 128, 64, 32, 16):
        if d % hd == 0:
            return hd
    raise ValueError(f"Inf-CL needs d divisible by a power of two in [16, 256]; d = {d}")


def _load_clip_loss():
    from _providers import load_clip_loss  # bench/ is on sys.path when this script runs

    return load_clip_loss()


def other_loss_fn(provider, meta):
    """A loss function with lors_fast.contrastive_loss's call signature for an outside provider (infonce, identity
    target, no bias only)."""
    if provider not in _OTHER_FNS:
        if provider == "openclip":
            ClipLoss, src = _load_clip_loss()
            crit = ClipLoss()

            def f(img, txt, scale, tgt=None, kind="infonce", logit_bias=None, backend=None):
                _only_clip(provider, kind, tgt, logit_bias)
                return crit(img, txt, scale)
        elif provider == "infcl":
            import inf_cl

            src = f"inf_cl {_dist_version('inf-cl')}"

            def f(img, txt, scale, tgt=None, kind="infonce", logit_bias=None, backend=None):
                _only_clip(provider, kind, tgt, logit_bias)
                hd = _infcl_head_dim(img.shape[1])
                return 0.5 * (inf_cl.cal_flash_loss(img, txt, scale=scale, head_dim=hd).mean()
                              + inf_cl.cal_flash_loss(txt, img, scale=scale, head_dim=hd).mean())
        else:
            raise ValueError(provider)
        meta[f"{provider}_source"] = src
        _OTHER_FNS[provider] = f
    return _OTHER_FNS[provider]


def _only_clip(provider, kind, tgt, bias):
    if kind != "infonce" or tgt is not None or bias is not None:
        raise NotImplementedError(f"{provider} computes the hard-label CLIP loss only (infonce, identity target, "
                                  "no bias)")


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def provider_unavailable(provider, dev):
    """None when the provider can run here, else the reason (logged and recorded as a skip)."""
    try:
        if provider == "openclip":
            _load_clip_loss()
        else:
            import inf_cl  # noqa: F401
    except Exception as e:
        return (f"not importable ({type(e).__name__}: {str(e)[:120]}); offline install: see the docstring "
                "(bench/wheels from bench/fetch_wheels.sh)")
    if provider == "infcl" and dev != "cuda":
        return ("CUDA only: its _flash_prob_forward/backward assert q.is_cuda and the backward kernels use PTX "
                "inline asm (cvt.rna.tf32.f32), which the Triton CPU interpreter cannot run")
    return None


