"""Local image weights through timm's / open_clip's own checkpoint readers: one-line errors naming the file for
truncated, corrupt, wrong-shape and wrong-size checkpoints (tiny random-init models written to tmp files)."""

from __future__ import annotations

import pytest
import torch

from lors_fast.models import FlatModel, StudentSpec, build_student

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def _one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def nfnet_sd():
    import timm

    return timm.create_model("test_nfnet", pretrained=False, num_classes=0).state_dict()


def _spec(path, arch="test_nfnet", size=32):
    return StudentSpec(image_arch=arch, image_weights=str(path), image_size=size)


def test_timm_truncated_and_corrupt(tmp_path, nfnet_sd):
    from safetensors.torch import save_file

    full = tmp_path / "w.pth"
    torch.save(nfnet_sd, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        build_student(_spec(cut))
    assert "not a readable checkpoint (truncated or corrupt?)" in _one_line(e, cut)
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in nfnet_sd.items()}, str(st))
    img, _ = build_student(_spec(st))  # a good safetensors file loads (timm's reader)
    assert torch.equal(img.state_dict()["stem.conv1.weight"], nfnet_sd["stem.conv1.weight"])
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    with pytest.raises(ValueError) as e:
        build_student(_spec(bad))
    assert "not a readable checkpoint" in _one_line(e, bad)
    trunc = tmp_path / "t" / "model.safetensors"
    trunc.parent.mkdir()
    trunc.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        build_student(_spec(trunc))
    _one_line(e, trunc)


def test_timm_wrong_shape_same_keys(tmp_path, nfnet_sd):
    sd = dict(nfnet_sd)
    k = "stem.conv1.weight"
    sd[k] = torch.zeros(*sd[k].shape[:-1], sd[k].shape[-1] + 2)
    path = tmp_path / "shape.pth"
    torch.save({"state_dict": sd}, path)  # a container timm unwraps
    with pytest.raises(ValueError) as e:
        build_student(_spec(path))
    msg = _one_line(e, path)
    assert "1 tensors have the wrong shape" in msg and k in msg


@pytest.fixture
def tiny_clip(monkeypatch):
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "lors-tiny-test", TINY_CLIP)
    wide = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 48}}
    monkeypatch.setitem(factory._MODEL_CONFIGS, "lors-tiny-wide-test", wide)
    return "lors-tiny-test"


def test_open_clip_whole_model_and_tower_checkpoints(tmp_path, tiny_clip):
    import open_clip

    ref = open_clip.create_model(tiny_clip, pretrained=None)
    whole, tower = tmp_path / "clip.pt", tmp_path / "visual.pth"
    torch.save(ref.state_dict(), whole)
    torch.save(ref.visual.state_dict(), tower)
    for path in (whole, tower):
        img, _ = build_student(_spec(path, f"open_clip:{tiny_clip}", 32), seed=0)
        assert torch.equal(FlatModel(img).flat(), FlatModel(ref.visual).flat())
    # another image size: open_clip's own resize of the position embedding
    img, _ = build_student(_spec(whole, f"open_clip:{tiny_clip}", 48), seed=0)
    assert img.eval()(torch.zeros(1, 3, 48, 48)).shape == (1, 16)


def test_open_clip_errors(tmp_path, tiny_clip):
    import open_clip

    wide = open_clip.create_model("lors-tiny-wide-test", pretrained=None)
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)  # the same architecture at another width: wrong-size weights
    with pytest.raises(ValueError) as e:
        build_student(_spec(path, f"open_clip:{tiny_clip}", 32))
    assert "wrong shape" in _one_line(e, path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError) as e:
        build_student(_spec(cut, f"open_clip:{tiny_clip}", 32))
    assert "truncated or corrupt" in _one_line(e, cut)
    half = {k: v for i, (k, v) in enumerate(wide.visual.state_dict().items()) if i % 2}
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(ValueError, match=r"half.pt: checkpoint lacks \d+ of the model's"):
        build_student(_spec(tmp_path / "half.pt", f"open_clip:{tiny_clip}", 32))


def test_open_clip_image_size_that_does_not_fit(tiny_clip):
    # ViT-B-32 at 32 px would be a single patch: refused in one line before anything is built
    with pytest.raises(ValueError, match=r"image_size 32 does not fit open_clip:ViT-B-32 \(patch size 32\): use a "
                                         r"multiple of 32 of at least 64"):
        build_student(StudentSpec(image_arch="open_clip:ViT-B-32", image_size=32))
    with pytest.raises(ValueError, match="image_size 36 does not fit open_clip:lors-tiny-test"):
        build_student(StudentSpec(image_arch=f"open_clip:{tiny_clip}", image_size=36))
    img, _ = build_student(StudentSpec(image_arch=f"open_clip:{tiny_clip}", image_size=16), seed=0)
    assert img.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 16)
