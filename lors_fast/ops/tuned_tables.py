"""Tuned launch-config tables of the fused kernels (the read / merge side; the timing is in
:mod:`lors_fast.ops.triton_tuning`, which writes them).

Where `triton_backend._config` gets a config (later wins):

1. its built-in defaults (tuned on an H200: bench/RESULTS_GPU.md; pair-kind tiles from bench/RESULTS_AOT.md);
2. the packaged table ``lors_fast/ops/tuned_configs.json`` (entries measured by ``bench/gpu_check.py`` on the
   project's GPUs; absent until there are some);
3. the user table: ``$LORS_FAST_TRITON_CONFIGS``, default ``~/.cache/lors_fast/triton_configs.json``, written by
   ``lors-fast tune-kernels`` (:func:`tune` + :func:`save`);
4. ``lors_fast.ops.options.override(configs=...)`` (benchmarks, tests).

A table is JSON: ``{"version": 1, "devices": {"<torch.cuda.get_device_name>": {"<stage>|<dtype>|<DP>":
{"config": {...}, "ms": ..., "n": ..., "triton": ..., "date": ...}}}}`` with stage one of :data:`STAGES`, dtype
e.g. ``bfloat16`` and DP the feature dimension rounded up to a power of two. ``config`` holds the keys of a
launch config (BM, BN, BK, BDO, num_warps, num_stages, WD, FLAT, QFAST, STRIP); ``{}`` records that the
defaults won.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

__all__ = ["CONFIG_KEYS", "ENV", "PACKAGED", "VERSION", "device_key", "load_table", "lookup", "reset_cache",
           "save", "user_table_path"]

VERSION = 1
PACKAGED = Path(__file__).with_name("tuned_configs.json")
ENV = "LORS_FAST_TRITON_CONFIGS"
CONFIG_KEYS = ("BM", "BN", "BK", "BDO", "num_warps", "num_stages", "WD", "FLAT", "QFAST", "STRIP", "PATH")

_CACHE: dict = {}


def user_table_path() -> Path:
    """The user's tuned-config table: ``$LORS_FAST_TRITON_CONFIGS`` or
    ``~/.cache/lors_fast/triton_configs.json``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "lors_fast" / "triton_configs.json")


def device_key(device) -> str:
    """The tuned-table key of ``device``: the CUDA device name, or the device type without a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type  # "cpu": the interpreter (tests); "cuda" without a GPU: configs for an offline build


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _entry_key(stage: str, dtype: torch.dtype, dp: int) -> str:
    return f"{stage}|{str(dtype).replace('torch.', '')}|{dp}"


def load_table(path) -> dict:
    """A tuned-config table; {} when the file does not exist. A malformed file is a ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tuned-config table {path} is not readable JSON ({e}); delete it or set {ENV}") from e
    if not isinstance(table, dict) or table.get("version") != VERSION or not isinstance(table.get("devices"), dict):
        raise ValueError(f"tuned-config table {path}: expected {{'version': {VERSION}, 'devices': {{...}}}}")
    for dev, entries in table["devices"].items():
        for key, e in entries.items():
            cfg = e.get("config") if isinstance(e, dict) else None
            if not isinstance(cfg, dict) or set(cfg) - set(CONFIG_KEYS):
                raise ValueError(f"tuned-config table {path}: entry {dev!r} / {key!r} must hold a 'config' with keys "
                                 f"among {CONFIG_KEYS}, got {e!r}")
    return table


def reset_cache():
    """Forget the tables read so far (after writing one, or when $LORS_FAST_TRITON_CONFIGS changes)."""
    _CACHE.clear()


def _tables():
    user = user_table_path()
    key = str(user)
    if key not in _CACHE:
        _CACHE[key] = (load_table(PACKAGED), load_table(user))
    return _CACHE[key]


def lookup(device, stage: str, dtype: torch.dtype, dp: int) -> dict:
    """The tuned config for (this device, stage, dtype, DP): the user table's, else the packaged one's, else {}.
    Called at every kernel launch: the answer is cached with the tables (reset_cache clears both)."""
    dev = device_key(device)
    key = _entry_key(stage, dtype, dp)
    memo = (str(user_table_path()), dev, key)
    if memo not in _CACHE:
        out: dict = {}
        for table in _tables():
            e = table.get("devices", {}).get(dev, {}).get(key)
            if e is not None:
                out = dict(e["config"])
        _CACHE[memo] = out
    return dict(_CACHE[memo])


def save(results: dict, path=None) -> Path:
    """Merge :func:`tune`'s results into the table at ``path`` (default: the user table), atomically."""
    from lors_fast.data.io import atomic_write

    path = Path(path) if path is not None else user_table_path()
    table = load_table(path) or {"version": VERSION, "devices": {}}
    for e in results["entries"]:
        table["devices"].setdefault(results["device"], {})[e["key"]] = {
            k: e[k] for k in ("config", "ms", "n", "triton", "date")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())
    reset_cache()
    return path


