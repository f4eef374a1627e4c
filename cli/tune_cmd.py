"""`lors-fast tune-kernels`: time the fused kernels' candidate launch configs on this GPU and save the fastest
(lors_fast.ops.triton_tuning); every later run on this GPU model uses them."""

from __future__ import annotations

import click

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@click.command("tune-kernels")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="bf16", show_default=True,
              help="input dtype the configs are tuned for")
@click.option("--d", "d", type=click.IntRange(min=1), default=512, show_default=True, help="feature dimension")
@click.option("--n", "n", type=click.IntRange(min=1), default=16384, show_default=True,
              help="batch size to time at (the double backward stages use min(n, 8192))")
@click.option("--stage", "stages", multiple=True, help="only these stages (repeatable); default: all")
@click.option("--budget", type=click.FloatRange(min=1), default=None, help="stop starting candidates after S seconds")
@click.option("--margin", type=click.FloatRange(min=0, max=0.5), default=0.03, show_default=True,
              help="a candidate replaces the default only when faster by more than this fraction")
@click.option("--jobs", type=click.IntRange(min=0), default=None,
              help="worker processes compiling the candidates before the timing [default: up to 8, one per two "
                   "CPU cores; 0: compile while timing]")
@click.option("--out", type=click.Path(path_type=str, dir_okay=False), default=None,
              help="table to merge the results into [default: $LORS_FAST_TRITON_CONFIGS or "
                   "~/.cache/lors_fast/triton_configs.json]")
def tune_kernels(dtype, d, n, stages, budget, margin, jobs, out):
    """Time candidate launch configs of the fused Triton kernels per stage; save the fastest.

    Needs a CUDA GPU (with TRITON_INTERPRET=1 it runs on CPU in the interpreter: a smoke test, not a tuning).
    Takes one to three minutes (compilation dominates; --jobs compiles the candidates in parallel first)."""
    import torch

    from lors_fast.core.kinds import interpreting
    from lors_fast.ops import triton_tuning

    bad = [s for s in stages if s not in triton_tuning.STAGES]
    if bad:
        raise click.UsageError(f"unknown stages {bad}; expected some of {tuple(triton_tuning.STAGES)}")
    if torch.cuda.is_available() and not interpreting():
        device = "cuda"
    elif interpreting():
        device = "cpu"
    else:
        raise click.UsageError("tune-kernels needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)")
    dt = getattr(torch, _DTYPES[dtype])
    if jobs != 0 and device == "cuda":
        rows = triton_tuning.precompile(device, dt, d=d, stages=stages or None, workers=jobs)
        failed = [r for r in rows if "error" in r]
        click.echo(f"compiled {len(rows) - len(failed)}/{len(rows)} candidates in worker processes"
                   + (f" ({len(failed)} failed: timed anyway, their errors follow)" if failed else ""))
    try:
        res = triton_tuning.tune(device, dt, d=d, n=n, stages=stages or None, budget_s=budget, margin=margin,
                                 log=lambda m: click.echo(m))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if not res["entries"]:
        raise click.ClickException("no candidate could be timed (see the errors above); nothing saved")
    path = triton_tuning.save(res, out)
    click.echo(f"\n{res['device']}, {res['dtype']}, d={d}, n={n}: fastest per stage")
    for e in res["entries"]:
        click.echo(f"  {e['stage']:9s} {e['ms']:9.3f} ms  {e['config'] or 'defaults'}")
    click.echo(f"saved to {path}")


def register(group):
    group.add_command(tune_kernels)
