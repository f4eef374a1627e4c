"""`lors-fast distill`: LoRS trajectory matching with low-rank similarity mining (docs/LORS_NOTES.md §1–2).

:func:`run` takes a :class:`~lors_fast.engine.distill_config.DistillConfig` and returns a :class:`DistillResult`
(the final :class:`DistilledSet` and the per-iteration metrics). One iteration: pick the next expert
(experts are cycled in a shuffled order, reshuffled when exhausted) and a start epoch, draw the K-step
plan (minibatch indices + dropout seeds), compute the TESLA (or exact MTT) gradients of the matching
loss (:mod:`lors_fast.engine.tesla`), and take one SGD-with-momentum step on four groups (images, texts,
the two student lrs, the similarity factors), with optional per-group gradient-norm clipping and lr clamp.

Differences from the reference, on purpose (docs/LORS_NOTES.md §10): the student is built once; experts stay in
memory (or single snapshots are read per iteration, ``expert_cache="disk"``); image and text
trajectories come from one expert file, so they are paired; the device is honoured; no wandb; dropout is
replayed exactly; resume restores the optimiser momentum and every RNG, so it continues bit-exactly.

Several windows per iteration (``trajectories`` = W > 1): the W (expert, start epoch, plan) draws are
made in order j = 0..W-1 from the run's generator (window j: the next expert of the cycle, its start
epoch, then its plan), the W gradients are averaged (summed in window order, divided by W) and one
update is taken; W = 1 is the single-window iteration, bit for bit. Under ``torchrun`` (P processes, P
divides W) every rank makes all W draws (so the generator stays in step) but computes only windows
r·W/P … (r+1)·W/P − 1; the per-rank sums are all-reduced (gloo on CPU, NCCL on CUDA). Only rank 0 writes
files; a failure on any rank raises the same one-line error on every rank (:func:`lors_fast.engine.dist.agree`).

Run folder: ``checkpoints/last.safetensors`` (atomic, every ``ckpt_every`` iterations),
``distilled.safetensors`` (final), ``metrics.jsonl``, ``config.json``, and artifacts (``images.png``,
``similarity.png``, ``curves.png``, ``nearest_captions.json``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lors_fast.data.distilled import SCHEMA, DistilledSet, _similarity_from, load_distilled
from lors_fast.data.io import load_safetensors_checked, save_safetensors_atomic, write_json_atomic
from lors_fast.engine import dist
from lors_fast.engine.distill_config import DistillConfig
from lors_fast.engine.tesla import SimSlicer, Student, make_plan, mtt_iteration, tesla_iteration

__all__ = ["DistilledSet", "DistillResult", "DistillDivergedError", "DistillDeadRunError", "Distiller",
           "load_distilled", "run", "SCHEMA"]

_PIX_NOISE = ((-0.0626, -0.0221, 0.0680), (1.0451, 1.0752, 1.0539))  # reference --pix_init noise stats


class DistillDivergedError(RuntimeError):
    """A loss, gradient or the synthetic set became NaN/inf; the last good checkpoint is kept."""


class DistillDeadRunError(RuntimeError):
    """Every gradient stayed exactly 0, or the matching loss stayed above ``loss_bound``, for
    ``dead_patience`` iterations (``dead_run_check=False`` continues anyway)."""


@dataclass
class DistillResult:
    distilled: DistilledSet
    metrics: list[dict]
    out: Path
    checkpoint: Path


class Distiller:
    """State and loop of one run (setup in ``__init__``, :meth:`step`, :meth:`save`, :meth:`run`)."""

    def __init__(self, cfg: DistillConfig, *, store=None, dataset=None, caption_emb=None):
        from lors_fast.data.io import check_output_dir
        from lors_fast.engine.trajectories import TrajectoryStore
        from lors_fast.models import FlatModel, StudentSpec, build_student

        self.cfg = cfg
        check_output_dir(cfg.out, "out (--out)")  # before any data or model work
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # auto -> cuda when available; cuda without CUDA -> ValueError; under torchrun cuda -> this rank's GPU
        self.device = dist.local_device(cfg.device)
        self.rank, self.world = dist.rank_world()
        if cfg.trajectories % self.world:
            raise ValueError(f"trajectories={cfg.trajectories} must be a multiple of the number of processes "
                             f"({self.world})")
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.out = Path(cfg.out)
        self.store = store if store is not None else TrajectoryStore(cfg.buffer)
        self.spec = StudentSpec.from_dict(self.store.meta["spec"])
        # the student's parameters come from the trajectories: never read the store's image weight file
        build_spec = StudentSpec.from_dict({**self.spec.to_dict(), "image_weights": None})
        need = cfg.max_start_epoch - 1 + cfg.expert_epochs
        if need > self.store.epochs:
            raise ValueError(f"max_start_epoch - 1 + expert_epochs = {need} exceeds the store's "
                             f"{self.store.epochs} epochs ({cfg.buffer})")
        self.expert_ids = self.store.expert_ids
        if not self.expert_ids:
            raise ValueError(f"trajectory store {cfg.buffer} holds no finished expert")
        # --- data: real pairs (init) and caption embeddings (init + nearest captions)
        from lors_fast.data.text import canonical_encoder

        self.text_encoder = cfg.text_encoder or self.store.meta.get("encoder")
        if not self.text_encoder:
            raise ValueError(f"the store {cfg.buffer} names no text encoder: set text_encoder (--text-encoder)")
        if dataset is None:
            from lors_fast.data.datasets import load_split

            extra = {}
            if cfg.dataset in ("synthetic", "synthetic-mm"):
                extra = {"seed": cfg.data_seed, "n_images": cfg.n_train or self.store.meta.get("n_train")}
            dataset = load_split(cfg.dataset, "train", root=cfg.data_root, ann_root=cfg.ann_root,
                                 cache_dir=cfg.cache_dir, image_size=self.spec.image_size, **extra)
        self.ds = dataset
        if caption_emb is None:
            from lors_fast.data.text import caption_embeddings

            caption_emb = caption_embeddings(dataset, self.text_encoder, cache_dir=cfg.cache_dir)
        self.caption_emb = caption_emb
        if store is None:
            same = canonical_encoder(self.text_encoder) == canonical_encoder(self.store.meta.get("encoder") or "")
            self.store.check_compatible(encoder=None if same else self.text_encoder, dataset=dataset.fingerprint)
        if caption_emb.shape[1] != self.spec.text_dim:
            raise ValueError(f"text embeddings are {caption_emb.shape[1]}-d but the student expects "
                             f"text_dim={self.spec.text_dim}")
        # --- student (built once)
        img, txt = build_student(build_spec, seed=0)
        self.img_model = FlatModel(img.to(self.device, self.dtype))
        self.txt_model = FlatModel(txt.to(self.device, self.dtype))
        if self.img_model.num_params != self.store.p_img or self.txt_model.num_params != self.store.p_txt:
            raise ValueError(f"student has ({self.img_model.num_params}, {self.txt_model.num_params}) params, "
                             f"the store ({self.store.p_img}, {self.store.p_txt})")
        if cfg.deepspeed_config is not None and self.device.type == "cpu":
            from lors_fast.engine.tesla import deepspeed_ac_options

            if deepspeed_ac_options(cfg.deepspeed_config).get("checkpoint_in_cpu"):
                raise ValueError("deepspeed_config: activation_checkpointing.cpu_checkpointing needs a CUDA device "
                                 "(on CPU DeepSpeed empties the inputs it offloads, the recompute fails)")
        self.student = Student(self.img_model, self.txt_model, 1.0 / cfg.temperature, cfg.checkpoint,
                               deepspeed_config=cfg.deepspeed_config)
        self._init_synthetic()
        self._init_optimizer()
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.expert_perm = torch.randperm(len(self.expert_ids), generator=self.gen)
        self.expert_pos = 0
        self.iteration = 0
        self._dead = {"zero": 0, "high": 0}  # consecutive iterations of all-zero gradients / loss > bound
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fill_cache()
        if cfg.resume:
            self.load_checkpoint(self._resolve_resume(cfg.resume))

    # ----- setup
    def _init_synthetic(self) -> None:
        cfg, n = self.cfg, self.cfg.n_pairs
        g = torch.Generator().manual_seed(cfg.seed)
        n_cap = len(self.ds.captions)
        if n > n_cap:
            raise ValueError(f"n_pairs={n} exceeds the {n_cap} captions of {self.ds.name}")
        cap = torch.randperm(n_cap, generator=g)[:n]
        self.init_captions = cap
        if cfg.pix_init == "real":
            images = self.ds.normalized(self.ds.txt2img[cap])
        else:
            s = self.spec.image_size
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _PIX_NOISE)
            images = torch.randn(n, 3, s, s, generator=g) * std + mean
        if cfg.txt_init == "real":
            texts = self.caption_emb[cap]
        else:
            d = self.spec.text_dim
            texts = torch.randn(n, d, generator=g) / d**0.5
        self.images = nn.Parameter(images.to(self.device, self.dtype).contiguous())
        self.texts = nn.Parameter(texts.to(self.device, self.dtype).contiguous())
        self.sim = _similarity_from(cfg.similarity, n, cfg.rank, cfg.alpha, self.dtype, generator=g)
        if self.sim is not None:
            self.sim.to(self.device)
            if cfg.sim_constraint == "nonneg":  # start inside the feasible set: L ~ |N(0, 1)| (R = 0, a = 1)
                with torch.no_grad():
                    for p in self.sim.parameters():
                        p.abs_()
            self._init_sim_options(cap, g)
        self.slicer = SimSlicer(self.sim)
        self.lr_img = nn.Parameter(torch.tensor(cfg.init_lr_img, dtype=self.dtype, device=self.device))
        self.lr_txt = nn.Parameter(torch.tensor(cfg.init_lr_txt, dtype=self.dtype, device=self.device))

    def _init_sim_options(self, cap: torch.Tensor, g: torch.Generator) -> None:
        """Issue-18 options of S: caption cosine of the init pairs, non-zero R, S initialised from captions."""
        from lors_fast.engine.sim_diagnostics import caption_cosine

        cfg = self.cfg
        self.caption_cos = caption_cosine(self.caption_emb[cap])
        if cfg.sim_init_right > 0:
            self.sim.init_right_(cfg.sim_init_right, generator=g, nonneg=cfg.sim_constraint == "nonneg")
        if cfg.sim_init == "caption":
            thr = cfg.caption_threshold
            K = cfg.sim_init_scale * ((self.caption_cos - thr).clamp(min=0) / (1 - thr))
            K.fill_diagonal_(0)
            if hasattr(self.sim, "full"):
                with torch.no_grad():
                    self.sim.full.copy_(torch.eye(cfg.n_pairs, dtype=self.dtype) + K.to(self.dtype))
            else:
                self.sim.init_from_(K, generator=g)
        self.sim.to(self.device)

    def _init_optimizer(self) -> None:
        cfg = self.cfg
        self.groups = {"images": [self.images], "texts": [self.texts], "lrs": [self.lr_img, self.lr_txt]}
        if self.sim is not None:
            self.groups["sim"] = list(self.sim.parameters())
        lrs = {"images": (cfg.lr_img, cfg.momentum_syn), "texts": (cfg.lr_txt, cfg.momentum_syn),
               "lrs": (cfg.lr_lr, cfg.momentum_lr), "sim": (cfg.lr_sim, cfg.momentum_sim)}
        sgd = [{"params": ps, "lr": lrs[k][0], "momentum": lrs[k][1]} for k, ps in self.groups.items() if k != "sim"]
        self.sim_opt = None
        if self.sim is not None:
            sim_groups = [{"params": self.groups["sim"], "lr": cfg.lr_sim}]
            if cfg.lr_sim_factors is not None:  # lowrank: diag at lr_sim, L and R at lr_sim_factors
                sim_groups = [{"params": [self.sim.diag], "lr": cfg.lr_sim},
                              {"params": [self.sim.left, self.sim.right], "lr": cfg.lr_sim_factors}]
            if cfg.sim_optimizer == "adam":
                self.sim_opt = torch.optim.Adam(sim_groups, lr=cfg.lr_sim, betas=(0.9, 0.999))
            else:
                sgd += [dict(grp, momentum=cfg.momentum_sim) for grp in sim_groups]
        self.opt = torch.optim.SGD(sgd, lr=0.0)

    def _needed_epochs(self) -> list[int]:
        return list(range(self.cfg.max_start_epoch - 1 + self.cfg.expert_epochs + 1))

    def _fill_cache(self) -> None:
        mode = self.cfg.expert_cache
        if mode == "auto":
            nbytes = len(self.expert_ids) * len(self._needed_epochs()) * (self.store.p_img + self.store.p_txt) * 4
            mode = "memory" if nbytes <= 2 * 2**30 else "disk"
        self.cache_mode = mode
        if mode == "memory":
            for e in self.expert_ids:
                for ep in self._needed_epochs():
                    self._cache[(e, ep)] = self._read(e, ep)

    def _read(self, expert: int, epoch: int):
        a, b = self.store.snapshot(expert, epoch)
        return a.to(self.device, self.dtype), b.to(self.device, self.dtype)

    def _snapshot(self, expert: int, epoch: int):
        hit = self._cache.get((expert, epoch))
        return hit if hit is not None else self._read(expert, epoch)

    def _next_expert(self) -> tuple[int, int]:
        if self.expert_pos >= len(self.expert_ids):
            self.expert_perm = torch.randperm(len(self.expert_ids), generator=self.gen)
            self.expert_pos = 0
        e = self.expert_ids[int(self.expert_perm[self.expert_pos])]
        self.expert_pos += 1
        start_epoch = int(torch.randint(0, self.cfg.max_start_epoch, (1,), generator=self.gen))
        return e, start_epoch

    def loss_fn(self, f, h, target):
        """The student's contrastive loss of image features ``f`` and text features ``h`` against ``target``
        (the configured kind and backend)."""
        from lors_fast.core.functional import contrastive_loss

        return contrastive_loss(f, h, self.student.logit_scale, target, kind=self.cfg.loss,
                                backend=self.cfg.loss_backend)

    # ----- one iteration: W windows, their mean gradient, one update
    def _draw_windows(self) -> list[tuple[int, int, object]]:
        """The W (expert, start epoch, plan) draws of one iteration, in window order (every rank draws all)."""
        cfg, out = self.cfg, []
        for _ in range(cfg.trajectories):
            expert, start_epoch = self._next_expert()
            out.append((expert, start_epoch, make_plan(cfg.n_pairs, cfg.mini_batch, cfg.syn_steps, self.gen,
                                                       self.device)))
        return out

    def _window(self, expert: int, start_epoch: int, plan):
        cfg = self.cfg
        start = self._snapshot(expert, start_epoch)
        target = self._snapshot(expert, start_epoch + cfg.expert_epochs)
        kw = {"chunk": cfg.chunk} if cfg.method == "tesla" else {}
        fn = tesla_iteration if cfg.method == "tesla" else mtt_iteration
        return fn(self.student, self.loss_fn, self.images, self.texts, self.slicer, self.lr_img, self.lr_txt,
                  start, target, plan, merge_branches=cfg.merge_loss_branches, **kw)

    def gradients(self) -> tuple[dict[str, list[torch.Tensor]], dict]:
        """Draw this iteration's windows, compute their mean gradient (over all ranks) and its metrics."""
        it, W = self.iteration, self.cfg.trajectories
        windows = self._draw_windows()
        per = W // self.world
        grads, sums, drift, error = None, [0.0, 0.0, 0.0], 0.0, None
        try:
            for expert, start_epoch, plan in windows[self.rank * per:(self.rank + 1) * per]:
                res = self._window(expert, start_epoch, plan)
                g = {"images": [res.grad_images], "texts": [res.grad_texts],
                     "lrs": [res.grad_lr_img, res.grad_lr_txt], "sim": list(res.grad_sim)}
                grads = g if grads is None else {k: [a + b for a, b in zip(grads[k], g[k])] for k in grads}
                sums = [sums[0] + res.loss_img, sums[1] + res.loss_txt, sums[2] + res.student_loss]
                drift = max(drift, res.drift)
        except FloatingPointError as e:
            error = f"iteration {it + 1}: {e}; the run diverged: lower the learning rates; {self._last_good()}"
        except ValueError as e:  # the loss refuses non-finite features: the synthetic set has blown up
            if "finite" not in str(e):
                raise
            error = (f"iteration {it + 1}: the run diverged (non-finite student features: {e}); lower the learning "
                     f"rates; {self._last_good()}")
        error = dist.agree(error, self.device)
        if error is not None:
            raise DistillDivergedError(error)
        if self.world > 1:
            flat = [t for k in grads for t in grads[k]]
            dist.all_reduce_(flat)
            stats = torch.tensor(sums, dtype=torch.float64, device=self.device)  # NCCL: tensors on the GPU
            dmax = torch.tensor([drift], dtype=torch.float64, device=self.device)
            dist.all_reduce_([stats])
            dist.all_reduce_([dmax], op="max")
            sums, drift = stats.tolist(), float(dmax)
        if W > 1:
            grads = {k: [t / W for t in ts] for k, ts in grads.items()}
        loss_img, loss_txt, student_loss = (v / W for v in sums)
        metrics = {"iteration": it + 1, "expert": windows[0][0], "start_epoch": windows[0][1],
                   "loss": loss_img + loss_txt, "loss_img": loss_img, "loss_txt": loss_txt,
                   "student_loss": student_loss, "drift": drift}
        if W > 1:
            metrics.update(experts=[w[0] for w in windows], start_epochs=[w[1] for w in windows])
        return grads, metrics

    def step(self) -> dict:
        """One distillation iteration (one expert segment matched, one optimiser step); returns its
        metrics.jsonl record."""
        cfg, t0 = self.cfg, time.perf_counter()
        it = self.iteration
        grads, metrics = self.gradients()
        if self.sim is not None and cfg.sim_diagnostics:
            from lors_fast.engine.sim_diagnostics import update_rates

            metrics.update(update_rates(self.sim, grads["sim"]))  # before clipping (which scales in place)
        for k, ps in self.groups.items():
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads[k])))
            metrics[f"grad_norm_{k}"] = norm
            if not torch.isfinite(torch.tensor(norm)):
                raise DistillDivergedError(f"iteration {it + 1}: non-finite gradient of {k}; {self._last_good()}")
            for p, g in zip(ps, grads[k]):
                p.grad = g.detach().to(p.dtype)
            if k in cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(ps, cfg.clip_grad[k])
        if not all(torch.isfinite(torch.tensor(v)) for v in (metrics["loss"], metrics["student_loss"])):
            raise DistillDivergedError(f"iteration {it + 1}: non-finite loss {metrics['loss']}; {self._last_good()}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sim_opt is not None:
            self.sim_opt.step()
            self.sim_opt.zero_grad(set_to_none=True)
        self._project_sim()
        if self.sim is not None and cfg.sim_diagnostics and cfg.n_pairs <= 2048:
            from lors_fast.engine.sim_diagnostics import agreement, sim_state

            with torch.no_grad():
                S = self.sim.dense()
            metrics.update(sim_state(S))
            metrics.update(agreement(S, self.caption_cos, cfg.caption_threshold))
        if cfg.clamp_lr is not None:
            with torch.no_grad():
                self.lr_img.clamp_(min=cfg.clamp_lr)
                self.lr_txt.clamp_(min=cfg.clamp_lr)
        bad = self._nonfinite_state()
        if bad:
            raise DistillDivergedError(f"iteration {it + 1}: the run diverged (non-finite values in {bad} after the "
                                       f"update; lower the learning rates); {self._last_good()}")
        self.iteration = it + 1
        self._check_dead(metrics, grads)
        metrics.update(lr_img=float(self.lr_img.detach()), lr_txt=float(self.lr_txt.detach()), time_s=time.perf_counter() - t0)
        return metrics

    def _nonfinite_state(self) -> list[str]:
        """Names of the optimised tensors holding NaN/inf (one host sync per iteration, outside the loss)."""
        return [f"{k}[{j}]" if len(ps) > 1 else k for k, ps in self.groups.items()
                for j, p in enumerate(ps) if not bool(torch.isfinite(p.detach()).all())]

    def _check_dead(self, metrics: dict, grads: dict) -> None:
        cfg, it = self.cfg, self.iteration
        zero = all(metrics[f"grad_norm_{k}"] == 0.0 for k in self.groups)
        self._dead["zero"] = self._dead["zero"] + 1 if zero else 0
        self._dead["high"] = self._dead["high"] + 1 if metrics["loss"] > cfg.loss_bound else 0
        if not cfg.dead_run_check:
            return
        if self._dead["zero"] >= cfg.dead_patience:
            raise DistillDeadRunError(
                f"iteration {it}: a dead run: every gradient has been exactly 0 for {self._dead['zero']} iterations, "
                f"so the synthetic set no longer changes (lower the learning rates, e.g. --lr-txt / --lr-img); "
                f"pass --no-dead-run-check to continue anyway; {self._last_good()}")
        if self._dead["high"] >= cfg.dead_patience:
            raise DistillDeadRunError(
                f"iteration {it}: the matching loss {metrics['loss']:.4g} has exceeded loss_bound={cfg.loss_bound:g} "
                f"for {self._dead['high']} iterations (it is ~1 at the start: the student lrs or set lrs are too "
                f"large, e.g. --init-lr-img / --init-lr-txt); pass --no-dead-run-check (or a larger --loss-bound) "
                f"to continue anyway; {self._last_good()}")

    def _project_sim(self) -> None:
        """``sim_constraint="nonneg"``: project every similarity factor onto >= 0, so that S = diag(a) +
        (α/r)·L·Rᵀ is entrywise non-negative (a soft target: the soft-InfoNCE student loss stays bounded
        below, which it is not for any S_ij < 0)."""
        if self.sim is None or self.cfg.sim_constraint == "none":
            return
        with torch.no_grad():
            for p in self.sim.parameters():
                p.clamp_(min=0)

    def _last_good(self) -> str:
        p = self.out / "checkpoints" / "last.safetensors"
        return f"the last good checkpoint is kept: {p}" if p.is_file() else "no checkpoint was written yet"

    # ----- checkpoints
    def info(self) -> dict:
        """The run's metadata stored in every checkpoint (schema, similarity, spec, dataset, encoder, config,
        ...)."""
        cfg = self.cfg
        return {"schema": SCHEMA, "iteration": self.iteration, "similarity": cfg.similarity, "rank": cfg.rank,
                "alpha": cfg.alpha, "sim_constraint": cfg.sim_constraint, "loss": cfg.loss, "temperature": cfg.temperature, "spec": self.spec.to_dict(),
                "dataset": self.ds.name, "dataset_fingerprint": self.ds.fingerprint,
                "text_encoder": self.text_encoder, "method": cfg.method, "n_pairs": cfg.n_pairs,
                "config": cfg.resolved().to_dict()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resume needs: the set, the lrs, the similarity, momentum buffers, RNG states, the
        expert schedule position."""
        t = {"image": self.images.detach(), "text": self.texts.detach(), "lr_img": self.lr_img.detach(),
             "lr_txt": self.lr_txt.detach()}
        if self.sim is not None:
            t.update({f"sim.{n}": p.detach() for n, p in self.sim.named_parameters()})
        for k, ps in self.groups.items():
            for j, p in enumerate(ps):
                buf = self.opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    t[f"opt.{k}.{j}"] = buf
        if self.sim_opt is not None:  # Adam moments of the similarity factors (exact resume)
            for j, p in enumerate(self.groups["sim"]):
                for key, v in self.sim_opt.state.get(p, {}).items():
                    t[f"opt.sim_adam.{j}.{key}"] = torch.as_tensor(v)
        t["rng.gen"] = self.gen.get_state()
        t["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            t["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        t["state.expert_perm"] = self.expert_perm
        t["state.expert_pos"] = torch.tensor(self.expert_pos)
        t["state.iteration"] = torch.tensor(self.iteration)
        return t

    def save(self, path: Path) -> Path:
        """Write the current state atomically to ``path`` (safetensors, :meth:`info` as metadata); returns the
        path. A state with non-finite values is never written (the last good checkpoint stays good)."""
        bad = self._nonfinite_state()
        if bad:  # never overwrite a good checkpoint with a diverged state
            raise DistillDivergedError(f"not writing {path}: non-finite values in {bad}; {self._last_good()}")
        meta = {"lors_fast": json.dumps(self.info(), sort_keys=True)}
        return save_safetensors_atomic(self.state_tensors(), path, meta)

    def _resolve_resume(self, resume: str) -> Path:
        p = Path(resume)
        if p.is_dir():
            p = p / "checkpoints" / "last.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"resume checkpoint not found: {p} (pass a checkpoint file or a run folder)")
        return p

    def load_checkpoint(self, path: Path) -> None:
        """Restore the state saved by :meth:`save` from ``path``; ValueError when it belongs to another
        configuration."""
        tensors, meta = load_safetensors_checked(path)
        missing = [k for k in ("image", "text", "lr_img", "lr_txt", "rng.gen", "state.iteration") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: not a resumable checkpoint, missing tensors {missing}")
        info = json.loads(meta.get("lors_fast", "{}"))
        for key in ("similarity", "n_pairs", "method", "loss"):
            if info.get(key) != getattr(self.cfg, key):
                raise ValueError(f"{path}: checkpoint has {key}={info.get(key)!r}, config {getattr(self.cfg, key)!r}")
        self._check_resume_config(path, info.get("config") or {})
        want = {"image": self.images, "text": self.texts}
        if self.sim is not None:
            want.update({f"sim.{n}": p for n, p in self.sim.named_parameters()})
        wrong = [f"{k} {tuple(tensors[k].shape)} (this config: {tuple(p.shape)})" for k, p in want.items()
                 if k in tensors and tensors[k].shape != p.shape]
        missing = [k for k in want if k not in tensors]
        if wrong or missing:
            raise ValueError(f"{path}: the checkpoint does not fit this config: "
                             + "; ".join(wrong + [f"missing tensor {k}" for k in missing]))
        with torch.no_grad():
            self.images.copy_(tensors["image"])
            self.texts.copy_(tensors["text"])
            self.lr_img.copy_(tensors["lr_img"])
            self.lr_txt.copy_(tensors["lr_txt"])
            if self.sim is not None:
                for n, p in self.sim.named_parameters():
                    p.copy_(tensors[f"sim.{n}"])
        for k, ps in self.groups.items():
            for j, p in enumerate(ps):
                key = f"opt.{k}.{j}"
                if key in tensors:
                    self.opt.state[p]["momentum_buffer"] = tensors[key].to(p.device, p.dtype).clone()
        if self.sim_opt is not None:
            for j, p in enumerate(self.groups["sim"]):
                st = {key.rsplit(".", 1)[1]: v.clone() for key, v in tensors.items()
                      if key.startswith(f"opt.sim_adam.{j}.")}
                if st:
                    self.sim_opt.state[p] = st
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.expert_perm = tensors["state.expert_perm"].clone()
        self.expert_pos = int(tensors["state.expert_pos"])
        self.iteration = int(tensors["state.iteration"])

    def _check_resume_config(self, path: Path, stored: dict) -> None:
        """Every option but the few that may change on resume must equal the checkpoint's."""
        from lors_fast.engine.distill_config import _NOT_COMPARED, RESUME_MAY_CHANGE, _flag, _same

        now = self.cfg.to_dict()
        skip = set(RESUME_MAY_CHANGE) | set(_NOT_COMPARED) | {"out"}
        diffs = [f"{_flag(k)} {now[k]!r} (the checkpoint's run has {v!r})" for k, v in stored.items()
                 if k in now and k not in skip and not _same(k, now[k], v)]
        if diffs:
            raise ValueError(f"cannot resume from {path} with changed options: {'; '.join(diffs)}")

    def distilled(self) -> DistilledSet:
        """The current synthetic set as a :class:`DistilledSet` (float32, CPU copies)."""
        sim = None
        if self.sim is not None:
            sim = _similarity_from(self.cfg.similarity, self.cfg.n_pairs, self.cfg.rank, self.cfg.alpha,
                                   torch.float32)
            with torch.no_grad():
                for (_, p), (_, q) in zip(sim.named_parameters(), self.sim.named_parameters()):
                    p.copy_(q.detach().float().cpu())
        return DistilledSet(self.images.detach().float().cpu().clone(), self.texts.detach().float().cpu().clone(),
                            sim, float(self.lr_img.detach()), float(self.lr_txt.detach()), self.info())

    # ----- the loop
    def run(self) -> DistillResult:
        """Iterate up to ``cfg.iterations`` (metrics.jsonl, checkpoints, optional TensorBoard), save the final
        set and the artifacts; rank 0 holds the run folder's lock throughout (under torchrun only rank 0
        writes files)."""
        if self.rank != 0:
            return self._run()
        from lors_fast.data.runlock import hold

        with hold(self.out, "lors-fast distill"):
            return self._run()

    def _run(self) -> DistillResult:
        cfg, main = self.cfg, self.rank == 0  # under torchrun only rank 0 writes files
        metrics_path = self.out / "metrics.jsonl"
        ckpt = self.out / "checkpoints" / "last.safetensors"
        dist.barrier()  # every rank has read the resume checkpoint before rank 0 writes any
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cfg.resolved().to_dict(), self.out / "config.json")
            history = self._read_history(metrics_path)
            if self.iteration == 0:  # a fresh run replaces any older run's checkpoint in this folder
                self.save(ckpt)
        dist.barrier()
        if not main:
            history = self._read_history(metrics_path, write=False)
        bar = None
        tb = make_metrics_writer(cfg.tensorboard) if cfg.tensorboard and main else None
        if cfg.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="distill", dynamic_ncols=True)
        try:
            with open(metrics_path if main else os.devnull, "a", encoding="utf-8") as mf:
                while self.iteration < cfg.iterations:
                    m = self.step()
                    history.append(m)
                    mf.write(json.dumps(m) + "\n")
                    mf.flush()
                    if tb is not None:
                        log_scalars(tb, m)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{m['loss']:.4f}", lr_img=f"{m['lr_img']:.3g}")
                    if main and (self.iteration % cfg.ckpt_every == 0 or self.iteration == cfg.iterations):
                        self.save(ckpt)
        finally:
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
        final = self.out / "distilled.safetensors"
        if main:
            self.save(final)
        result = DistillResult(self.distilled(), history, self.out, final)
        if cfg.artifacts and main:
            from lors_fast.engine.artifacts import write_artifacts

            write_artifacts(self, result)
        dist.barrier()  # the run folder is complete when run() returns on any rank
        return result

    def _read_history(self, path: Path, write: bool = True) -> list[dict]:
        """Metrics of iterations ≤ the current one (lines written after the checkpoint are dropped)."""
        if not path.is_file():
            return []
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if m.get("iteration", 0) <= self.iteration:
                keep.append(m)
        if not write:
            return keep
        from lors_fast.data.io import atomic_write

        atomic_write(path, "".join(json.dumps(m) + "\n" for m in keep).encode("utf-8"))
        return keep


