"""The `lors-fast` command line (installed as ``lors_fast.cli``; the library never imports it).

Each stage's command lives in its own module with a ``register(group)`` function; commands only parse
options into the stage's typed config and call the stage.
"""

from __future__ import annotations

import importlib

import click
from lors_fast.cli.env_cmd import env

# stage command modules, each exposing register(group)
_STAGES = ("buffer_cmd", "distill_cmd", "eval_cmd", "tune_cmd")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lors-fast")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (DEBUG, with timestamps and logger names).")
@click.option("-q", "--quiet", count=True, help="Less log output: warnings only (-qq: errors only); no progress bars.")
def main(verbose, quiet):
    """lors-fast: LoRS multimodal dataset distillation and fused contrastive losses.

    \b
    Stages:  buffer  -> expert trajectories on real data
             distill -> trajectory matching with low-rank similarity mining
             eval    -> train a fresh network on a distilled set, retrieval metrics
             coreset -> random / herding / k-center / forgetting baselines
    Kernels: tune-kernels -> time the fused Triton kernels' launch configs on this GPU, keep the fastest
    On the embedded default dataset `lors-fast distill --rank 10` runs the whole pipeline.
    Logs and progress bars go to stderr (bars only on a terminal); results go to stdout.
    """
    from lors_fast.cli._logging import setup_logging

    try:
        setup_logging(verbose, quiet)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


main.add_command(env)

for _name in _STAGES:
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a stage not installed in this build
        if e.name != f"{__name__}.{_name}":
            raise
        continue
    _mod.register(main)

from lors_fast.cli._errors import install as _install_errors  # noqa: E402

_install_errors(main)  # one-line `Error: ...` for every command, tracebacks only with --debug
