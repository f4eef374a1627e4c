"""Students and the functional flat-parameter view, against plain module calls."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.func import functional_call

from lors_fast.models import ConvNet, FlatModel, ProjectionHead, StudentSpec, build_student, encode, seeded


def _ref_grads(module, x):
    module.zero_grad()
    module(x).square().sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("head", ["linear", "projection"])
def test_build_student_shapes_and_determinism(head):
    spec = StudentSpec(text_head=head, convnet_width=8, convnet_depth=2, image_size=16, text_dim=12)
    img, txt = build_student(spec, seed=1)
    assert isinstance(img, ConvNet) and img.out_dim == 8 * 4 * 4
    assert img(torch.zeros(2, 3, 16, 16)).shape == (2, 128) and txt(torch.zeros(2, 12)).shape == (2, 128)
    img2, txt2 = build_student(spec, seed=1)
    img3, _ = build_student(spec, seed=2)
    assert torch.equal(FlatModel(img).flat(), FlatModel(img2).flat())
    assert torch.equal(FlatModel(txt).flat(), FlatModel(txt2).flat())
    assert not torch.equal(FlatModel(img).flat(), FlatModel(img3).flat())
    if head == "projection":
        assert isinstance(txt, ProjectionHead)
    # building with a seed leaves the global RNG untouched
    state = torch.get_rng_state()
    build_student(spec, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_default_spec_sizes():
    img, txt = build_student(StudentSpec(), seed=0)
    assert FlatModel(img).num_params == 76032  # 3 × (conv3x3 + GroupNorm) at width 64
    assert FlatModel(txt).num_params == 384 * 1024 + 1024


@pytest.mark.parametrize("branch", ["img", "txt"])
def test_flat_forward_and_grad_match_module(branch):
    torch.manual_seed(0)
    spec = StudentSpec(text_head="projection", convnet_width=6, convnet_depth=2, image_size=8, text_dim=10)
    img, txt = build_student(spec, seed=0)
    module = (img if branch == "img" else txt).eval()
    x = torch.randn(5, 3, 8, 8) if branch == "img" else torch.randn(5, 10)
    fm = FlatModel(module)
    flat = fm.flat().requires_grad_(True)
    out = fm(flat, x)
    assert torch.equal(out, module(x))
    (g,) = torch.autograd.grad(out.square().sum(), flat)
    assert torch.allclose(g, _ref_grads(module, x), rtol=1e-5, atol=1e-6)
    # load_flat round trip
    new = torch.randn(fm.num_params)
    fm.load_flat(new)
    assert torch.equal(fm.flat(), new)
    assert torch.equal(
        fm(new, x), functional_call(module, dict(zip(fm.names, [p for p in module.parameters()])), (x,))
    )


def test_second_order_through_flat_vector():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 ops: threads only add overhead
    try:
        _second_order()
    finally:
        torch.set_num_threads(n_threads)


def _second_order():
    spec = StudentSpec(
        text_head="projection", convnet_width=2, convnet_depth=1, image_size=4, text_dim=3, head_dropout=0.0
    )
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img.double()), FlatModel(txt.double())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def loss(a, b, xx, yy):
        f, h = encode(fi, ft, a, b, xx, yy)
        return (f @ h.T / 0.07).logsumexp(1).sum()

    a = fi.flat().requires_grad_(True)
    b = ft.flat().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a_, b_: loss(a_, b_, x.detach(), y.detach()), (a, b))
    # mixed second order (what TESLA needs): d/d(x, y) of <v, dL/dθ> with θ = both flat vectors
    va, vb = torch.randn_like(a), torch.randn_like(b)

    def vjp(xx, yy):
        ga, gb = torch.autograd.grad(loss(a, b, xx, yy), (a, b), create_graph=True)
        return (ga * va).sum() + (gb * vb).sum()

    assert torch.autograd.gradcheck(vjp, (x, y))


def test_dropout_control():
    spec = StudentSpec(text_head="projection", text_dim=8, convnet_width=4, convnet_depth=1, image_size=4)
    _, txt = build_student(spec, seed=0)
    fm = FlatModel(txt)
    flat, y = fm.flat(), torch.randn(16, 8)
    assert fm.is_stochastic
    with seeded(7):
        a = fm(flat, y)
    with seeded(7):
        b = fm(flat, y)
    c = fm(flat, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    fm.eval()
    assert not fm.is_stochastic and torch.equal(fm(flat, y), fm(flat, y))
    _, txt0 = build_student(StudentSpec(text_head="projection", text_dim=8, head_dropout=0.0), seed=0)
    assert not FlatModel(txt0).is_stochastic


def test_encode_is_normalised():
    img, txt = build_student(StudentSpec(convnet_width=4, convnet_depth=1, image_size=8, text_dim=6), seed=0)
    fi, ft = FlatModel(img), FlatModel(txt)
    f, h = encode(fi, ft, fi.flat(), ft.flat(), torch.randn(3, 3, 8, 8), torch.randn(4, 6))
    assert f.shape == (3, 64) and h.shape == (4, 64)
    assert torch.allclose(f.norm(dim=1), torch.ones(3)) and torch.allclose(h.norm(dim=1), torch.ones(4))


def test_bad_specs_and_inputs(tmp_path):
    with pytest.raises(ValueError) as e:
        StudentSpec(text_head="mlp", image_size=30, head_dropout=1.5)
    msg = str(e.value)
    assert "text_head" in msg and "image_size 30" in msg and "head_dropout" in msg  # all errors at once
    with pytest.raises(ValueError, match="unknown keys"):
        StudentSpec.from_dict({"image_arch": "convnet", "widht": 3})
    assert StudentSpec.from_dict(StudentSpec().to_dict()) == StudentSpec()
    with pytest.raises(ValueError, match="unknown image_arch 'not_a_model'"):
        build_student(StudentSpec(image_arch="not_a_model"))
    with pytest.raises(FileNotFoundError, match="image weights not found: .*nf.pth"):
        build_student(StudentSpec(image_arch="nfnet_l0", image_weights=str(tmp_path / "nf.pth")))
    img, _ = build_student(StudentSpec(convnet_width=4, convnet_depth=1, image_size=8), seed=0)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \("):
        FlatModel(img)(torch.zeros(3), torch.zeros(1, 3, 8, 8))


def test_timm_tower_from_local_weights(tmp_path):
    import timm

    ref = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    spec = StudentSpec(image_arch="test_nfnet", image_weights=str(tmp_path / "w.pth"), image_size=32)
    img, txt = build_student(spec, seed=0)
    assert torch.equal(FlatModel(img).flat(), FlatModel(ref).flat())
    x = torch.randn(2, 3, 32, 32)
    assert txt(torch.zeros(1, 384)).shape[-1] == img.eval()(x).shape[-1]
    torch.save({"garbage": 1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        build_student(StudentSpec(image_arch="test_nfnet", image_weights=str(tmp_path / "bad.pth")))
    torch.save({"stem.conv.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth: checkpoint lacks"):
        build_student(StudentSpec(image_arch="test_nfnet", image_weights=str(tmp_path / "partial.pth")))


@pytest.mark.slow
def test_open_clip_visual_tower_from_local_weights(tmp_path):
    import open_clip

    ref = open_clip.create_model("ViT-S-32", pretrained=None)
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    spec = StudentSpec(
        image_arch="open_clip:ViT-S-32", image_weights=str(tmp_path / "clip.pt"), image_size=224
    )
    img, _ = build_student(spec, seed=0)
    assert torch.equal(FlatModel(img).flat(), FlatModel(ref.visual).flat())
