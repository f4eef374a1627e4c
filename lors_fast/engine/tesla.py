"""The gradient maths of one distillation iteration: TESLA (O(P) memory), exact MTT, and the reference.

One iteration unrolls the student K steps from an expert snapshot θ₀ on minibatches of the synthetic set
(images X, text embeddings Y, similarity S) and matches θ_K to the expert's later snapshot θ* (docs/LORS_NOTES.md
§1.2–1.3). Per branch b ∈ {img, txt}: θ_{i+1} = θ_i − η_b·g_i, G = Σ g_i, D = ‖θ₀ − θ*‖².

* :func:`tesla_iteration` — the TESLA gradient, c_b = η_b(θ*−θ₀) + η_b²·G_b (single + square term),
  ∂/∂(X, Y, S) of Σ_i 2·[c_I·g_I,i/D_I + c_T·g_T,i/D_T] (or merged: (Σ_b c_b·g_b,i)/(D_I+D_T)), the
  lr gradient −2·G·(θ₀ − ηG − θ*)/D, with only O(P) memory: pass 1 (plain first-order backward, no
  graph) accumulates G and stores nothing but the K minibatch indices and dropout seeds (the plan);
  pass 2 re-walks θ_i = θ_{i−1} − η·g_{i−1} from θ₀, re-deriving each g_i under the same seed, so
  dropout masks are the same in both passes (the reference's recomputation draws new ones).
  Second order uses only ``.backward(create_graph=True)`` on leaf tensors (DeepSpeed's non-reentrant
  checkpoint does not support ``torch.autograd.grad``), then clears ``.grad`` to break the cycle.
  With ``chunk``, pass 2 runs the image branch in micro-batches (activation memory O(chunk)).
* :func:`mtt_iteration` — exact MTT: full differentiable unroll (create_graph, η as tensors), including
  the Hessian cross terms TESLA drops. Memory O(K·P + K activations).
* :func:`reference_tesla_iteration` — the reference's structure (K+1 stored parameter vectors,
  ``autograd.grad(create_graph=True)`` in both passes): the test oracle and benchmark baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lors_fast.models import seeded

__all__ = [
    "CHECKPOINT_BACKENDS",
    "Plan",
    "Student",
    "SimSlicer",
    "IterationResult",
    "make_plan",
    "tesla_iteration",
    "mtt_iteration",
    "reference_tesla_iteration",
]

CHECKPOINT_BACKENDS = ("none", "torch", "deepspeed")

# loss_fn(image_features, text_features, target) -> scalar; target is None | LowRankTarget | dense block
LossFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


#: ``activation_checkpointing`` keys of a DeepSpeed JSON -> keyword of ``deepspeed.checkpointing.configure``
DEEPSPEED_AC_KEYS = {"partition_activations": "partition_activations",
                     "contiguous_memory_optimization": "contiguous_checkpointing",
                     "number_checkpoints": "num_checkpoints", "cpu_checkpointing": "checkpoint_in_cpu",
                     "synchronize_checkpoint_boundary": "synchronize", "profile": "profile"}


def deepspeed_ac_options(config) -> dict:
    """The ``configure`` keywords of a DeepSpeed config (a JSON file path or a dict): its
    ``activation_checkpointing`` section, every key checked (a one-line ValueError names a bad one)."""
    import json
    from pathlib import Path

    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"deepspeed_config: file not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed_config must be a JSON object, got {type(config).__name__}")
    sec = config.get("activation_checkpointing", {})
    if not isinstance(sec, dict):
        raise ValueError(f"deepspeed_config: activation_checkpointing must be an object, got {sec!r}")
    unknown = sorted(set(sec) - set(DEEPSPEED_AC_KEYS))
    if unknown:
        raise ValueError(f"deepspeed_config: unknown activation_checkpointing keys {unknown}; "
                         f"expected some of {sorted(DEEPSPEED_AC_KEYS)}")
    out = {}
    for k, v in sec.items():
        ok = v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 1 if k == "number_checkpoints" \
            else isinstance(v, bool)
        if not ok:
            want = "a positive int or null" if k == "number_checkpoints" else "true or false"
            raise ValueError(f"deepspeed_config: activation_checkpointing.{k} must be {want}, got {v!r}")
        out[DEEPSPEED_AC_KEYS[k]] = v
    if out.get("partition_activations"):
        raise ValueError("deepspeed_config: activation_checkpointing.partition_activations needs model "
                         "parallelism (an mpu), which distillation has none of; set it to false")
    if out.get("contiguous_checkpointing"):
        raise ValueError("deepspeed_config: activation_checkpointing.contiguous_memory_optimization needs "
                         "partition_activations (model parallelism); set it to false")
    return out


def _deepspeed_checkpoint(config=None):
    """DeepSpeed's non-reentrant checkpoint, configured by ``configure(None, **options)`` from ``config``'s
    ``activation_checkpointing`` section (always called, so no setting of an earlier Student lingers)."""
    import os

    opts = deepspeed_ac_options(config) if config is not None else {}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ValueError(
            "checkpoint='deepspeed' needs the deepspeed package (pip install deepspeed); "
            "use checkpoint='torch' or 'none' instead"
        ) from e
    _configure_deepspeed(opts)
    return deepspeed.checkpointing.non_reentrant_checkpoint


def _configure_deepspeed(opts: dict) -> None:
    """``deepspeed.checkpointing.configure(None, **opts)``. Its only use of deepspeed.comm is to log on
    rank 0; when deepspeed.comm is not initialised (one process, no launcher) ``get_rank`` answers this
    process' rank for the duration of the call (restored after it), instead of creating a process group."""
    import deepspeed.comm as dscomm
    from deepspeed.runtime.activation_checkpointing import checkpointing as ac

    if dscomm.is_initialized():
        ac.configure(None, **opts)
        return
    from lors_fast.engine.dist import rank_world

    saved = ac.dist.get_rank
    ac.dist.get_rank = lambda *a, **k: rank_world()[0]
    try:
        ac.configure(None, **opts)
    finally:
        ac.dist.get_rank = saved


