"""Packaging basics: LICENSE + SPDX string, py.typed, `python -m lors_fast`, a light `lors-fast env`, docstrings
on the public API (every name in ``__all__`` of the public modules, and their public methods)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import lors_fast

ROOT = Path(__file__).resolve().parents[1]


def _public_modules() -> list[str]:
    """lors_fast and every submodule whose name has no leading underscore (``__main__`` runs the CLI)."""
    names = ["lors_fast"]
    for m in pkgutil.walk_packages(lors_fast.__path__, "lors_fast."):
        if not any(part.startswith("_") for part in m.name.split(".")):
            names.append(m.name)
    return names


def test_public_api_has_docstrings():
    missing = []
    for name in _public_modules():
        mod = importlib.import_module(name)
        if not (mod.__doc__ or "").strip():
            missing.append(f"{name} (module docstring)")
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj) and obj.__module__.startswith("lors_fast"):
                for mname, m in vars(obj).items():
                    if mname.startswith("_"):
                        continue
                    f = m.fget if isinstance(m, property) else getattr(m, "__func__", m)
                    if inspect.isfunction(f) and not (f.__doc__ or "").strip():
                        missing.append(f"{name}.{attr}.{mname}")
    assert len(_public_modules()) > 20
    assert not missing, "public API without docstrings:\n" + "\n".join(sorted(set(missing)))


def test_license_py_typed_and_metadata():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the declared tomli
        import tomli as tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    req = meta["build-system"]["requires"][0]
    assert req.startswith("setuptools>=") and int(req.split(">=")[1].split(".")[0]) >= 77  # SPDX strings
    assert (ROOT / "lors_fast" / "py.typed").is_file()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["lors_fast"]
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in meta["project"]["dependencies"])
    assert meta["project"]["requires-python"] == ">=3.10"


def _run(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.perf_counter() - t0


def test_python_dash_m_and_a_light_env():
    r, _ = _run("-m", "lors_fast", "--help")
    assert r.returncode == 0 and "Usage: lors-fast" in r.stdout, r.stderr
    # env reads versions from package metadata: none of the heavy libraries is imported
    code = ("import sys; from click.testing import CliRunner; from lors_fast.cli import main; "
            "r = CliRunner().invoke(main, ['env']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('transformers', 'open_clip', 'timm', 'deepspeed', 'triton', 'torchvision') "
            "if m in sys.modules))")
    r, _ = _run("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout

