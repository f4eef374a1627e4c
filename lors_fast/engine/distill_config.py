"""`DistillConfig`: every option of `lors-fast distill`, its presets, and TOML config files.

Precedence: dataclass defaults < preset < TOML file < explicit overrides (CLI). Every option is validated
up front by :meth:`DistillConfig.validate` (called from ``__post_init__``), which collects all errors and
names the offending options.

Presets (docs/LORS_NOTES.md §7): ``flickr-100``, ``flickr-200``, ``flickr-500``, ``coco-100``, ``coco-200``,
``coco-500`` reproduce the paper's scripts (wBCE student against learned low-rank S, lrs as in the shell
scripts); ``default`` is the embedded CPU default (synthetic dataset). Its recipe departs from the paper
where docs/LORS_NOTES.md "Calibration" found the paper's recipe to fail on this data: the student loss is soft-target
InfoNCE (the experts' loss family) with the learned S as target, initial student lrs 0.03, pixel lr 100,
text lr 0.5 (unit-norm 384-d MiniLM embeddings), lr_lr 1e-3, lr_sim 0.3, the student lrs clamped at
≥ 1e-4 (a negative lr is meaningless), per-group gradient-norm clipping (``clip_grad``) and S kept
entrywise non-negative (``sim_constraint="nonneg"``: a, L, R projected onto ≥ 0 after each step, so S stays
a soft target and the soft-InfoNCE student loss stays bounded below) — the last two are *not* part of the
reference method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from lors_fast.core.kinds import KINDS

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

__all__ = ["DistillConfig", "PRESETS", "METHODS", "SIMILARITIES", "INITS", "CLIP_GROUPS", "load_config",
           "RESUME_MAY_CHANGE", "resume_config", "resume_paths"]

METHODS = ("tesla", "mtt")
SIMILARITIES = ("lowrank", "full", "none")
SIM_CONSTRAINTS = ("none", "nonneg")
SIM_INITS = ("identity", "caption")
SIM_OPTIMIZERS = ("sgd", "adam")
INITS = ("real", "noise")
CLIP_GROUPS = ("images", "texts", "lrs", "sim")
LOSS_KINDS = KINDS  # the student-loss choices: every kind
LOSS_BACKENDS = ("auto", "reference", "streaming", "triton")
CHECKPOINTS = ("none", "torch", "deepspeed")
DATASETS = ("synthetic", "flickr", "coco", "synthetic-mm")
DTYPES = ("float32", "float64")


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@dataclass
class DistillConfig:
    """Options of one distillation run (names follow the reference's flags where one exists)."""

    # --- data and experts
    buffer: str = "runs/buffer"  # trajectory store folder (`lors-fast buffer`'s default output)
    out: str = "runs/distill"  # run folder: checkpoints, metrics, artifacts
    dataset: str = "synthetic"  # synthetic | flickr | coco (real pairs for init + nearest captions)
    data_root: str | None = None
    ann_root: str | None = None
    cache_dir: str | None = None
    text_encoder: str | None = None  # None: the store's encoder (must match it)
    n_train: int | None = None  # synthetic only: train-split size (None: the store's n_train)
    data_seed: int = 0  # synthetic only: rendering seed (must match the buffer's)
    # --- synthetic set
    n_pairs: int = 100  # N (--num_queries)
    pix_init: str = "real"  # real | noise
    txt_init: str = "real"
    # --- unroll
    method: str = "tesla"  # tesla (O(P) memory) | mtt (full unroll, exact incl. cross terms)
    syn_steps: int = 8  # K
    expert_epochs: int = 1
    max_start_epoch: int = 2  # start epoch ~ U{0..max_start_epoch-1}
    mini_batch: int = 30  # B
    iterations: int = 300
    merge_loss_branches: bool = False
    trajectories: int = 1  # W expert windows per iteration, gradients averaged (torchrun: W/P per rank)
    # --- similarity and loss
    similarity: str = "lowrank"  # lowrank | full | none
    rank: int = 10
    alpha: float = 1.0
    loss: str = "infonce"  # student loss kind (lors_fast.contrastive_loss)
    loss_backend: str = "auto"
    temperature: float = 0.07
    # --- learnable student lrs and their optimiser (SGD, heavy-ball momentum per group)
    init_lr_img: float = 0.03  # initial η_I (--lr_teacher_img)
    init_lr_txt: float = 0.03
    lr_img: float = 100.0  # lr of the synthetic pixels
    lr_txt: float = 0.5  # lr of the synthetic text embeddings
    lr_lr: float = 1e-3
    lr_sim: float = 0.3
    sim_constraint: str = "none"  # none (reference) | nonneg: a, L, R projected onto >= 0 after each step
    momentum_syn: float = 0.5
    momentum_lr: float = 0.5
    momentum_sim: float = 0.5
    clamp_lr: float | None = None  # lower bound for η after each step (reference --clamp_lr)
    clip_grad: dict[str, float] = field(default_factory=dict)  # per-group max grad norm (not in reference)
    # --- similarity-mining options (issue 18; the defaults keep the behaviour above). See README "Results".
    sim_init: str = "identity"  # identity (a = 1, R = 0) | caption: S ≈ I + sim_init_scale·relu(cos − thr)/(1 − thr)
    sim_init_scale: float = 0.3  # off-diagonal scale of sim_init="caption" (cos: the init captions' cosine)
    sim_init_right: float = 0.0  # lowrank: R ~ this·N(0,1) at the start (|·| under nonneg); 0 = the reference
    lr_sim_factors: float | None = None  # lowrank: lr of L and R (None: lr_sim, which then sets the diagonal's)
    sim_optimizer: str = "sgd"  # sgd (heavy ball, momentum_sim) | adam (betas 0.9/0.999): a normalised update
    caption_threshold: float = 0.8  # caption cosine above which a pair counts as similar (diagnostics, sim_init)
    sim_diagnostics: bool = True  # per-iteration S diagnostics in metrics.jsonl (lors_fast.engine.sim_diagnostics)
    # --- engine
    checkpoint: str = "none"  # activation checkpointing: none | torch | deepspeed
    deepspeed_config: str | None = None  # DeepSpeed JSON: its activation_checkpointing section (checkpoint=deepspeed)
    chunk: int | None = None  # TESLA pass 2: image branch in micro-batches of this size (memory O(chunk))
    device: str = "auto"  # auto: CUDA when available, else CPU (lors_fast.core.device)
    dtype: str = "float32"
    seed: int = 0
    expert_cache: str = "auto"  # auto | memory | disk: keep the needed expert snapshots in memory?
    # --- run safety and outputs
    ckpt_every: int = 50  # checkpoint every K iterations (and at the end)
    resume: str | None = None  # checkpoint file, or a run folder (its latest checkpoint)
    artifacts: bool = True  # PNG grid / heatmap / curves / nearest captions at the end
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads
    dead_run_check: bool = True  # stop a run whose gradients are all 0 / whose loss exceeds loss_bound
    dead_patience: int = 3  # ... for this many consecutive iterations
    loss_bound: float = 100.0  # matching-loss bound of the dead-run check (the loss is ~1 at the start)
    tensorboard: str | None = None  # also log every metrics.jsonl number to TensorBoard event files here

    def __post_init__(self) -> None:
        self.clip_grad = dict(self.clip_grad or {})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError listing every invalid option (by name)."""
        e: list[str] = []

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                e.append(f"{name} must be one of {options}, got {v!r}")

        def integer(name, lo, hi=None):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                e.append(f"{name} must be an int {rng}, got {v!r}")
                return False
            return True

        def real(name, lo=None, strict=True, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                e.append(f"{name} must be a finite number, got {v!r}")
            elif lo is not None and (v <= lo if strict else v < lo):
                e.append(f"{name} must be {'>' if strict else '>='} {lo}, got {v!r}")

        if not isinstance(self.buffer, str) or not self.buffer:
            e.append("buffer (the trajectory store folder) must be a non-empty path")
        if not isinstance(self.out, str) or not self.out:
            e.append("out must be a non-empty path")
        choice("dataset", DATASETS)
        choice("pix_init", INITS)
        choice("txt_init", INITS)
        choice("method", METHODS)
        choice("similarity", SIMILARITIES)
        choice("loss", LOSS_KINDS)
        choice("loss_backend", LOSS_BACKENDS)
        choice("checkpoint", CHECKPOINTS)
        choice("dtype", DTYPES)
        choice("expert_cache", ("auto", "memory", "disk"))
        n_ok = integer("n_pairs", 2)
        integer("syn_steps", 1)
        integer("expert_epochs", 1)
        integer("max_start_epoch", 1)
        b_ok = integer("mini_batch", 1)
        integer("iterations", 0)
        integer("trajectories", 1)
        integer("ckpt_every", 1)
        integer("seed", 0)
        r_ok = integer("rank", 1)
        if self.threads is not None:
            integer("threads", 1)
        integer("data_seed", 0)
        integer("dead_patience", 1)
        real("loss_bound", 0.0)
        if self.n_train is not None and integer("n_train", 1) and self.dataset not in ("synthetic", "synthetic-mm"):
            e.append(f"n_train applies to the synthetic datasets only, got dataset={self.dataset!r}")
        if self.text_encoder is not None and (not isinstance(self.text_encoder, str) or not self.text_encoder):
            e.append(f"text_encoder must be a non-empty string or None (the store's), got {self.text_encoder!r}")
        if n_ok and b_ok and self.mini_batch > self.n_pairs:
            e.append(f"mini_batch ({self.mini_batch}) must be <= n_pairs ({self.n_pairs})")
        if n_ok and r_ok and self.similarity == "lowrank" and self.rank > self.n_pairs:
            e.append(f"rank ({self.rank}) must be <= n_pairs ({self.n_pairs}) with similarity='lowrank'")
        for name in ("alpha", "temperature", "init_lr_img", "init_lr_txt"):
            real(name, 0.0)
        for name in ("lr_img", "lr_txt", "lr_lr", "lr_sim"):
            real(name, 0.0, strict=False)
        for name in ("momentum_syn", "momentum_lr", "momentum_sim"):
            real(name, 0.0, strict=False)
            v = getattr(self, name)
            if isinstance(v, (int, float)) and v >= 1:
                e.append(f"{name} must be < 1, got {v!r}")
        real("clamp_lr", 0.0, strict=False, allow_none=True)
        choice("sim_init", SIM_INITS)
        choice("sim_optimizer", SIM_OPTIMIZERS)
        real("sim_init_scale", 0.0, strict=False)
        real("sim_init_right", 0.0, strict=False)
        real("lr_sim_factors", 0.0, strict=False, allow_none=True)
        real("caption_threshold")
        if isinstance(self.caption_threshold, (int, float)) and not -1 <= self.caption_threshold < 1:
            e.append(f"caption_threshold must be a cosine in [-1, 1), got {self.caption_threshold!r}")
        if not isinstance(self.sim_diagnostics, bool):
            e.append(f"sim_diagnostics must be true or false, got {self.sim_diagnostics!r}")
        if self.similarity != "lowrank" and (self.sim_init_right or self.lr_sim_factors is not None):
            e.append(f"sim_init_right and lr_sim_factors apply to similarity='lowrank' only, got "
                     f"similarity={self.similarity!r}")
        if self.sim_constraint not in SIM_CONSTRAINTS:
            e.append(f"sim_constraint must be one of {SIM_CONSTRAINTS}, got {self.sim_constraint!r}")
        for k, v in self.clip_grad.items():
            if k not in CLIP_GROUPS:
                e.append(f"clip_grad: unknown group {k!r}; expected some of {CLIP_GROUPS}")
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
                e.append(f"clip_grad[{k!r}] must be a positive finite number, got {v!r}")
        if self.chunk is not None and integer("chunk", 1) and self.method != "tesla":
            e.append(f"chunk applies to method='tesla' only, got method={self.method!r}")
        if self.method == "mtt" and self.checkpoint == "deepspeed":
            e.append("method='mtt' needs checkpoint 'none' or 'torch' (DeepSpeed's checkpoint has no autograd.grad)")
        from lors_fast.core.device import check_device

        if (problem := check_device(self.device)) is not None:
            e.append(problem)
        if self.tensorboard is not None and not tensorboard_available():
            e.append(f"tensorboard={self.tensorboard!r} needs the tensorboard package, which is not installed "
                     "(pip install tensorboard)")
        if self.deepspeed_config is not None and self.checkpoint != "deepspeed":
            e.append(f"deepspeed_config applies to checkpoint='deepspeed' only, got checkpoint={self.checkpoint!r}")
        if e:
            raise ValueError("invalid distill config: " + "; ".join(e))

    def replace(self, **overrides) -> DistillConfig:
        """A copy with ``overrides`` applied (validated again)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The config as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def resolved(self) -> DistillConfig:
        """A copy whose paths are absolute (what a run folder records, so it resumes from any directory)."""
        from lors_fast.data.text import canonical_encoder

        over = {k: str(Path(getattr(self, k)).expanduser().resolve())
                for k in _PATH_FIELDS if getattr(self, k) is not None}
        if self.text_encoder is not None:
            over["text_encoder"] = canonical_encoder(self.text_encoder)
        return dataclasses.replace(self, **over)


_PATH_FIELDS = ("buffer", "out", "data_root", "ann_root", "cache_dir", "resume")
#: options that may differ from the run's stored config on resume (everything else must be equal)
RESUME_MAY_CHANGE = ("iterations", "threads", "progress", "artifacts", "ckpt_every", "expert_cache",
                     "dead_run_check", "dead_patience", "loss_bound")
_NOT_COMPARED = ("resume",)


def resume_paths(resume: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of ``resume``: a run folder (its checkpoints/last.safetensors) or a checkpoint."""
    p = Path(resume).expanduser()
    if p.is_dir():
        run, ckpt = p, p / "checkpoints" / "last.safetensors"
    elif p.is_file():
        ckpt = p
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        raise FileNotFoundError(f"--resume {resume}: no such run folder or checkpoint file")
    if not ckpt.is_file():
        raise FileNotFoundError(f"--resume {resume}: {ckpt} not found (the run wrote no checkpoint yet: "
                                "start it again without --resume)")
    return run.resolve(), ckpt.resolve()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same(name: str, given, stored) -> bool:
    if name in _PATH_FIELDS and given is not None and stored is not None:
        return Path(given).expanduser().resolve() == Path(stored).expanduser().resolve()
    if name == "text_encoder" and given is not None and stored is not None:
        from lors_fast.data.text import canonical_encoder

        return canonical_encoder(given) == canonical_encoder(stored)
    if isinstance(given, (int, float)) and isinstance(stored, (int, float)) and not isinstance(given, bool):
        return float(given) == float(stored)
    return given == stored


def resume_config(resume: str | Path, preset: str | None = None, config_file: str | Path | None = None,
                  **given) -> DistillConfig:
    """The config that continues the run ``resume`` (a run folder or its checkpoint) from any directory.

    The run's stored ``config.json`` is the config. Options in ``given`` (and the values of ``preset`` /
    ``config_file`` when passed) must equal the stored ones, except :data:`RESUME_MAY_CHANGE`
    (e.g. ``iterations`` to extend the run); otherwise ValueError lists every differing option.
    """
    from lors_fast.data.io import read_json_checked

    run, ckpt = resume_paths(resume)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--resume {resume}: {cfg_path} not found; expected a `lors-fast distill` run folder")
    stored = read_json_checked(cfg_path)
    if not isinstance(stored, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object of distill options, got {type(stored).__name__}")
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown options {unknown} (written by another lors-fast version?)")
    file_vals = _read_toml(config_file) if config_file is not None else {}
    preset = given.pop("preset", None) or preset or file_vals.pop("preset", None)
    file_vals.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"invalid distill config: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    asked = {**(PRESETS[preset] if preset else {}), **file_vals, **given}
    bad_keys = sorted(set(asked) - known)
    if bad_keys:
        raise ValueError(f"invalid distill config: unknown options {bad_keys}")
    asked.pop("resume", None)
    if "out" in asked and not _same("out", asked["out"], str(run)):
        raise ValueError(f"--out {asked['out']} differs from the run being resumed ({run}); leave --out out "
                         "(the run continues in its own folder)")
    asked.pop("out", None)
    diffs = [f"{_flag(k)} {v!r} (the run has {stored.get(k)!r})" for k, v in asked.items()
             if k not in RESUME_MAY_CHANGE and k not in _NOT_COMPARED and not _same(k, v, stored.get(k))]
    if diffs:
        raise ValueError(f"cannot resume {run} with changed options: {'; '.join(diffs)}. Only "
                         f"{', '.join(_flag(k) for k in RESUME_MAY_CHANGE)} may change on resume; "
                         "drop the others (the stored config.json is used) or start a new run with another --out")
    merged = {**stored, **{k: v for k, v in asked.items() if k in RESUME_MAY_CHANGE}, "out": str(run),
              "resume": str(ckpt)}
    return DistillConfig(**merged)


_PAPER_COMMON = dict(
    similarity="lowrank", loss="wbce", init_lr_img=0.1, init_lr_txt=0.1, syn_steps=8,
    expert_epochs=1, lr_lr=1e-2, iterations=3000, momentum_syn=0.5, momentum_lr=0.5, momentum_sim=0.5,
)
# docs/LORS_NOTES.md §7 table: (dataset, N, max_start_epoch, lr_img=lr_txt, lr_sim, rank, alpha, mini_batch, merge, T, iters)
_PAPER = {
    "flickr-100": ("flickr", 99, 2, 100.0, 10.0, 10, 3.0, 20, False, 0.07, 3000),
    "flickr-200": ("flickr", 199, 2, 1000.0, 10.0, 5, 1.0, 20, False, 0.07, 3000),
    "flickr-500": ("flickr", 499, 3, 1000.0, 100.0, 20, 0.01, 40, False, 0.07, 3000),
    "coco-100": ("coco", 99, 2, 1000.0, 5.0, 10, 1.0, 20, True, 0.07, 3000),
    "coco-200": ("coco", 199, 2, 1000.0, 50.0, 20, 1.0, 20, True, 0.07, 2000),
    "coco-500": ("coco", 499, 2, 5000.0, 500.0, 40, 1.0, 30, True, 0.1, 3000),
}
PRESETS: dict[str, dict] = {
    name: dict(_PAPER_COMMON, dataset=ds, n_pairs=n, max_start_epoch=mse, lr_img=lr, lr_txt=lr, lr_sim=lrs,
               rank=r, alpha=a, mini_batch=b, merge_loss_branches=m, temperature=t, iterations=it)
    for name, (ds, n, mse, lr, lrs, r, a, b, m, t, it) in _PAPER.items()
}
PRESETS["default"] = dict(
    dataset="synthetic", n_pairs=100, syn_steps=8, expert_epochs=1, max_start_epoch=2,
    mini_batch=30, iterations=300, similarity="lowrank", rank=10, alpha=1.0, loss="infonce", temperature=0.07,
    init_lr_img=0.03, init_lr_txt=0.03, lr_img=100.0, lr_txt=0.5, lr_lr=1e-3, lr_sim=0.3, clamp_lr=1e-4,
    clip_grad={"images": 0.1, "texts": 1.0, "sim": 1.0, "lrs": 10.0}, sim_constraint="nonneg",
)


def _read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distill config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed TOML ({e})") from e
    if "distill" in data and isinstance(data["distill"], dict):  # allow a [distill] table
        data = {**{k: v for k, v in data.items() if k != "distill"}, **data["distill"]}
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_config(preset: str | None = None, config_file: str | Path | None = None, **overrides) -> DistillConfig:
    """Build a validated config: defaults < ``preset`` < ``config_file`` (TOML) < ``overrides``.

    A TOML file may name its own ``preset = "..."``; unknown keys anywhere raise ValueError.
    """
    known = {f.name for f in fields(DistillConfig)}
    file_vals = _read_toml(config_file) if config_file is not None else {}
    preset = overrides.pop("preset", None) or preset or file_vals.pop("preset", None)
    file_vals.pop("preset", None)
    errs = []
    if preset is not None and preset not in PRESETS:
        errs.append(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    for where, vals in (("config file", file_vals), ("overrides", overrides)):
        unknown = sorted(set(vals) - known)
        if unknown:
            errs.append(f"{where}: unknown options {unknown}")
    if errs:
        raise ValueError("invalid distill config: " + "; ".join(errs))
    merged = {**(PRESETS[preset] if preset else {}), **file_vals, **overrides}
    try:
        return DistillConfig(**merged)
    except TypeError as e:  # pragma: no cover - guarded by the unknown-key check
        raise ValueError(f"invalid distill config: {e}") from e