@dataclass
class Student:
    """The two student branches as flat-parameter callables ``model(flat, x)`` plus the logit scale.

    ``checkpoint`` selects activation checkpointing of each branch forward: "none", "torch"
    (``torch.utils.checkpoint``, non-reentrant) or "deepspeed" (``non_reentrant_checkpoint``, configured
    from ``deepspeed_config``'s ``activation_checkpointing`` section: a JSON path or a dict).
    """

    img: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    txt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    logit_scale: float  # multiplier 1/T
    checkpoint: str = "none"
    deepspeed_config: object = None
    _ckpt: Callable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINT_BACKENDS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_BACKENDS}, got {self.checkpoint!r}")
        if self.checkpoint == "deepspeed":
            self._ckpt = _deepspeed_checkpoint(self.deepspeed_config)
        elif self.deepspeed_config is not None:
            raise ValueError(f"deepspeed_config applies to checkpoint='deepspeed' only, got {self.checkpoint!r}")
        elif self.checkpoint == "torch":
            from torch.utils.checkpoint import checkpoint

            self._ckpt = lambda fn, *a: checkpoint(fn, *a, use_reentrant=False)

    def branch(self, which: str, th, x, *, checkpointed: bool = True):
        """Raw (un-normalised) output of one branch ("img" or "txt")."""
        fn = self.img if which == "img" else self.txt
        return self._ckpt(fn, th, x) if checkpointed and self._ckpt is not None else fn(th, x)

    def features(self, th_img, th_txt, x, y, *, checkpointed: bool = True):
        """L2-normalised (image, text) features; each branch forward checkpointed if enabled."""
        if checkpointed and self._ckpt is not None:
            f, h = self._ckpt(self.img, th_img, x), self._ckpt(self.txt, th_txt, y)
        else:
            f, h = self.img(th_img, x), self.txt(th_txt, y)
        return F.normalize(f, dim=-1), F.normalize(h, dim=-1)


