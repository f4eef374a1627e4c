"""Student networks and the functional flat-parameter view used by buffer, distill and eval.

* :class:`StudentSpec` — everything needed to rebuild a student; stored as JSON in stores/checkpoints.
* :func:`build_student` — ``(image_encoder, text_head)``; the text head maps ``text_dim`` to the image
  feature width (image features are *not* projected, as in the reference).
* :class:`FlatModel` — one flat 1-D parameter vector per branch, called through
  :func:`torch.func.functional_call`, so gradients flow to the flat vector (to any order).
* :func:`encode` — L2-normalised (image, text) features from two flat vectors.

Randomness. The only stochastic layer in our students is the "projection" head's Dropout (the
reference's p = 0.1). Dropout draws from the global torch RNG of the input's device, so a caller that
must replay a forward exactly (TESLA's recomputation pass, docs/LORS_NOTES.md §10) has two options:
``StudentSpec(head_dropout=0.0)`` (deterministic head), or run both passes of a step under
``with seeded(step_seed, device): ...`` (forks and seeds the RNG, restoring it afterwards), or call
``FlatModel.eval()`` (dropout off). ConvNet, Linear head, timm NF-nets have no randomness or buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "StudentSpec",
    "ConvNet",
    "ProjectionHead",
    "build_student",
    "image_feature_dim",
    "FlatModel",
    "encode",
    "seeded",
]

TEXT_HEADS = ("linear", "projection")


@dataclass
class StudentSpec:
    """Everything needed to rebuild the student (JSON-serialisable via :meth:`to_dict`)."""

    image_arch: str = "convnet"  # "convnet" | timm name (e.g. "nfnet_l0") | "open_clip:<model>"
    image_weights: str | None = None  # local checkpoint path; None = random init
    image_size: int = 32  # input resolution (square)
    text_dim: int = 384  # input text-embedding width (MiniLM 384, BERT 768)
    text_head: str = "linear"  # "linear" | "projection" (the reference's ProjectionHead)
    convnet_width: int = 64
    convnet_depth: int = 3
    head_dropout: float = 0.1  # dropout of the "projection" head (reference: 0.1); 0 = deterministic

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.image_arch, str) or not self.image_arch:
            errors.append(f"image_arch must be a non-empty string, got {self.image_arch!r}")
        if self.image_arch == "convnet" and self.image_weights is not None:
            errors.append("image_weights is not supported with image_arch='convnet' (random init only)")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            errors.append(f"image_size must be a positive int, got {self.image_size!r}")
        if not isinstance(self.text_dim, int) or self.text_dim < 1:
            errors.append(f"text_dim must be a positive int, got {self.text_dim!r}")
        if self.text_head not in TEXT_HEADS:
            errors.append(f"text_head must be one of {TEXT_HEADS}, got {self.text_head!r}")
        if not isinstance(self.convnet_width, int) or self.convnet_width < 1:
            errors.append(f"convnet_width must be a positive int, got {self.convnet_width!r}")
        if not isinstance(self.convnet_depth, int) or self.convnet_depth < 1:
            errors.append(f"convnet_depth must be a positive int, got {self.convnet_depth!r}")
        elif (
            self.image_arch == "convnet"
            and isinstance(self.image_size, int)
            and self.image_size % (2**self.convnet_depth) != 0
        ):
            errors.append(
                f"image_size {self.image_size} must be divisible by 2**convnet_depth = {2**self.convnet_depth}"
            )
        if not (0.0 <= float(self.head_dropout) < 1.0):
            errors.append(f"head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if errors:
            raise ValueError("invalid StudentSpec: " + "; ".join(errors))

    def to_dict(self) -> dict:
        """The spec as a plain dict (what stores and checkpoints record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudentSpec:
        """The spec from :meth:`to_dict`'s dict; ValueError naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"StudentSpec: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class ConvNet(nn.Module):
    """depth × [conv3×3(width), GroupNorm(width, width) (= instance norm), ReLU, AvgPool2d(2)], flatten."""

    def __init__(self, width: int = 64, depth: int = 3, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            c = width
        self.features = nn.Sequential(*layers)
        self.out_dim = width * (image_size // 2**depth) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features (B, width·(size/2^depth)²) of images ``x`` (B, 3, size, size)."""
        return self.features(x).flatten(1)


class ProjectionHead(nn.Module):
    """The reference's text head: Linear, GELU, Linear, Dropout, residual (+ first Linear), LayerNorm."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(d_in, d_out)
        self.fc = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm(dropout(fc(gelu(p))) + p) with p = projection(x)."""
        p = self.projection(x)
        u = self.dropout(self.fc(F.gelu(p)))
        return self.layer_norm(u + p)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    """Copy ``sd`` into ``model`` (extra checkpoint tensors, e.g. a classifier head, are ignored); one-line
    ValueErrors for missing tensors or tensors of the wrong shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} of the model's {len(own)} tensors, e.g. {missing[:3]} "
            "(weights of another architecture?)"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{path}: {len(wrong)} tensors have the wrong shape for this model, e.g. {k}: "
                         f"{list(got)} in the file, {list(want)} expected (weights of another model or size?)")
    try:
        model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    except RuntimeError as e:  # anything load_state_dict still refuses, as one line
        raise ValueError(f"{path}: does not fit the model: {str(e).strip().splitlines()[-1].strip()}") from None


def _read_checkpoint(reader, path: str) -> dict[str, torch.Tensor]:
    """``reader(path)`` (timm's / open_clip's own checkpoint loader) with one-line errors naming the file."""
    try:
        sd = reader(path)
    except Exception as e:  # noqa: BLE001 - torch.load / safetensors raise many types on truncated files
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {msg}") \
            from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _open_clip_visual(name: str, spec: StudentSpec) -> nn.Module:
    """open_clip model ``name``'s image tower at ``spec.image_size``, its weights from ``spec.image_weights``
    (a whole-model checkpoint, keys ``visual.*``, or the image tower's own state dict), read by open_clip."""
    import open_clip
    from open_clip.factory import load_state_dict as oc_load_state_dict
    from open_clip.factory import resize_pos_embed

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} in image_arch='open_clip:{name}'")
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    patch, size = vision.get("patch_size"), spec.image_size
    if isinstance(patch, int) and (size % patch or size // patch < 2):
        raise ValueError(f"image_size {size} does not fit open_clip:{name} (patch size {patch}): use a multiple "
                         f"of {patch} of at least {2 * patch}, e.g. {max(2, round(size / patch)) * patch}")
    try:
        model = open_clip.create_model(name, pretrained=None, force_image_size=size)
    except Exception as e:  # noqa: BLE001 - open_clip's builders raise assorted errors for unusable sizes
        raise ValueError(f"open_clip:{name} cannot be built for image_size {size}: {type(e).__name__}: {e}") \
            from None
    if spec.image_weights is not None:
        path = str(spec.image_weights)
        sd = _read_checkpoint(lambda p: oc_load_state_dict(p, weights_only=True), path)
        if not any(k.startswith("visual.") for k in sd):
            sd = {"visual." + k: v for k, v in sd.items()}
        resize_pos_embed(sd, model)  # open_clip's own: the position embedding to this image size
        _load_into(model.visual, {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, path)
    visual = model.visual
    try:
        with torch.no_grad():
            visual.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as e:
        raise ValueError(f"open_clip:{name} cannot encode {size}x{size} images: {str(e).splitlines()[0]}") from None
    return visual


def _build_image_encoder(spec: StudentSpec) -> nn.Module:
    arch = spec.image_arch
    if spec.image_weights is not None and not Path(spec.image_weights).is_file():
        # fail before building anything (and never fall back to a hub download)
        raise FileNotFoundError(
            f"image weights not found: {spec.image_weights} (for image_arch={arch!r}; weights are never "
            "downloaded: pass a local checkpoint file, or no weights for random init)"
        )
    if arch == "convnet":
        return ConvNet(spec.convnet_width, spec.convnet_depth, 3, spec.image_size)
    if arch.startswith("open_clip:"):
        return _open_clip_visual(arch.split(":", 1)[1], spec)
    import timm
    from timm.models import load_state_dict as timm_load_state_dict

    if not timm.is_model(arch):
        raise ValueError(
            f"unknown image_arch {arch!r}: expected 'convnet', a timm model name, or 'open_clip:<model>'"
        )
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="avg")
    if spec.image_weights is not None:
        path = str(spec.image_weights)
        # timm's own reader: .safetensors or torch.load(weights_only), EMA / state_dict / model containers,
        # "module." prefixes
        _load_into(model, _read_checkpoint(lambda p: timm_load_state_dict(p, weights_only=True), path), path)
    return model


def image_feature_dim(image_encoder: nn.Module, spec: StudentSpec) -> int:
    """Width of the image encoder's output features (analytic for ConvNet, else one dry forward)."""
    if isinstance(image_encoder, ConvNet):
        return image_encoder.out_dim
    was_training = image_encoder.training
    image_encoder.eval()
    with torch.no_grad():
        out = image_encoder(torch.zeros(1, 3, spec.image_size, spec.image_size))
    image_encoder.train(was_training)
    return int(out.shape[-1])


def build_student(spec: StudentSpec, *, seed: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Build ``(image_encoder, text_head)`` for ``spec`` (CPU, float32, train mode).

    With ``seed``, random initialisation is deterministic and does not touch the global RNG.
    """
    ctx = seeded(seed) if seed is not None else contextlib.nullcontext()
    with ctx:
        img = _build_image_encoder(spec)
        d = image_feature_dim(img, spec)
        if spec.text_head == "linear":
            txt: nn.Module = nn.Linear(spec.text_dim, d)
        else:
            txt = ProjectionHead(spec.text_dim, d, spec.head_dropout)
    return img.float().train(), txt.float().train()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Fork the CPU RNG (and ``device``'s CUDA RNG), seed it with ``seed``, restore it on exit."""
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        idx = torch.device(device).index
        devices = [idx if idx is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class FlatModel:
    """Functional flat-parameter view of one branch.

    ``self(flat, x)`` runs the module with its parameters replaced by views into ``flat`` (in
    ``module.named_parameters()`` order), so the output is differentiable in ``flat`` and ``x`` to any
    order. Buffers (if any) are the module's own and are not part of the flat vector.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"FlatModel: module {type(module).__name__} has no parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(
                f"FlatModel: all parameters must share one dtype, got {sorted(map(str, dtypes))}"
            )
        self.names: list[str] = [n for n, _ in named]
        self.shapes: list[torch.Size] = [p.shape for _, p in named]
        self.numels: list[int] = [p.numel() for _, p in named]
        self.num_params: int = sum(self.numels)

    # --- parameter vector <-> module ---
    def flat(self) -> torch.Tensor:
        """Detached copy of the current parameters as one 1-D tensor."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def _check(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(
                f"flat parameter vector has shape {tuple(flat.shape)}, expected ({self.num_params},)"
            )

    def load_flat(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the module's parameters."""
        self._check(flat)
        with torch.no_grad():
            for p, v in zip(self.module.parameters(), self.split(flat).values()):
                p.copy_(v)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of ``flat`` (views keep the autograd link to ``flat``)."""
        self._check(flat)
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.split(flat), (x,))

    # --- module state ---
    def train(self, mode: bool = True) -> FlatModel:
        """Set the module's train mode; returns self."""
        self.module.train(mode)
        return self

    def eval(self) -> FlatModel:
        """Set the module's eval mode; returns self."""
        return self.train(False)

    def to(self, device: torch.device | str) -> FlatModel:
        """Move the module to ``device``; returns self."""
        self.module.to(device)
        return self

    @property
    def is_stochastic(self) -> bool:
        """True if a forward in the current mode draws random numbers (active dropout)."""
        return any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
            for m in self.module.modules()
        )

    def describe(self) -> list[dict]:
        """``[{"name", "shape"}]`` (for store metadata)."""
        return [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)]


def encode(
    img_model: FlatModel,
    txt_model: FlatModel,
    img_flat: torch.Tensor,
    txt_flat: torch.Tensor,
    images: torch.Tensor,
    texts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features, ``(n_img, d)`` and ``(n_txt, d)``."""
    f = F.normalize(img_model(img_flat, images), dim=-1)
    h = F.normalize(txt_model(txt_flat, texts), dim=-1)
    return f, h
