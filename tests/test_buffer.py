"""The buffer stage: experts, store contents, resume, forgetting counts, sharding over gloo."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from lors_fast.data.datasets import load_split
from lors_fast.data.text import caption_embeddings
from lors_fast.engine.buffer import BufferConfig, augment_batch, expert_seed, run
from lors_fast.engine.trajectories import TrajectoryStore
from lors_fast.models import FlatModel, build_student, seeded


def _cfg(tmp_path, **kw):
    base = dict(
        out=str(tmp_path / "store"),
        cache_dir=str(tmp_path / "cache"),
        n_train=48,
        convnet_width=4,
        convnet_depth=2,
        text_encoder="hash:16",
        experts=2,
        epochs=2,
        batch_size=16,
        threads=1,
        eval_split="val",
    )
    return BufferConfig.from_preset("synthetic", **{**base, **kw})


def _plain_first_epoch(cfg, spec, train, emb, idx):
    """Expert idx's first epoch written plainly: module params, torch CE loss, manual SGD."""
    s = expert_seed(cfg.seed, idx)
    img, txt = build_student(spec, seed=s)
    gen = torch.Generator().manual_seed(s + 1)
    with seeded(s + 2):
        order = torch.randperm(train.n_images, generator=gen)
        pick = (torch.rand(train.n_images, generator=gen) * 5).long()
        caps = torch.tensor([train.img2txt[i][k] for i, k in zip(order.tolist(), pick.tolist())])
        for b in range(train.n_images // cfg.batch_size):
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            x = train.images[order[sl]].float() / 255
            x = (x - torch.tensor(train.mean).view(1, 3, 1, 1)) / torch.tensor(train.std).view(1, 3, 1, 1)
            z = F.normalize(img(x), dim=-1) @ F.normalize(txt(emb[caps[sl]]), dim=-1).T / cfg.temperature
            t = torch.arange(len(z))
            loss = (F.cross_entropy(z, t) + F.cross_entropy(z.T, t)) / 2
            params = list(img.parameters()) + list(txt.parameters())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= cfg.lr_img * g
    return FlatModel(img).flat(), FlatModel(txt).flat()


def test_buffer_store_contents_and_plain_reference(tmp_path):
    cfg = _cfg(tmp_path)
    out = run(cfg)
    assert out["trained"] == [0, 1]
    st = TrajectoryStore(cfg.out)
    train = load_split("synthetic", "train", n_images=48)
    emb = caption_embeddings(train, "hash:16", cache_dir=cfg.cache_dir)
    spec = cfg.spec(16)
    assert st.meta["spec"] == spec.to_dict() and st.meta["dataset"] == train.fingerprint
    assert st.meta["lrs"] == {"img": 0.1, "txt": 0.1} and st.meta["optimizer"]["momentum"] == 0.0
    assert st.expert_ids == [0, 1] and json.loads((tmp_path / "store" / "index.json").read_text())[
        "experts"
    ] == [0, 1]
    for i in (0, 1):
        img, txt = st.read_expert(i)
        i0, t0 = build_student(spec, seed=expert_seed(0, i))
        assert img.shape == (3, FlatModel(i0).num_params) and txt.shape == (3, FlatModel(t0).num_params)
        assert torch.equal(img[0], FlatModel(i0).flat()) and torch.equal(txt[0], FlatModel(t0).flat())
        assert not torch.equal(img[1], img[2])
        ref_i, ref_t = _plain_first_epoch(cfg, spec, train, emb, i)
        assert torch.allclose(img[1], ref_i, atol=1e-5, rtol=1e-4), (img[1] - ref_i).abs().max()
        assert torch.allclose(txt[1], ref_t, atol=1e-5, rtol=1e-4), (txt[1] - ref_t).abs().max()
        _, info = st.read_extra(i)
        assert 0.0 <= info["metrics"]["r_mean"] <= 100.0 and info["images_per_s"] > 0
    from safetensors.torch import load_file

    fg = load_file(tmp_path / "store" / "forgetting.safetensors")
    assert torch.equal(fg["presentations"], torch.full((48,), 4.0))  # 2 experts x 2 epochs, no partial batch
    assert fg["events"].shape == (48,) and (fg["events"] <= 2).all() and (fg["events"] >= 0).all()


def test_resume_skips_finished_experts(tmp_path):
    cfg = _cfg(tmp_path, experts=2, eval_split=None)
    run(cfg)
    st = TrajectoryStore(cfg.out)
    first = {i: st.read_expert(i) for i in (0, 1)}
    mtime0 = st.path(0).stat().st_mtime_ns
    st.path(1).unlink()  # as if killed during expert 1
    out = run(BufferConfig(**{**asdict(cfg), "experts": 3}))
    assert out["trained"] == [1, 2] and out["skipped"] == [0]
    assert st.path(0).stat().st_mtime_ns == mtime0
    again = st.read_expert(1)
    assert torch.equal(again[0], first[1][0]) and torch.equal(again[1], first[1][1])  # bitwise reproducible
    with pytest.raises(ValueError, match=r"different metadata for \['epochs'\]"):
        run(BufferConfig(**{**asdict(cfg), "epochs": 3}))
    with pytest.raises(ValueError, match="already holds experts"):
        run(BufferConfig(**{**asdict(cfg), "resume": False}))


WORKER = """
import json, sys
from lors_fast.engine.buffer import BufferConfig, run
run(BufferConfig(**json.loads(sys.argv[1])))
"""


def test_two_gloo_ranks_match_one_process(tmp_path):
    one = _cfg(tmp_path, out=str(tmp_path / "one"), experts=3, eval_split=None)
    run(one)
    two = BufferConfig(**{**asdict(one), "out": str(tmp_path / "two")})
    (tmp_path / "w.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "w.py"),
            json.dumps(asdict(two)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = TrajectoryStore(one.out), TrajectoryStore(two.out)
    assert a.expert_ids == b.expert_ids == [0, 1, 2]
    for i in a.expert_ids:
        for x, y in zip(a.read_expert(i), b.read_expert(i)):
            assert torch.equal(x, y)
    from safetensors.torch import load_file

    fa, fb = (
        load_file(tmp_path / "one" / "forgetting.safetensors"),
        load_file(tmp_path / "two" / "forgetting.safetensors"),
    )
    assert torch.equal(fa["events"], fb["events"]) and torch.equal(fa["presentations"], fb["presentations"])


def test_augment_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    assert augment_batch(x, "none", g) is x
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    for i in range(6):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    c1 = augment_batch(x, "crop_flip", torch.Generator().manual_seed(2))
    c2 = augment_batch(x, "crop_flip", torch.Generator().manual_seed(2))
    assert c1.shape == x.shape and torch.equal(c1, c2) and not torch.equal(c1, x)
    assert c1.min() >= x.min() - 1e-5 and c1.max() <= x.max() + 1e-5  # bilinear: inside the input range


def test_config_validation_collects_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        BufferConfig(dataset="flickr", experts=0, lr_img=-1.0, augment="rotate", captions="some")
    msg = str(e.value)
    for part in (
        "root (image folder) is required",
        "ann_root",
        "experts must be",
        "lr_img",
        "augment must",
        "captions must",
    ):
        assert part in msg, part
    with pytest.raises(ValueError, match="flips is wrong for dataset 'synthetic'"):
        BufferConfig(augment="flip")
    with pytest.raises(ValueError, match="unknown buffer preset 'x'"):
        BufferConfig.from_preset("x")
    with pytest.raises(ValueError, match="text_encoder is required"):
        BufferConfig.from_preset("flickr-paper", root="r", ann_root="a")
    cfg = BufferConfig.from_preset(
        "flickr-paper", root="r", ann_root="a", text_encoder="hf:/bert", experts=None
    )
    assert cfg.experts == 20 and cfg.epochs == 10 and cfg.image_arch == "nfnet_l0" and cfg.captions == "all"
    with pytest.raises(FileNotFoundError, match="image weights not found"):
        run(_cfg(tmp_path, image_arch="test_nfnet", image_weights=str(tmp_path / "missing.pth")))


def test_cli_buffer_and_import(tmp_path):
    from click.testing import CliRunner
    from lors_fast.cli import main

    r = CliRunner().invoke(
        main,
        [
            "buffer",
            "--out",
            str(tmp_path / "s"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--n-train",
            "32",
            "--experts",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--text-encoder",
            "hash:8",
            "--eval-split",
            "none",
            "--threads",
            "1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["trained"] == [0]
    r = CliRunner().invoke(main, ["buffer", "--dataset", "flickr", "--experts", "0"])
    assert (
        r.exit_code != 0 and "root (image folder) is required" in r.output and "experts must be" in r.output
    )
    src = tmp_path / "ref"
    src.mkdir()
    torch.save([[[torch.ones(2)], [torch.zeros(2)]]], src / "img_replay_buffer_0.pt")
    torch.save([[[torch.ones(3)], [torch.zeros(3)]]], src / "txt_replay_buffer_0.pt")
    r = CliRunner().invoke(main, ["import-buffer", str(src), str(tmp_path / "imp")])
    assert r.exit_code == 0, r.output
    assert TrajectoryStore(tmp_path / "imp").read_expert(0)[1].shape == (2, 3)


def test_buffer_on_karpathy_fixture_all_captions(tmp_path):
    from fixtures.karpathy import make_karpathy

    root, ann = make_karpathy(tmp_path, "coco", n_train=8, n_test=4)
    cfg = BufferConfig.from_preset(
        "coco-paper",
        root=str(root),
        ann_root=str(ann),
        out=str(tmp_path / "s"),
        cache_dir=str(tmp_path / "c"),
        image_arch="convnet",
        image_size=16,
        convnet_width=4,
        convnet_depth=2,
        text_encoder="hash:8",
        experts=1,
        epochs=1,
        batch_size=8,
        threads=1,
    )
    assert cfg.captions == "all" and cfg.augment == "crop_flip" and cfg.text_head == "projection"
    out = run(cfg)
    st = TrajectoryStore(cfg.out)
    assert out["trained"] == [0] and st.meta["dataset_name"] == "coco/train" and st.meta["captions"] == "all"
    _, info = st.read_extra(0)
    assert 0.0 <= info["metrics"]["r_mean"] <= 100.0  # scored on the fixture's test split (21 captions)
    from safetensors.torch import load_file

    fg = load_file(tmp_path / "s" / "forgetting.safetensors")
    assert torch.equal(fg["presentations"], torch.full((8,), 5.0))  # every caption entry once: 5 per image


def test_forgetting_counts_against_plain_loop():
    from lors_fast.engine.buffer import _count_forgetting

    g = torch.Generator().manual_seed(0)
    n = 10
    state = [
        torch.zeros(n, dtype=torch.bool),
        torch.zeros(n, dtype=torch.bool),
        torch.zeros(n),
        torch.zeros(n),
    ]
    ref_last, ref_events, ref_pres = {}, [0.0] * n, [0.0] * n
    for step in range(40):
        ii = torch.randint(0, n, (6,), generator=g) if step % 2 else torch.randperm(n, generator=g)[:6]
        correct = torch.rand(6, generator=g) < 0.6
        _count_forgetting(ii, correct, *state)
        for i, c in zip(ii.tolist(), correct.tolist()):
            ref_events[i] += float(ref_last.get(i, False) and not c)
            ref_pres[i] += 1
            ref_last[i] = c
    assert state[2].tolist() == ref_events and state[3].tolist() == ref_pres
    assert sum(ref_events) > 0
