"""Import of the reference's distilled_*.pt (fake files written here) and of our own .safetensors format."""

from __future__ import annotations

import json

import pytest
import torch

from lors_fast.core.targets import LowRankTarget
from lors_fast.data.importers import load_any_distilled, load_reference_distilled
from lors_fast.data.io import save_safetensors_atomic

N, R = 6, 2


class Evil:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


def ref_payload(kind="lowrank", scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {"image": torch.randn(N, 3, 8, 8, generator=g), "text": torch.randn(N, 16, generator=g),
         "syn_lr_img": torch.tensor(0.04), "syn_lr_txt": torch.tensor(0.07)}
    if kind == "lowrank":
        a, L, Rm = torch.rand(N, generator=g) + 0.5, torch.randn(N, R, generator=g), torch.randn(N, R, generator=g)
        d["similarity_params"] = [a, L, Rm]
        d["similarity_mat"] = torch.diag(a) + scale * L @ Rm.T
    else:
        S = torch.eye(N) + 0.1 * torch.randn(N, N, generator=g)
        d["similarity_params"] = [S]
        d["similarity_mat"] = S.clone()
    return d


def test_lowrank_import_recovers_scale(tmp_path):
    p = tmp_path / "distilled_300.pt"
    d = ref_payload(scale=0.3)
    torch.save(d, p)
    s = load_reference_distilled(p)
    assert isinstance(s.target, LowRankTarget) and s.target.rank == R
    assert s.target.scale == pytest.approx(0.3, rel=1e-5)
    assert torch.allclose(s.target.dense(), d["similarity_mat"], atol=1e-5)
    assert torch.equal(s.images, d["image"]) and torch.equal(s.texts, d["text"])
    assert (s.lr_img, s.lr_txt) == (pytest.approx(0.04), pytest.approx(0.07))
    assert s.meta["source"] == "reference" and s.meta["loss"] == "wbce"
    assert s.meta["spec"] == {"image_arch": "convnet", "image_size": 8, "text_dim": 16, "text_head": "linear"}


def test_lowrank_at_init_and_explicit_scale(tmp_path):
    d = ref_payload()
    d["similarity_params"][2] = torch.zeros(N, R)  # R = 0: S = diag(a), any scale fits
    d["similarity_mat"] = torch.diag(d["similarity_params"][0])
    del d["similarity_mat"]
    p = tmp_path / "distilled_0.pt"
    torch.save(d, p)
    with pytest.raises(ValueError, match="similarity_mat"):
        load_reference_distilled(p)
    s = load_reference_distilled(p, scale=0.5)
    assert s.target.scale == 0.5


def test_full_and_mat_only(tmp_path):
    d = ref_payload("full")
    torch.save(d, tmp_path / "a.pt")
    s = load_reference_distilled(tmp_path / "a.pt")
    assert torch.equal(s.target, d["similarity_params"][0]) and s.meta["similarity"] == "full"
    del d["similarity_params"]
    torch.save(d, tmp_path / "b.pt")
    assert torch.equal(load_reference_distilled(tmp_path / "b.pt").target, d["similarity_mat"])


@pytest.mark.parametrize("key", ["image", "text", "syn_lr_img", "syn_lr_txt"])
def test_missing_key_names_file_and_key(tmp_path, key):
    d = ref_payload()
    del d[key]
    p = tmp_path / "distilled_9.pt"
    torch.save(d, p)
    with pytest.raises(ValueError, match=rf"distilled_9\.pt: missing key\(s\) \['{key}'\]"):
        load_reference_distilled(p)


def test_bad_files(tmp_path):
    d = ref_payload()
    del d["similarity_params"], d["similarity_mat"]
    torch.save(d, tmp_path / "nosim.pt")
    with pytest.raises(ValueError, match="missing key 'similarity_params'"):
        load_reference_distilled(tmp_path / "nosim.pt")
    d = ref_payload()
    d["similarity_mat"] = d["similarity_mat"] + 1.0  # not diag(a) + c L R^T
    torch.save(d, tmp_path / "incons.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        load_reference_distilled(tmp_path / "incons.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_reference_distilled(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: cannot be read"):
        load_reference_distilled(tmp_path / "junk.pt")
    torch.save({"image": Evil()}, tmp_path / "evil.pt")  # arbitrary pickled objects are refused
    with pytest.raises(ValueError, match="weights_only"):
        load_reference_distilled(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_reference_distilled(tmp_path / "nothere.pt")
    d = ref_payload()
    d["text"] = d["text"][:3]
    torch.save(d, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="must be"):
        load_reference_distilled(tmp_path / "shape.pt")


def test_load_any(tmp_path):
    torch.save(ref_payload(), tmp_path / "distilled_1.pt")
    assert load_any_distilled(tmp_path / "distilled_1.pt").meta["source"] == "reference"
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        load_any_distilled(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError):
        load_any_distilled(tmp_path / "none.safetensors")


def test_load_ours_safetensors(tmp_path):
    distill = pytest.importorskip("lors_fast.engine.distill")
    g = torch.Generator().manual_seed(0)
    t = {"image": torch.randn(N, 3, 8, 8, generator=g), "text": torch.randn(N, 16, generator=g),
         "lr_img": torch.tensor(0.03), "lr_txt": torch.tensor(0.05), "sim.diag": torch.ones(N),
         "sim.left": torch.randn(N, R, generator=g), "sim.right": torch.randn(N, R, generator=g)}
    info = {"schema": distill.SCHEMA, "similarity": "lowrank", "rank": R, "alpha": 1.0, "loss": "infonce",
            "dataset": "synthetic/train", "text_encoder": "minilm"}
    p = save_safetensors_atomic(t, tmp_path / "distilled.safetensors", {"lors_fast": json.dumps(info)})
    s = load_any_distilled(p)
    assert isinstance(s.target, LowRankTarget) and s.target.scale == pytest.approx(1.0 / R)
    expect = torch.diag(t["sim.diag"]) + (1.0 / R) * t["sim.left"] @ t["sim.right"].T
    assert torch.allclose(s.target.dense(), expect, atol=1e-6)
    assert s.lr_img == pytest.approx(0.03) and s.meta["loss"] == "infonce"