class SimSlicer:
    """How the similarity parameters enter one minibatch: detached leaf slices, target, scatter-back.

    ``sim`` is None (identity target: the TESLA-VL / MTT-VL baselines), a module with ``diag``, ``left``,
    ``right`` and ``scale`` (low-rank, S = diag(a) + c·L·Rᵀ) or a module with ``full`` (dense S).
    """

    def __init__(self, sim: nn.Module | None):
        self.sim = sim
        if sim is None:
            self.kind, self.params = "none", []
        elif hasattr(sim, "full"):
            self.kind, self.params = "full", [sim.full]
        elif all(hasattr(sim, a) for a in ("diag", "left", "right")):
            self.kind, self.params = "lowrank", [sim.diag, sim.left, sim.right]
        else:
            raise ValueError(f"similarity module {type(sim).__name__} has neither `full` nor diag/left/right")

    def leaves(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Detached copies of the minibatch's parameter slices, requiring grad."""
        if self.kind == "full":
            return [self.params[0].detach()[idx[:, None], idx].requires_grad_()]
        return [p.detach()[idx].requires_grad_() for p in self.params]

    def target(self, parts: Sequence[torch.Tensor]):
        """Target built from slices (as returned by :meth:`leaves`, or differentiable slices)."""
        if self.kind == "none":
            return None
        if self.kind == "full":
            return parts[0]
        from lors_fast.core.targets import LowRankTarget

        return LowRankTarget(parts[0], parts[1], parts[2], self.sim.scale)

    def detached_target(self, idx: torch.Tensor):
        """The target of minibatch ``idx`` built from detached factors (no gradient to S)."""
        if self.kind == "full":
            return self.target([self.params[0].detach()[idx[:, None], idx]])
        return self.target([p.detach()[idx] for p in self.params])

    def scatter(self, accs: list[torch.Tensor], idx: torch.Tensor, grads: Sequence[torch.Tensor | None]):
        """Accumulate the minibatch gradients ``grads`` of the factors into the full-size ``accs`` at ``idx``."""
        for acc, g in zip(accs, grads):
            if g is None:
                continue
            if self.kind == "full":
                acc.index_put_((idx[:, None], idx), g, accumulate=True)
            else:
                acc.index_add_(0, idx, g)


@dataclass
class Plan:
    """What pass 2 needs to replay pass 1: per-step minibatch indices and dropout seeds."""

    batches: list[torch.Tensor]
    seeds: list[int]


def make_plan(n: int, batch: int, steps: int, generator: torch.Generator, device="cpu") -> Plan:
    """Reference sampling (docs/LORS_NOTES.md §1.2 step 5): consecutive B-slices of a permutation of range(n);
    a fresh permutation when fewer than B indices remain (the leftovers are skipped)."""
    if not 1 <= batch <= n:
        raise ValueError(f"mini_batch must be in [1, n_pairs={n}], got {batch}")
    batches, seeds, perm, pos = [], [], None, n
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        batches.append(perm[pos : pos + batch].to(device))
        pos += batch
        seeds.append(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return Plan(batches, seeds)


@dataclass
class IterationResult:
    """Gradients of one iteration (same shapes as the synthetic tensors) and its diagnostics."""

    grad_images: torch.Tensor
    grad_texts: torch.Tensor
    grad_sim: list[torch.Tensor]
    grad_lr_img: torch.Tensor
    grad_lr_txt: torch.Tensor
    loss_img: float  # ‖θ₀ − η G − θ*‖²/D (image branch)
    loss_txt: float
    student_loss: float  # mean inner contrastive loss over the K steps (pass 1)
    # max |θ_K(pass 2) − θ_K(pass 1)|: 0 when the replay is bitwise; a few ulps with norm layers, whose
    # PyTorch backward uses another (double-differentiable) formula under create_graph
    drift: float = 0.0

    @property
    def loss(self) -> float:
        """The matching loss: ``loss_img + loss_txt``."""
        return self.loss_img + self.loss_txt


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"non-finite {what}: {value.detach().flatten()[:4].tolist()}")


def _match_terms(start, target, G, eta):
    """(c_b, D_b, loss_b, dloss_b/dη_b) per branch, with η as floats and G constant (docs/LORS_NOTES.md §1.2)."""
    out = []
    for th0, ths, g, e in zip(start, target, G, eta):
        D = torch.sum((th0 - ths) ** 2)
        c = e * (ths - th0) + (e * e) * g
        resid = th0 - e * g - ths
        out.append((c, D, torch.sum(resid**2) / D, -2.0 * torch.dot(g, resid) / D))
    return out


def tesla_iteration(student: Student, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor,
                    sim: SimSlicer, lr_img: torch.Tensor, lr_txt: torch.Tensor,
                    start: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                    plan: Plan, *, merge_branches: bool = False, chunk: int | None = None) -> IterationResult:
    """TESLA gradients of the trajectory-matching loss, memory O(P) whatever K (see module docstring).

    ``chunk``: if set, pass 2 runs the image branch in micro-batches of ``chunk`` samples
    (:func:`_step2_chunked`), so activation memory is O(chunk) instead of O(B), at ~20 % more time.
    Needs a per-sample image encoder without randomness (ConvNet/GroupNorm, NF-nets, ViTs: yes;
    BatchNorm or image-side dropout: no).
    """
    eta = (float(lr_img.detach()), float(lr_txt.detach()))
    device = images.device
    x_all, y_all = images.detach(), texts.detach()
    th = [start[0].detach(), start[1].detach()]
    G = [torch.zeros_like(th[0]), torch.zeros_like(th[1])]
    losses = []
    # ---- pass 1: first-order only, nothing kept but G and θ_K
    for idx, seed in zip(plan.batches, plan.seeds):
        ti, tt = th[0].requires_grad_(), th[1].requires_grad_()
        with seeded(seed, device):
            f, h = student.features(ti, tt, x_all[idx], y_all[idx], checkpointed=False)
            loss = loss_fn(f, h, sim.detached_target(idx))
            _check_finite(loss.detach(), "student loss in pass 1")
            gi, gt = torch.autograd.grad(loss, [ti, tt])
        losses.append(float(loss.detach()))
        th = [ti.detach().add(gi, alpha=-eta[0]), tt.detach().add(gt, alpha=-eta[1])]
        G[0].add_(gi)
        G[1].add_(gt)
    theta_k = th
    terms = _match_terms(start, target, G, eta)
    (c_i, d_i, l_i, dlr_i), (c_t, d_t, l_t, dlr_t) = terms
    for name, v in (("image-branch matching loss", l_i), ("text-branch matching loss", l_t)):
        _check_finite(v, name)
    # ---- pass 2: replay θ_i from θ₀, differentiate 2·c·g_i/D w.r.t. this step's data and S slices
    acc_x, acc_y = torch.zeros_like(x_all), torch.zeros_like(y_all)
    acc_s = [torch.zeros_like(p) for p in sim.params]
    ds = student.checkpoint == "deepspeed"  # DeepSpeed: no `inputs=` (nor autograd.grad) allowed
    th = [start[0].detach(), start[1].detach()]
    for idx, seed in zip(plan.batches, plan.seeds):
        if chunk is not None:
            w = (1.0 / (d_i + d_t),) * 2 if merge_branches else (1.0 / d_i, 1.0 / d_t)
            gi, gt = _step2_chunked(student, loss_fn, sim, th, (c_i, c_t), w, x_all, y_all, idx, seed, chunk,
                                    acc_x, acc_y, acc_s)
            th = [th[0].detach().add(gi, alpha=-eta[0]), th[1].detach().add(gt, alpha=-eta[1])]
            continue
        ti, tt = th[0].requires_grad_(), th[1].requires_grad_()
        xi = x_all[idx].requires_grad_()
        yi = y_all[idx].requires_grad_()
        sl = sim.leaves(idx)
        data = [xi, yi, *sl]
        with seeded(seed, device):
            f, h = student.features(ti, tt, xi, yi)
            loss = loss_fn(f, h, sim.target(sl))
            _backward_create_graph(loss, None if ds else [ti, tt])
            gi, gt = ti.grad, tt.grad
            ti.grad = tt.grad = None
            for leaf in data:
                leaf.grad = None
            if merge_branches:
                J = (torch.dot(c_i, gi) + torch.dot(c_t, gt)) / (d_i + d_t)
            else:
                J = torch.dot(c_i, gi) / d_i + torch.dot(c_t, gt) / d_t
            (2.0 * J).backward(inputs=None if ds else data)
        acc_x.index_add_(0, idx, xi.grad)
        acc_y.index_add_(0, idx, yi.grad)
        sim.scatter(acc_s, idx, [leaf.grad for leaf in sl])
        th = [ti.detach().add(gi.detach(), alpha=-eta[0]), tt.detach().add(gt.detach(), alpha=-eta[1])]
        for leaf in (ti, tt, *data):  # break the .grad <-> graph reference cycle
            leaf.grad = None
        del gi, gt, J, loss, f, h
    drift = max(float((a - b).abs().max()) for a, b in zip(th, theta_k))
    return IterationResult(acc_x, acc_y, acc_s, dlr_i.detach().reshape(()).to(lr_img.dtype),
                           dlr_t.detach().reshape(()).to(lr_txt.dtype), float(l_i), float(l_t),
                           sum(losses) / len(losses), drift)


def _backward_create_graph(t: torch.Tensor, inputs) -> None:
    """``t.backward(create_graph=True, inputs=inputs)`` without torch's warning about the parameter <-> grad
    reference cycle: every caller here resets the grads to None right after use, which breaks that cycle.
    The filter is scoped to this call (no process-wide warning state is changed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True", category=UserWarning)
        t.backward(create_graph=True, inputs=inputs)


def _step2_chunked(student: Student, loss_fn: LossFn, sim: SimSlicer, th, c, w, x_all, y_all, idx, seed, chunk,
                   acc_x, acc_y, acc_s):
    """Pass-2 step with the image branch in micro-batches (memory O(chunk) activations).

    With raw features F = f(θ, X) (per-sample), u = ∂ℓ/∂F, t = (∂F/∂θ)·c (forward mode):
    c·g = ⟨u, t⟩, so J = ⟨u, t⟩/D_I + ⟨v, t_H⟩/D_T, and
    ∂(2J)/∂X_b = ∂/∂X_b[2·c·(∂F_b/∂θ)ᵀu_b/D_I] (network-only second order, per chunk, u constant)
               + (∂F_b/∂X_b)ᵀ w_b,  w = ∂(2J)/∂F|_t (the loss' own Hessian-vector product, B×d);
    ∂(2J)/∂S comes from the loss part alone. Returns (g_I, g_T) for the θ update.
    """
    from torch.func import jvp

    device = x_all.device
    ds = student.checkpoint == "deepspeed"
    x, y = x_all[idx], y_all[idx]
    B = x.shape[0]
    spans = [(s, min(s + chunk, B)) for s in range(0, B, chunk)]
    with torch.no_grad():  # primal features and tangents t = J·c, chunk by chunk, no graph
        parts = [jvp(lambda p, xc=x[a:b]: student.img(p, xc), (th[0],), (c[0],)) for a, b in spans]
        f0, tf = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with seeded(seed, device):
            h0, th_ = jvp(lambda p: student.txt(p, y), (th[1],), (c[1],))
    fl, hl = f0.requires_grad_(), h0.requires_grad_()
    sl = sim.leaves(idx)
    loss = loss_fn(F.normalize(fl, dim=-1), F.normalize(hl, dim=-1), sim.target(sl))
    _check_finite(loss.detach(), "student loss in pass 2")
    u, v = torch.autograd.grad(loss, [fl, hl], create_graph=True)
    J = w[0] * torch.sum(u * tf) + w[1] * torch.sum(v * th_)
    got = torch.autograd.grad(2.0 * J, [fl, hl, *sl], allow_unused=True)
    wf, wh = got[0].detach(), got[1].detach()
    sim.scatter(acc_s, idx, got[2:])
    u, v = u.detach(), v.detach()
    g_i = torch.zeros_like(th[0])
    for a, b in spans:
        g_i += _mixed_vjp(student, "img", th[0], x[a:b], u[a:b], wf[a:b], c[0], w[0], acc_x, idx[a:b], ds)
    with seeded(seed, device):
        g_t = _mixed_vjp(student, "txt", th[1], y, v, wh, c[1], w[1], acc_y, idx, ds)
    return g_i, g_t


def _mixed_vjp(student, which, theta, data, u, wgt, c, w, acc, idx, ds):
    """Accumulate ∂/∂data[2w·c·(∂F/∂θ)ᵀu + ⟨F, wgt⟩] into acc[idx]; return (∂F/∂θ)ᵀu (detached)."""
    tl = theta.detach().requires_grad_()
    dl = data.detach().requires_grad_()
    out = student.branch(which, tl, dl)
    _backward_create_graph(torch.sum(out * u), None if ds else [tl])
    g = tl.grad
    tl.grad = dl.grad = None
    (2.0 * w * torch.dot(c, g) + torch.sum(out * wgt)).backward(inputs=None if ds else [dl])
    acc.index_add_(0, idx, dl.grad)
    g = g.detach()
    tl.grad = dl.grad = None
    return g


def mtt_iteration(student: Student, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor,
                  sim: SimSlicer, lr_img: torch.Tensor, lr_txt: torch.Tensor,
                  start: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor],
                  plan: Plan, *, merge_branches: bool = False) -> IterationResult:
    """Exact MTT gradient: the full unroll is differentiated (cross terms and dG/dη included).

    ``images``, ``texts``, the similarity parameters and the lrs must be leaves requiring grad.
    Needs ``torch.autograd.grad`` through the checkpoints, so checkpoint='deepspeed' is refused.
    """
    if student.checkpoint == "deepspeed":
        raise ValueError("method='mtt' needs checkpoint 'none' or 'torch' (DeepSpeed's checkpoint has no autograd.grad)")
    device = images.device
    th = [start[0].detach().clone().requires_grad_(), start[1].detach().clone().requires_grad_()]
    losses = []
    for idx, seed in zip(plan.batches, plan.seeds):
        parts = [sim.params[0][idx[:, None], idx]] if sim.kind == "full" else [p[idx] for p in sim.params]
        with seeded(seed, device):
            f, h = student.features(th[0], th[1], images[idx], texts[idx])
            loss = loss_fn(f, h, sim.target(parts))
            _check_finite(loss.detach(), "student loss")
            gi, gt = torch.autograd.grad(loss, th, create_graph=True)
        losses.append(float(loss.detach()))
        th = [th[0] - lr_img * gi, th[1] - lr_txt * gt]
    num = [torch.sum((th[b] - target[b].detach()) ** 2) for b in range(2)]
    den = [torch.sum((start[b].detach() - target[b].detach()) ** 2) for b in range(2)]
    objective = (num[0] + num[1]) / (den[0] + den[1]) if merge_branches else num[0] / den[0] + num[1] / den[1]
    _check_finite(objective.detach(), "matching loss")
    wrt = [images, texts, *sim.params, lr_img, lr_txt]
    grads = torch.autograd.grad(objective, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    ns = len(sim.params)
    return IterationResult(grads[0], grads[1], list(grads[2 : 2 + ns]), grads[-2], grads[-1],
                           float(num[0].detach() / den[0]), float(num[1].detach() / den[1]), sum(losses) / len(losses))


def reference_tesla_iteration(student: Student, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor,
                              sim: SimSlicer, lr_img: torch.Tensor, lr_txt: torch.Tensor,
                              start: tuple[torch.Tensor, torch.Tensor],
                              target: tuple[torch.Tensor, torch.Tensor], plan: Plan, *,
                              merge_branches: bool = False, consistent_dropout: bool = True) -> IterationResult:
    """The reference algorithm's structure (oracle/baseline): stores θ_0..θ_K, ``autograd.grad`` with
    ``create_graph=True`` in both passes, per-step grads w.r.t. the full (X, Y, S) leaves.

    ``images``, ``texts`` and the similarity parameters must require grad. With
    ``consistent_dropout=False`` pass 2 draws fresh dropout masks, as the reference does.
    """
    device = images.device
    thetas = [[start[0].detach().clone()], [start[1].detach().clone()]]
    G = [torch.zeros_like(start[0]), torch.zeros_like(start[1])]
    eta = (lr_img.item(), lr_txt.item())
    losses = []

    def step_loss(i, th_i, th_t):
        idx = plan.batches[i]
        parts = [sim.params[0][idx[:, None], idx]] if sim.kind == "full" else [p[idx] for p in sim.params]
        f, h = student.features(th_i, th_t, images[idx], texts[idx])
        return loss_fn(f, h, sim.target(parts))

    for i, seed in enumerate(plan.seeds):
        th_i = thetas[0][-1].requires_grad_()
        th_t = thetas[1][-1].requires_grad_()
        with seeded(seed, device):
            loss = step_loss(i, th_i, th_t)
        losses.append(float(loss.detach()))
        gi = torch.autograd.grad(loss, th_i, create_graph=True, retain_graph=True)[0].detach()
        gt = torch.autograd.grad(loss, th_t, create_graph=True)[0].detach()
        thetas[0].append(th_i.detach() - eta[0] * gi)
        thetas[1].append(th_t.detach() - eta[1] * gt)
        G[0] = G[0] + gi
        G[1] = G[1] + gt
    D = [torch.nn.functional.mse_loss(start[b], target[b], reduction="sum") for b in range(2)]
    wrt = [images, texts, *sim.params]
    acc = [torch.zeros_like(w) for w in wrt]
    for i, seed in enumerate(plan.seeds):
        th_i = thetas[0][i].detach().requires_grad_()
        th_t = thetas[1][i].detach().requires_grad_()
        if consistent_dropout:
            with seeded(seed, device):
                loss = step_loss(i, th_i, th_t)
        else:
            loss = step_loss(i, th_i, th_t)
        single = [lr_img * (target[0] - start[0]), lr_txt * (target[1] - start[1])]
        square = [lr_img**2 * G[0], lr_txt**2 * G[1]]
        gi = torch.autograd.grad(loss, th_i, create_graph=True, retain_graph=True)[0]  # two calls, as
        gt = torch.autograd.grad(loss, th_t, create_graph=True)[0]  # the reference does
        r_i = torch.sum((single[0] + square[0]).detach() * gi)
        r_t = torch.sum((single[1] + square[1]).detach() * gt)
        J = (r_i + r_t) / (D[0] + D[1]) if merge_branches else r_i / D[0] + r_t / D[1]
        grads = torch.autograd.grad(2 * J, wrt, allow_unused=True)
        acc = [a if g is None else a + g for a, g in zip(acc, grads)]
    lr_grads, branch_losses = [], []
    for b, lr in enumerate((lr_img, lr_txt)):
        lr_leaf = lr.detach().clone().requires_grad_()
        lb = torch.sum((start[b] - lr_leaf * G[b] - target[b]) ** 2) / D[b]
        lr_grads.append(torch.autograd.grad(lb, lr_leaf)[0])
        branch_losses.append(float(lb))
    return IterationResult(acc[0], acc[1], acc[2:], lr_grads[0], lr_grads[1], branch_losses[0],
                           branch_losses[1], sum(losses) / len(losses))
