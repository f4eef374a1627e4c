"""`lors-fast env`: versions, devices and the loss backend that will run.

Fast by default (about a second: versions come from the installed packages' metadata, only torch is imported
to answer which device ``--device auto`` picks); ``--full`` also imports triton and reads the tuned
launch-config tables.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import click

#: (label, distribution name) of the packages whose versions env reports
_DISTS = (("triton", "triton"), ("torchvision", "torchvision"), ("open_clip", "open_clip_torch"), ("timm", "timm"),
          ("transformers", "transformers"), ("deepspeed", "deepspeed"), ("safetensors", "safetensors"),
          ("numpy", "numpy"), ("click", "click"), ("tensorboard", "tensorboard"))


def _dist_version(dist: str) -> str:
    """The installed version of distribution ``dist`` from its metadata (no import), or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tuned_summary(device) -> str:
    """Which tuned launch-config tables exist and how many entries they hold for this device."""
    from lors_fast.ops import triton_tuning as tt

    key = tt.device_key(device)
    parts = []
    for name, path in (("packaged", tt.PACKAGED), ("user", tt.user_table_path())):
        try:
            table = tt.load_table(path)
        except ValueError as e:
            parts.append(f"{name} {path}: unreadable ({e})")
            continue
        n = len(table.get("devices", {}).get(key, {})) if table else 0
        parts.append(f"{name} {path}: {n} entries for {key}" if table else f"{name}: none")
    return "; ".join(parts) + " (built-in defaults otherwise; `lors-fast tune-kernels` writes the user table)"


def env_rows(full: bool = False) -> list[tuple[str, str]]:
    """The (label, value) rows `lors-fast env` prints; ``full`` adds the triton import check and tuned tables."""
    import torch

    from lors_fast.core.device import resolve_device
    from lors_fast.core.kinds import interpreting

    rows = [("lors-fast", _dist_version("lors-fast")), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", torch.__version__)]
    rows += [(label, _dist_version(dist)) for label, dist in _DISTS]
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if cuda else "not available"))
    device = resolve_device("auto")
    rows.append(("device (auto)", f"{device} (the default of every stage; --device cpu|cuda|cuda:N overrides)"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    if full:
        from lors_fast.core.functional import resolve_backend, triton_available, triton_problem

        rows.append(("loss backend (auto)", f"{resolve_backend('auto', device)} on {device}"))
        rows.append(("triton kernels", "available" if triton_available() else f"unavailable: {triton_problem()}"))
        if triton_available():
            rows.append(("triton configs", _tuned_summary(device)))
    else:
        fused = device.type == "cuda" and _dist_version("triton") != "not installed"
        rows.append(("loss backend (auto)", f"{'triton (fused kernels)' if fused else 'streaming'} on {device} "
                                            "(`lors-fast env --full` checks the triton import and tuned configs)"))
    if interpreting():
        rows.append(("TRITON_INTERPRET", "on (kernels run on CPU in the interpreter)"))
    return rows


@click.command()
@click.option("--full", is_flag=True, help="Also import triton and report the tuned kernel configs (a few seconds).")
def env(full):
    """Print versions, the device `--device auto` picks, and which loss backend `auto` picks."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = env_rows(full)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
