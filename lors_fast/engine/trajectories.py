"""Expert-trajectory store: one safetensors file per expert plus a JSON index.

Layout of a store folder::

    index.json                  # metadata: schema, spec, encoder, dataset fingerprint, optimizer, lrs,
                                #   epochs, seed, img_params / txt_params ([{name, shape}]), experts
    expert_0000.safetensors     # tensors img (E+1, P_img), txt (E+1, P_txt) float32; row e = after epoch e
    expert_0001.safetensors     #   (row 0 = the initialisation)
    forgetting.safetensors      # optional (buffer): events / presentations per train image

Expert indices are explicit in file names; every file is written atomically, so the set of expert files
present is always the set of finished experts (a killed run resumes by skipping them). Several processes
may write different experts into one store; ``expert_ids`` scans the folder.

:func:`import_reference_buffers` converts the reference's ``img_replay_buffer_<n>.pt`` /
``txt_replay_buffer_<n>.pt`` files (``file[expert][epoch][param]``) into a store.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from lors_fast.data.io import (
    load_safetensors_checked,
    read_json_checked,
    save_safetensors_atomic,
    write_json_atomic,
)

__all__ = ["SCHEMA", "TrajectoryStore", "import_reference_buffers"]

SCHEMA = "lors_fast.engine.trajectories/1"
REQUIRED = ("spec", "encoder", "dataset", "epochs", "img_params", "txt_params")
_EXPERT_RE = re.compile(r"^expert_(\d{4,})\.safetensors$")


def _numel(params: list[dict]) -> int:
    return sum(math.prod(p["shape"]) for p in params)


def _check_meta(meta: dict, where: str) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    errs = [f"missing key {k!r}" for k in REQUIRED if k not in meta]
    if meta.get("schema", SCHEMA) != SCHEMA:
        errs.append(f"schema {meta.get('schema')!r} is not supported (expected {SCHEMA!r})")
    for k in ("img_params", "txt_params"):
        v = meta.get(k)
        if k in meta and not (
            isinstance(v, list) and v and all(isinstance(p, dict) and "name" in p and "shape" in p for p in v)
        ):
            errs.append(f"{k} must be a non-empty list of {{name, shape}}")
    if "epochs" in meta and (not isinstance(meta["epochs"], int) or meta["epochs"] < 1):
        errs.append(f"epochs must be a positive int, got {meta['epochs']!r}")
    if errs:
        raise ValueError(f"{where}: invalid trajectory metadata: " + "; ".join(errs))


class TrajectoryStore:
    """Read/write access to a trajectory store folder (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "index.json"
        if not self.root.is_dir():
            raise FileNotFoundError(f"trajectory store folder not found: {self.root}")
        if not index.is_file():
            raise FileNotFoundError(f"trajectory store index not found: {index}")
        self.meta: dict = read_json_checked(index)
        _check_meta(self.meta, str(index))
        self.p_img = _numel(self.meta["img_params"])
        self.p_txt = _numel(self.meta["txt_params"])
        self.epochs: int = self.meta["epochs"]

    @classmethod
    def create(cls, root: str | Path, meta: dict, *, exist_ok: bool = True) -> TrajectoryStore:
        """Create a store (writes index.json). If one exists with the same metadata (ignoring
        "experts"), open it for resuming; if its metadata differ, raise ValueError naming the keys."""
        root = Path(root)
        meta = {"schema": SCHEMA, **meta}
        _check_meta(meta, str(root / "index.json"))
        index = root / "index.json"
        if index.is_file():
            if not exist_ok:
                raise ValueError(f"trajectory store already exists: {index}")
            old = read_json_checked(index)
            ign = {"experts", "created"}
            keys = sorted(k for k in set(old) | set(meta) if k not in ign and old.get(k) != meta.get(k))
            if keys:
                raise ValueError(
                    f"{index}: an existing store has different metadata for {keys} "
                    f"(e.g. {keys[0]}: stored {old.get(keys[0])!r}, requested {meta.get(keys[0])!r}); "
                    "use another --out folder or delete it"
                )
        else:
            write_json_atomic({**meta, "experts": []}, index)
        return cls(root)

    # --- experts ---
    def path(self, idx: int) -> Path:
        """File of expert ``idx``: ``expert_<idx:04d>.safetensors`` in the store."""
        return self.root / f"expert_{idx:04d}.safetensors"

    @property
    def expert_ids(self) -> list[int]:
        """Indices of the expert files present (each was written atomically, so each is complete)."""
        ids = []
        for p in self.root.iterdir():
            m = _EXPERT_RE.match(p.name)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def has_expert(self, idx: int) -> bool:
        """True if expert ``idx``'s file exists and its header matches the metadata."""
        if not self.path(idx).is_file():
            return False
        try:
            self._header(idx)
        except ValueError:
            return False
        return True

    def write_expert(
        self,
        idx: int,
        img: torch.Tensor,
        txt: torch.Tensor,
        *,
        extra: dict[str, torch.Tensor] | None = None,
        info: dict | None = None,
    ) -> None:
        """Write expert ``idx``: img (E+1, P_img), txt (E+1, P_txt), float32; atomic.

        ``extra``: more tensors stored in the same file (e.g. the buffer's per-expert forgetting
        counts); ``info``: a JSON-serialisable dict stored in the file metadata (e.g. final scores).
        """
        if not isinstance(idx, int) or idx < 0:
            raise ValueError(f"expert index must be a non-negative int, got {idx!r}")
        want_i, want_t = (self.epochs + 1, self.p_img), (self.epochs + 1, self.p_txt)
        if tuple(img.shape) != want_i or tuple(txt.shape) != want_t:
            raise ValueError(
                f"expert {idx}: got img {tuple(img.shape)} / txt {tuple(txt.shape)}, expected {want_i} / {want_t}"
            )
        extra = dict(extra or {})
        clash = sorted({"img", "txt"} & set(extra))
        if clash:
            raise ValueError(f"expert {idx}: extra tensor names {clash} are reserved")
        meta = {
            "schema": SCHEMA,
            "expert": str(idx),
            "epochs": str(self.epochs),
            "dataset": str(self.meta["dataset"]),
            "info": json.dumps(info or {}, sort_keys=True),
        }
        save_safetensors_atomic({"img": img.float(), "txt": txt.float(), **extra}, self.path(idx), meta)

    def read_extra(self, idx: int) -> tuple[dict[str, torch.Tensor], dict]:
        """(extra tensors, info dict) stored with expert ``idx`` (see :meth:`write_expert`)."""
        f = self._header(idx)  # reads only the extra tensors, not the trajectories
        try:
            extra = {k: f.get_tensor(k) for k in f.keys() if k not in ("img", "txt")}
            info = json.loads((f.metadata() or {}).get("info", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path(idx)}: malformed info metadata ({e})") from e
        except Exception as e:
            raise ValueError(f"{self.path(idx)}: cannot read extra tensors (truncated file?): {e}") from e
        return extra, info

    def _header(self, idx: int):
        from safetensors import safe_open

        path = self.path(idx)
        if not path.is_file():
            raise FileNotFoundError(
                f"expert {idx} not in store {self.root}: {path} does not exist (have {self.expert_ids})"
            )
        try:
            f = safe_open(str(path), framework="pt")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in ("img", "txt")}
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
        want = {"img": (self.epochs + 1, self.p_img), "txt": (self.epochs + 1, self.p_txt)}
        if shapes != want:
            raise ValueError(f"{path}: tensors {shapes} do not match the store metadata {want}")
        return f

    def read_expert(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(img (E+1, P_img), txt (E+1, P_txt)) of expert ``idx``."""
        self._header(idx)
        t, _ = load_safetensors_checked(self.path(idx), keys=["img", "txt"])
        return t["img"], t["txt"]

    def snapshot(self, idx: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(img (P_img,), txt (P_txt,)) of expert ``idx`` after ``epoch`` epochs; reads only those rows."""
        if not isinstance(epoch, int) or not 0 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be an int in [0, {self.epochs}], got {epoch!r}")
        f = self._header(idx)
        try:
            return f.get_slice("img")[epoch : epoch + 1][0].clone(), f.get_slice("txt")[epoch : epoch + 1][
                0
            ].clone()
        except Exception as e:
            raise ValueError(f"{self.path(idx)}: cannot read epoch {epoch} (truncated file?): {e}") from e

    def finalize(self) -> None:
        """Refresh index.json's "experts" list from the files present (one writer: rank 0)."""
        write_json_atomic({**self.meta, "experts": self.expert_ids}, self.root / "index.json")
        self.meta["experts"] = self.expert_ids

    # --- consumers ---
    def check_compatible(
        self, *, spec: dict | None = None, encoder: str | None = None, dataset: str | None = None
    ) -> None:
        """Raise ValueError naming every field of the store that differs from the caller's config."""
        errs = []
        if spec is not None and self.meta["spec"] != spec:
            diff = sorted(
                k for k in set(spec) | set(self.meta["spec"]) if spec.get(k) != self.meta["spec"].get(k)
            )
            errs.append(
                f"spec differs in {diff} (store {[self.meta['spec'].get(k) for k in diff]}, config {[spec.get(k) for k in diff]})"
            )
        if encoder is not None and self.meta["encoder"] != encoder:
            errs.append(f"text encoder: store {self.meta['encoder']!r}, config {encoder!r}")
        if dataset is not None and self.meta["dataset"] != dataset:
            errs.append(f"dataset fingerprint: store {self.meta['dataset'][:16]}…, config {dataset[:16]}…")
        if errs:
            raise ValueError(f"trajectory store {self.root} does not match: " + "; ".join(errs))


def _load_reference_file(path: Path) -> list:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
    if not (isinstance(obj, list) and obj and all(isinstance(ex, list) and ex for ex in obj)):
        raise ValueError(
            f"{path}: expected a list of trajectories (file[expert][epoch][param]), got {type(obj).__name__}"
        )
    return obj


def _flatten_trajectory(traj: list, path: Path, k: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    rows, shapes = [], None
    for e, snap in enumerate(traj):
        if not (isinstance(snap, (list, tuple)) and snap and all(isinstance(t, torch.Tensor) for t in snap)):
            raise ValueError(f"{path}: expert {k} epoch {e} is not a list of tensors")
        s = [tuple(t.shape) for t in snap]
        if shapes is None:
            shapes = s
        elif s != shapes:
            raise ValueError(f"{path}: expert {k} epoch {e} has parameter shapes differing from epoch 0")
        rows.append(torch.cat([t.detach().float().reshape(-1) for t in snap]))
    return torch.stack(rows), shapes


def import_reference_buffers(src: str | Path, root: str | Path, meta: dict) -> TrajectoryStore:
    """Convert reference buffers in ``src`` into a store at ``root``.

    Files are paired by their numeric index n (``img_replay_buffer_<n>.pt`` with
    ``txt_replay_buffer_<n>.pt``), never by glob order; experts are numbered in increasing n, then by
    position inside a file. ``meta`` supplies spec / encoder / dataset (and optionally img_params /
    txt_params names; otherwise ``param_<i>`` with the stored shapes).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"reference buffer folder not found: {src}")
    pat = {kind: re.compile(rf"^{kind}_replay_buffer_(\d+)\.pt$") for kind in ("img", "txt")}
    found: dict[str, dict[int, Path]] = {"img": {}, "txt": {}}
    for p in src.iterdir():
        for kind, rx in pat.items():
            m = rx.match(p.name)
            if m:
                found[kind][int(m.group(1))] = p
    if not found["img"]:
        raise FileNotFoundError(f"no img_replay_buffer_<n>.pt files in {src}")
    unpaired = sorted(set(found["img"]) ^ set(found["txt"]))
    if unpaired:
        raise ValueError(f"{src}: buffer indices {unpaired} have an img or a txt file but not both")
    from lors_fast.data.runlock import hold

    with hold(root, "lors-fast import-buffer"):  # one writer per store
        return _import(found, src, root, meta)


def _import(found: dict, src: Path, root: str | Path, meta: dict) -> TrajectoryStore:
    store = None
    next_id = 0
    for n in sorted(found["img"]):
        imgs, txts = _load_reference_file(found["img"][n]), _load_reference_file(found["txt"][n])
        if len(imgs) != len(txts):
            raise ValueError(
                f"{found['img'][n]} has {len(imgs)} experts but {found['txt'][n]} has {len(txts)}"
            )
        for k, (ti, tt) in enumerate(zip(imgs, txts)):
            img, img_shapes = _flatten_trajectory(ti, found["img"][n], k)
            txt, txt_shapes = _flatten_trajectory(tt, found["txt"][n], k)
            if img.shape[0] != txt.shape[0]:
                raise ValueError(
                    f"{src}: expert {k} of buffer {n} has {img.shape[0]} img but {txt.shape[0]} txt snapshots"
                )
            if store is None:
                full = {
                    "optimizer": "unknown (imported)",
                    "lrs": None,
                    "seed": None,
                    "source": f"imported from reference buffers in {src}",
                    **meta,
                    "epochs": img.shape[0] - 1,
                }
                for key, shapes in (("img_params", img_shapes), ("txt_params", txt_shapes)):
                    given = full.get(key)
                    if given is not None and [tuple(p["shape"]) for p in given] != shapes:
                        raise ValueError(
                            f"{src}: {key} in meta do not match the stored parameter shapes {shapes[:3]}…"
                        )
                    if given is None:
                        full[key] = [{"name": f"param_{i}", "shape": list(s)} for i, s in enumerate(shapes)]
                store = TrajectoryStore.create(root, full)
            store.write_expert(next_id, img, txt)
            next_id += 1
    store.finalize()
    return store
