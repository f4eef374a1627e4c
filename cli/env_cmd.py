"""`lors-fast env`: versions, devices and the loss backend that will run."""

from __future__ import annotations

import importlib
import os
import platform

import click


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report any import failure as text
        return f"not importable ({type(e).__name__})"
    return getattr(m, "__version__", "installed")


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


@click.command()
def env():
    """Print versions, the device, and which loss backend `auto` picks."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import lors_fast
    from lors_fast.core.functional import resolve_backend, triton_available, triton_problem
    from lors_fast.core.kinds import interpreting

    rows = [("lors-fast", lors_fast.__version__), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", torch.__version__)]
    for mod in ("triton", "torchvision", "open_clip", "timm", "transformers", "deepspeed", "safetensors", "numpy"):
        rows.append((mod, _version(mod)))
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if cuda else "not available"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    device = torch.device("cuda" if cuda else "cpu")
    rows.append(("loss backend (auto)", f"{resolve_backend('auto', device)} on {device}"))
    rows.append(("triton kernels", "available" if triton_available() else f"unavailable: {triton_problem()}"))
    if triton_available():
        rows.append(("triton configs", _tuned_summary(device)))
    if interpreting():
        rows.append(("TRITON_INTERPRET", "on (kernels run on CPU in the interpreter)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
