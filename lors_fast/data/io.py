"""Atomic file writes and checked loads shared by every stage.

Every artifact lors-fast writes (trajectory files, caches, checkpoints, JSON indexes) goes through
:func:`atomic_write`: the content is written to a temporary file in the destination folder, flushed and
fsync'ed, then moved over the destination with :func:`os.replace`. A reader therefore sees either the
old file or the complete new one, never a truncated file, even if the writer is killed.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_state_dict_file",
    "atomic_write",
    "save_safetensors_atomic",
    "load_safetensors_checked",
    "write_json_atomic",
    "read_json_checked",
    "remove_stale_temps",
    "check_output_dir",
    "check_output_file",
]

#: temporary files of :func:`atomic_write`: ``.<name>.<random>.tmp`` next to the destination
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _plain_open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is either the bytes to write, or a callback ``fn(tmp_path)`` that writes the file itself
    (e.g. ``lambda p: np.save(p, arr)``); the callback must write to exactly the path it receives.
    Parent folders are created. The temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _plain_open_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp_path = Path(tmp)
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        elif callable(data):
            os.close(fd)
            data(tmp_path)
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        else:
            os.close(fd)
            raise TypeError(f"atomic_write: data must be bytes or a callable, got {type(data).__name__}")
        os.chmod(tmp_path, mode)  # mkstemp (and some writers) make 0600: give the mode a plain open() would give
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | os.PathLike, *, depth: int = 2) -> list[Path]:
    """Delete :func:`atomic_write` temporaries (``.<name>.<8 chars>.tmp``) left in ``folder`` (and its
    subfolders down to ``depth``) by a killed writer. Call only while holding the folder's lock."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink() and depth > 0:
            removed += remove_stale_temps(p, depth=depth - 1)
        elif p.is_file() and _TMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _probe_writable(folder: Path, what: str, value) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        raise PermissionError(f"{what} {value}: cannot write into {folder} ({e.strerror or e}); "
                              "expected a writable folder") from e
    os.close(fd)
    os.unlink(tmp)


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create the output folder ``path`` if needed and check that files can be written in it.

    Raises ValueError if ``path`` is an existing non-folder, PermissionError (naming it) if it cannot
    be created or written. Call before any long work so that a bad ``--out`` fails at once.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is an existing file; expected a folder (or a path to create)")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {p}: {parent} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{what} {p}: cannot create the folder ({e.strerror or e}); "
                              "expected a writable location") from e
    _probe_writable(p, what, p)
    return p


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check that the file ``path`` can be written (atomically) later: it is not a folder and its folder
    can be created and written. Raises ValueError / PermissionError naming it."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is an existing folder; expected a file path")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {p}: {parent} is a file, not a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{what} {p}: cannot create its folder ({e.strerror or e})") from e
    _probe_writable(p.parent, what, p)
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(f"{what} {p}: the file exists and is not writable")
    return p


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (name -> tensor) as a safetensors file, atomically.

    Tensors are made contiguous and moved to CPU. ``metadata`` must map str to str (safetensors' rule).
    """
    from safetensors.torch import save_file

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str -> str; bad keys: {bad}")
    clean = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def load_safetensors_checked(
    path: str | os.PathLike, keys: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load (tensors, metadata) from a safetensors file with errors that name the file.

    Raises FileNotFoundError if the file is absent and ValueError if it is truncated or not a
    safetensors file, or lacks one of ``keys``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys())
            missing = [k for k in (keys or []) if k not in names]
            if missing:
                raise ValueError(f"{path}: missing tensors {missing}; the file has {names}")
            out = {k: f.get_tensor(k) for k in (keys if keys is not None else names)}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on corrupt files
        raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    return out, meta


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as pretty JSON (sorted keys) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, text.encode("utf-8"))


def read_json_checked(path: str | os.PathLike) -> Any:
    """Read a JSON file; FileNotFoundError / ValueError name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a local .safetensors / .pt / .pth / .bin file (torch.load weights_only).

    Unwraps common containers ({"state_dict": ...}, {"model": ...}). Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"image weights not found: {path} (weights are never downloaded; pass a local checkpoint "
            "file, or image_weights=None for random init)"
        )
    if path.suffix == ".safetensors":
        return load_safetensors_checked(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}