def make_metrics_writer(logdir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing event files into ``logdir`` (needs tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--tensorboard {logdir}: needs the tensorboard package ({e}); pip install tensorboard") \
            from None
    return SummaryWriter(log_dir=str(logdir))


def log_scalars(writer, metrics: dict) -> None:
    """Every number of one metrics.jsonl record as a TensorBoard scalar ``distill/<field>`` at its iteration."""
    step = int(metrics["iteration"])
    for k, v in metrics.items():
        if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"distill/{k}", float(v), step)


def run(cfg: DistillConfig, **kwargs) -> DistillResult:
    """Run (or resume, with ``cfg.resume``) a distillation; returns the final set and the metrics.

    The run folder is locked (:mod:`lors_fast.data.runlock`) by rank 0 before any work: a second writer is
    refused. Under torchrun (WORLD_SIZE > 1) it joins (and afterwards leaves) a process group when none exists."""
    import contextlib

    from lors_fast.data.io import check_output_dir
    from lors_fast.data.runlock import hold

    check_output_dir(cfg.out, "out (--out)")
    with dist.group(cfg.device):
        lock = hold(cfg.out, "lors-fast distill") if dist.rank_world()[0] == 0 else contextlib.nullcontext()
        with lock:
            return Distiller(cfg, **kwargs).run()
