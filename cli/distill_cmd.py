"""`lors-fast distill`: parse options into a DistillConfig and call lors_fast.engine.distill.run.

Every DistillConfig field is an option (``--syn-steps``, ``--lr-img``, ...). Precedence: preset < TOML
``--config`` file < options given on the command line (options left out do not override anything).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

import click

from lors_fast.engine.distill_config import (
    CHECKPOINTS,
    CLIP_GROUPS,
    DATASETS,
    DTYPES,
    INITS,
    LOSS_BACKENDS,
    LOSS_KINDS,
    METHODS,
    PRESETS,
    SIM_CONSTRAINTS,
    SIM_INITS,
    SIM_OPTIMIZERS,
    SIMILARITIES,
    DistillConfig,
)

_CHOICES = {"dataset": DATASETS, "pix_init": INITS, "txt_init": INITS, "method": METHODS,
            "similarity": SIMILARITIES, "loss": LOSS_KINDS, "loss_backend": LOSS_BACKENDS,
            "checkpoint": CHECKPOINTS, "dtype": DTYPES, "sim_constraint": SIM_CONSTRAINTS, "expert_cache": ("auto", "memory", "disk"),
            "sim_init": SIM_INITS, "sim_optimizer": SIM_OPTIMIZERS}
_HELP = {
    "buffer": "trajectory store folder (from `lors-fast buffer`)",
    "out": "run folder (checkpoints, metrics.jsonl, PNGs, nearest captions)",
    "n_pairs": "number of synthetic pairs N",
    "method": "tesla: O(P)-memory TESLA gradient; mtt: exact full unroll (MTT-VL baseline)",
    "syn_steps": "student steps K per iteration",
    "mini_batch": "student minibatch B",
    "similarity": "learned S: lowrank (diag + (alpha/rank) L R^T), full (N x N), none (identity)",
    "loss": "student contrastive loss kind",
    "init_lr_img": "initial learnable student lr of the image branch",
    "init_lr_txt": "initial learnable student lr of the text branch",
    "lr_img": "SGD lr of the synthetic pixels",
    "lr_txt": "SGD lr of the synthetic text embeddings",
    "lr_lr": "SGD lr of the learnable student lrs",
    "lr_sim": "SGD lr of the similarity factors",
    "sim_constraint": "none (reference): S unconstrained; nonneg: a, L, R projected onto >= 0 after each step, so "
                      "S is a non-negative soft target (the default preset's choice)",
    "clamp_lr": "lower bound of the student lrs after each step",
    "checkpoint": "activation checkpointing of the student forward",
    "deepspeed_config": "DeepSpeed JSON file whose activation_checkpointing section is applied "
                        "(deepspeed.checkpointing.configure); with --checkpoint deepspeed",
    "trajectories": "expert windows per iteration, gradients averaged; under torchrun each of the P "
                    "processes computes trajectories/P of them",
    "chunk": "TESLA pass 2: run the image branch in micro-batches of this size (activation memory O(chunk), "
             "~20% more time; per-sample encoders only)",
    "ckpt_every": "write an atomic checkpoint every this many iterations",
    "resume": "run folder (or its checkpoint) to continue exactly, from any directory: its config.json is the "
              "config; other options must equal it except --iterations, --threads, --progress, --artifacts, "
              "--ckpt-every, --expert-cache and the dead-run options",
    "dead_run_check": "stop (exit 1) when every gradient is 0, or the matching loss exceeds --loss-bound, for "
                      "--dead-patience iterations; --no-dead-run-check continues anyway",
    "dead_patience": "consecutive iterations of the dead-run check",
    "loss_bound": "matching-loss bound of the dead-run check (the loss is ~1 at the start)",
    "sim_init": "identity: a = 1, R = 0 (the reference); caption: S ~ I + sim_init_scale * relu(cos - thr)/(1 - thr) "
                "from the init captions' cosine (NMF factors)",
    "sim_init_scale": "off-diagonal scale of --sim-init caption",
    "sim_init_right": "lowrank: initial R ~ this * N(0,1) (|.| under nonneg) instead of 0",
    "lr_sim_factors": "lowrank: lr of the factors L and R (default: --lr-sim)",
    "sim_optimizer": "sgd (momentum_sim) or adam (a normalised update) for the similarity parameters",
    "caption_threshold": "caption cosine above which a pair counts as similar (diagnostics, --sim-init caption)",
    "sim_diagnostics": "per-iteration S diagnostics in metrics.jsonl",
    "expert_cache": "keep expert snapshots in memory (auto: if they fit in 2 GiB) or read them per iteration",
    "device": "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N",
    "tensorboard": "also write every metrics.jsonl number as TensorBoard scalars into this folder (needs the "
                   "tensorboard package)",
}
_HELP.update({
    "dataset": "dataset of the real pairs (initialisation, nearest captions); must be the buffer's",
    "data_root": "image folder of flickr / coco",
    "ann_root": "folder of the Karpathy JSON annotations (flickr / coco)",
    "cache_dir": "image and text-embedding caches ($LORS_FAST_CACHE or ~/.cache/lors_fast when not given)",
    "text_encoder": "caption encoder (minilm | hf:<dir> | hf-mean:<dir> | open_clip:<model>:<ckpt> | hash:<dim>); "
                    "not given: the buffer's",
    "n_train": "synthetic only: train-split size (not given: the buffer's)",
    "data_seed": "synthetic only: rendering seed of the dataset (must match the buffer's)",
    "pix_init": "initial synthetic images: real (random real images) or noise",
    "txt_init": "initial synthetic text embeddings: real (their captions' embeddings) or noise",
    "expert_epochs": "expert epochs M the student must match per iteration",
    "max_start_epoch": "expert start epochs are drawn from 0..this-1",
    "iterations": "distillation iterations",
    "merge_loss_branches": "one matching loss over both branches instead of image + text",
    "rank": "rank r of the low-rank similarity",
    "alpha": "scale alpha of the low-rank term (alpha/rank) L R^T",
    "loss_backend": "contrastive-loss backend: auto (triton on CUDA, else streaming), reference, streaming, triton",
    "temperature": "student logit temperature (logits = cos / T)",
    "momentum_syn": "SGD momentum of the synthetic images and texts",
    "momentum_lr": "SGD momentum of the learnable student lrs",
    "momentum_sim": "SGD momentum of the similarity factors",
    "dtype": "dtype of the synthetic set and the student",
    "seed": "seed of the initialisation and of the expert / minibatch draws",
    "artifacts": "write images.png, similarity.png, curves.png and nearest_captions.json at the end",
    "progress": "progress bar on stderr (only on a terminal)",
    "threads": "torch CPU threads (not given: torch's default)",
})
#: DistillConfig fields that are paths (click.Path; folders unless a file is allowed)
_PATHS = {"buffer": click.Path(path_type=str, file_okay=False), "out": click.Path(path_type=str, file_okay=False),
          "data_root": click.Path(path_type=str, file_okay=False), "ann_root": click.Path(path_type=str, file_okay=False),
          "cache_dir": click.Path(path_type=str, file_okay=False), "resume": click.Path(path_type=str),
          "tensorboard": click.Path(path_type=str, file_okay=False)}


def _parse_clip(values: tuple[str, ...]) -> dict[str, float] | None:
    if not values:
        return None
    out = {}
    for v in values:
        k, sep, num = v.partition("=")
        if not sep:
            raise click.BadParameter(f"expected GROUP=MAXNORM with GROUP in {CLIP_GROUPS}, got {v!r}",
                                     param_hint="--clip-grad")
        try:
            out[k.strip()] = float(num)
        except ValueError:
            raise click.BadParameter(f"max norm of {k!r} must be a number, got {num!r}",
                                     param_hint="--clip-grad") from None
    return out


def _options(fn):
    hints = typing.get_type_hints(DistillConfig)
    for f in reversed(dataclasses.fields(DistillConfig)):
        if f.name == "clip_grad":
            fn = click.option("--clip-grad", "clip_grad", multiple=True, metavar="GROUP=MAXNORM",
                              help=f"per-group gradient-norm clipping (not in the reference), GROUP in "
                                   f"{', '.join(CLIP_GROUPS)}; repeatable")(fn)
            continue
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        in_preset = any(f.name in p for p in PRESETS.values())
        help_ = _HELP.get(f.name, "") + (f" [default: {default!r}{', or the preset' if in_preset else ''}]"
                                         if default is not None else " [default: the preset's]" if in_preset else "")
        if t is bool:
            fn = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_)(fn)
        elif f.name in _CHOICES:
            fn = click.option(flag, f.name, type=click.Choice(_CHOICES[f.name]), default=None, help=help_)(fn)
        else:
            base = typing.get_args(t)[0] if typing.get_args(t) else t
            ptype = _PATHS.get(f.name) or {int: int, float: float}.get(base, str)
            fn = click.option(flag, f.name, type=ptype, default=None, help=help_)(fn)
    return fn


#: DistillConfig options the main job takes itself (the rest are passed to both distillation runs)
_MAIN_JOB_KEYS = ("out", "rank", "alpha", "n_pairs", "iterations", "seed", "cache_dir", "n_train", "text_encoder",
                  "dataset")


def _main_job(given: dict, eval_runs: int, eval_epochs, baseline: bool, random_subset: bool, parallel: bool):
    from lors_fast.engine.pipeline import MainJobConfig, run_main_job

    job = {k: given.pop(k) for k in _MAIN_JOB_KEYS if k in given}
    progress = given.pop("progress", True)
    try:
        cfg = MainJobConfig(eval_runs=eval_runs, eval_epochs=eval_epochs, baseline=baseline,
                            random_subset=random_subset, parallel=parallel, progress=progress, distill=given, **job)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    record = run_main_job(cfg)
    click.echo(record["table_markdown"])
    click.echo(f"\ntotal {record['timings_s']['total']:.0f} s; results: {cfg.out}/results.md (and results.json)")
    if record["pictures"]:
        click.echo("pictures:\n  " + "\n  ".join(record["pictures"]))


@click.command("distill")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="default: embedded CPU recipe; flickr-/coco-100/200/500: the paper's scripts")
@click.option("--config", "config_file", type=click.Path(path_type=str, dir_okay=False), default=None,
              help="TOML file of options (keys = option names with underscores; may set preset)")
@click.option("--eval-runs", type=click.IntRange(1), default=3, show_default=True,
              help="main job only: evaluation seeds per set")
@click.option("--eval-epochs", type=click.IntRange(1), default=None,
              help="main job only: training epochs of each evaluation network [default: 80]")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="main job only: also distill the no-mining (S = I) trajectory-matching baseline")
@click.option("--random-subset/--no-random-subset", default=True, show_default=True,
              help="main job only: also evaluate a random real subset of the same size")
@click.option("--parallel/--serial", default=True, show_default=True,
              help="main job only: two worker processes (one thread each) share the distillations and the "
                   "evaluation seeds")
@_options
def distill(preset, config_file, eval_runs, eval_epochs, baseline, random_subset, parallel, **opts):
    """Distill a synthetic image-text set by trajectory matching with low-rank similarity mining.

    Without --buffer (and without --preset/--config, on the embedded synthetic dataset) this runs the
    MAIN JOB end to end: dataset and text-embedding cache, an expert buffer when none exists (reused next
    time), LoRS and the no-mining baseline, a random subset, evaluation of the three, and a results table
    (e.g. `lors-fast distill --rank 10`).
    """
    from lors_fast.engine.distill import DistillDivergedError, run
    from lors_fast.engine.distill_config import load_config

    clip = _parse_clip(opts.pop("clip_grad"))
    given = {k: v for k, v in opts.items() if v is not None}
    if clip is not None:
        given["clip_grad"] = clip
    from lors_fast.cli._logging import progress_enabled

    if not progress_enabled(given.get("progress", True)):  # bars only on a terminal, never with -q
        given["progress"] = False
    if (preset is None and config_file is None and "buffer" not in given and "resume" not in given
            and given.get("dataset", "synthetic") in ("synthetic", "synthetic-mm")):
        return _main_job(given, eval_runs, eval_epochs, baseline, random_subset, parallel)
    if "resume" in given:  # the run's stored config is the config (checked against what is given)
        from lors_fast.engine.distill_config import resume_config

        cfg = resume_config(given.pop("resume"), preset, config_file, **given)
        return _report(cfg, run(cfg))
    if preset is None and config_file is None:
        preset = "default"
    try:
        cfg = load_config(preset, config_file, **given)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    from lors_fast.engine.dist import rank_world

    try:
        res = run(cfg)
    except DistillDivergedError as e:
        if rank_world()[0] != 0 or int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 says it, once
            sys.exit(1)
        raise click.ClickException(str(e)) from None
    _report(cfg, res)


def _report(cfg, res) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports, once
        return
    last = res.metrics[-1] if res.metrics else {}
    click.echo(f"distilled {cfg.n_pairs} pairs in {res.out} ({len(res.metrics)} iterations); "
               f"final matching loss {last.get('loss', float('nan')):.4f}, "
               f"lr_img {res.distilled.lr_img:.4g}, lr_txt {res.distilled.lr_txt:.4g}; set: {res.checkpoint}")


def register(group: click.Group) -> None:
    group.add_command(distill)
