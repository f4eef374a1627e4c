"""The distillation run: end-to-end on a tiny store, resume == uninterrupted, kill -9 + resume, NaN stop,
artifacts, load_distilled, and config validation errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lors_fast.engine.distill import DistillDivergedError, Distiller, load_distilled, run  # noqa: E402
from lors_fast.engine.distill_config import PRESETS, DistillConfig, load_config  # noqa: E402

TEXT_DIM = 12


from helpers import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def make_fixture(root: Path, n_experts: int = 2, epochs: int = 3):
    """A tiny synthetic dataset, random caption embeddings and a store of random-walk experts."""
    from lors_fast.data.datasets import load_split
    from lors_fast.engine.trajectories import TrajectoryStore
    from lors_fast.models import FlatModel, StudentSpec, build_student

    ds = load_split("synthetic", "train", image_size=8, n_images=40)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(ds.captions), TEXT_DIM, generator=g), dim=1)
    spec = StudentSpec(image_size=8, convnet_width=4, convnet_depth=1, text_dim=TEXT_DIM)
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img), FlatModel(txt)
    store_dir = root / "store"
    if not (store_dir / "index.json").is_file():
        meta = {"spec": spec.to_dict(), "encoder": "minilm", "dataset": ds.fingerprint, "epochs": epochs,
                "img_params": fi.describe(), "txt_params": ft.describe()}
        store = TrajectoryStore.create(store_dir, meta)
        for e in range(n_experts):
            steps_i = 0.05 * torch.randn(epochs, fi.num_params, generator=g)
            steps_t = 0.05 * torch.randn(epochs, ft.num_params, generator=g)
            ti = torch.cat([fi.flat()[None], fi.flat()[None] + steps_i.cumsum(0)])
            tt = torch.cat([ft.flat()[None], ft.flat()[None] + steps_t.cumsum(0)])
            store.write_expert(e, ti, tt)
    return ds, emb, store_dir


def tiny_cfg(root: Path, store_dir: Path, **kw) -> DistillConfig:
    base = dict(buffer=str(store_dir), out=str(root / "run"), n_pairs=12, syn_steps=3, mini_batch=4,
                iterations=4, max_start_epoch=2, rank=3, lr_img=10.0, lr_txt=0.5, lr_sim=0.3, ckpt_every=2,
                progress=False, artifacts=False, text_encoder="minilm", loss_backend="reference")
    base.update(kw)
    return DistillConfig(**base)


def _state(path):
    from safetensors.torch import load_file

    t = load_file(str(path))
    return {k: v for k, v in t.items() if not k.startswith("rng.cpu")}


def test_run_end_to_end_and_artifacts(tmp_path):
    ds, emb, store = make_fixture(tmp_path)
    cfg = tiny_cfg(tmp_path, store, artifacts=True, progress=True, clip_grad={"images": 0.1, "lrs": 10.0})
    res = run(cfg, dataset=ds, caption_emb=emb)
    assert len(res.metrics) == 4 and [m["iteration"] for m in res.metrics] == [1, 2, 3, 4]
    for f in ("images.png", "similarity.png", "curves.png", "nearest_captions.json", "metrics.jsonl",
              "distilled.safetensors", "config.json", "checkpoints/last.safetensors"):
        assert (res.out / f).is_file(), f"missing artifact {f}"
    d = load_distilled(res.checkpoint)
    assert d.images.shape == (12, 3, 8, 8) and d.texts.shape == (12, TEXT_DIM)
    assert torch.equal(d.images, res.distilled.images)
    assert torch.equal(d.similarity.dense(), res.distilled.similarity.dense())
    assert d.lr_img == res.distilled.lr_img and d.meta["iteration"] == 4
    assert d.meta["spec"]["text_dim"] == TEXT_DIM
    assert not d.target().diag.requires_grad and d.target().dense().shape == (12, 12)
    assert not torch.equal(d.images, Distiller(cfg.replace(out=str(tmp_path / "x")), dataset=ds,
                                               caption_emb=emb).images.detach()), "images never moved"


@pytest.mark.parametrize("similarity,method,checkpoint,chunk", [
    ("lowrank", "tesla", "none", None), ("full", "mtt", "torch", None), ("none", "tesla", "deepspeed", None),
    ("lowrank", "tesla", "torch", 3)])
def test_resume_equals_uninterrupted(tmp_path, similarity, method, checkpoint, chunk):
    ds, emb, store = make_fixture(tmp_path)
    kw = dict(similarity=similarity, method=method, pix_init="noise" if similarity == "none" else "real",
              checkpoint=checkpoint, chunk=chunk)
    full = run(tiny_cfg(tmp_path, store, out=str(tmp_path / "full"), **kw), dataset=ds, caption_emb=emb)
    first = tiny_cfg(tmp_path, store, out=str(tmp_path / "part"), iterations=2, **kw)
    run(first, dataset=ds, caption_emb=emb)
    resumed = run(first.replace(iterations=4, resume=str(tmp_path / "part")), dataset=ds, caption_emb=emb)
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert [m["loss"] for m in full.metrics] == [m["loss"] for m in resumed.metrics]


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_distill_run import make_fixture, tiny_cfg
from lors_fast.engine.distill import run
root = Path({root!r})
ds, emb, store = make_fixture(root)
run(tiny_cfg(root, store, out=str(root / "killed"), iterations=400, ckpt_every=1, threads=1), dataset=ds, caption_emb=emb)
"""


def test_kill9_then_resume(tmp_path):
    ds, emb, store = make_fixture(tmp_path)
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, f"child exited early: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.05)
        else:
            pytest.fail("child made no progress in 120 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = tmp_path / "killed" / "checkpoints" / "last.safetensors"
    done = load_distilled(ck).meta["iteration"]
    assert done >= 2
    cfg = tiny_cfg(tmp_path, store, out=str(tmp_path / "killed"), iterations=done + 2, ckpt_every=1,
                   resume=str(tmp_path / "killed"))
    resumed = run(cfg, dataset=ds, caption_emb=emb)
    assert [m["iteration"] for m in resumed.metrics] == list(range(1, done + 3))
    ref = run(cfg.replace(out=str(tmp_path / "ref"), resume=None), dataset=ds, caption_emb=emb)
    a, b = _state(ref.checkpoint), _state(resumed.checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + resume"


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    ds, emb, store = make_fixture(tmp_path)
    cfg = tiny_cfg(tmp_path, store, iterations=6)
    dist = Distiller(cfg, dataset=ds, caption_emb=emb)
    calls = {"n": 0}
    orig = dist.loss_fn

    def poisoned(f, h, t):
        calls["n"] += 1
        loss = orig(f, h, t)
        return loss * float("nan") if calls["n"] > 3 * 3 * 2 else loss  # poison the 4th iteration

    dist.loss_fn = poisoned
    with pytest.raises(DistillDivergedError, match="non-finite.*last good checkpoint"):
        dist.run()
    assert load_distilled(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["iteration"] == 2


def test_config_errors_name_the_options():
    with pytest.raises(ValueError) as e:
        DistillConfig(buffer="", n_pairs=10, mini_batch=20, method="bogus", lr_lr=-1, momentum_syn=1.5,
                      clip_grad={"pixels": 1.0}, similarity="lowrank", rank=50, temperature=0)
    msg = str(e.value)
    for name in ("buffer", "mini_batch", "method", "lr_lr", "momentum_syn", "clip_grad", "rank", "temperature"):
        assert name in msg, f"{name} not named in: {msg}"
    with pytest.raises(ValueError, match="mtt"):
        DistillConfig(buffer="x", method="mtt", checkpoint="deepspeed")
    with pytest.raises(ValueError, match="preset"):
        load_config("nope", buffer="x")
    with pytest.raises(ValueError, match="unknown options"):
        load_config("default", buffer="x", learning_rate=3)


def test_presets_and_toml(tmp_path):
    for name in PRESETS:
        load_config(name, buffer="x")
    c = load_config("flickr-100", buffer="x")
    assert (c.n_pairs, c.rank, c.alpha, c.lr_img, c.lr_sim, c.loss) == (99, 10, 3.0, 100.0, 10.0, "wbce")
    assert load_config("coco-500", buffer="x").temperature == 0.1
    f = tmp_path / "c.toml"
    f.write_text('preset = "default"\nbuffer = "store"\nsyn_steps = 12\n[clip_grad]\nimages = 0.2\n')
    c = load_config(config_file=f, syn_steps=16)
    assert (c.syn_steps, c.clip_grad, c.loss, c.buffer) == (16, {"images": 0.2}, "infonce", "store")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(config_file=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("syn_steps = [")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config(config_file=bad)


def test_missing_store_and_bad_resume(tmp_path):
    ds, emb, store = make_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="nostore"):
        Distiller(tiny_cfg(tmp_path, tmp_path / "nostore"), dataset=ds, caption_emb=emb)
    with pytest.raises(FileNotFoundError, match="resume"):
        Distiller(tiny_cfg(tmp_path, store, resume=str(tmp_path / "none.safetensors")), dataset=ds,
                  caption_emb=emb)
    with pytest.raises(ValueError, match="max_start_epoch"):
        Distiller(tiny_cfg(tmp_path, store, max_start_epoch=3, expert_epochs=2), dataset=ds, caption_emb=emb)


def test_cli_parses_into_config(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from lors_fast.cli.distill_cmd import distill

    import lors_fast.engine.distill as distill_mod

    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        from lors_fast.engine.distill import DistilledSet, DistillResult

        ds = DistilledSet(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4), None, 0.1, 0.1, {})
        return DistillResult(ds, [{"loss": 1.0}], tmp_path, tmp_path / "d.safetensors")

    monkeypatch.setattr(distill_mod, "run", fake_run)
    f = tmp_path / "c.toml"
    f.write_text('preset = "flickr-100"\nbuffer = "store"\nrank = 7\n')
    r = CliRunner().invoke(distill, ["--config", str(f), "--rank", "5", "--similarity", "full", "--no-progress",
                                     "--clip-grad", "images=0.5", "--clip-grad", "lrs=2"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.rank, cfg.similarity, cfg.n_pairs, cfg.loss, cfg.progress) == (5, "full", 99, "wbce", False)
    assert cfg.clip_grad == {"images": 0.5, "lrs": 2.0}
    r = CliRunner().invoke(distill, ["--buffer", "s", "--mini-batch", "500"])
    assert r.exit_code == 2 and "mini_batch" in r.output
    r = CliRunner().invoke(distill, ["--buffer", "s", "--clip-grad", "images"])
    assert r.exit_code == 2 and "GROUP=MAXNORM" in r.output
    r = CliRunner().invoke(distill, ["--buffer", "s"])
    assert r.exit_code == 0 and seen["cfg"].loss == "infonce" and seen["cfg"].lr_txt == 0.5  # default preset


def test_expert_cache_disk_equals_memory(tmp_path):
    ds, emb, store = make_fixture(tmp_path)
    a = run(tiny_cfg(tmp_path, store, out=str(tmp_path / "m"), iterations=2, expert_cache="memory",
                     txt_init="noise"), dataset=ds, caption_emb=emb)
    b = run(tiny_cfg(tmp_path, store, out=str(tmp_path / "d"), iterations=2, expert_cache="disk",
                     txt_init="noise"), dataset=ds, caption_emb=emb)
    sa, sb = _state(a.checkpoint), _state(b.checkpoint)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between expert_cache memory and disk"


@pytest.mark.parametrize("similarity", ["lowrank", "full"])
def test_nonneg_similarity_constraint(tmp_path, similarity):
    """sim_constraint="nonneg" keeps every factor (hence S) entrywise >= 0 while S still learns; the
    unconstrained run of the same seed goes negative (so the projection is what keeps it there)."""
    ds, emb, store = make_fixture(tmp_path)
    dense = {}
    for constraint in ("none", "nonneg"):
        cfg = tiny_cfg(tmp_path, store, out=str(tmp_path / constraint), similarity=similarity, lr_sim=30.0,
                       sim_constraint=constraint, iterations=3)
        res = run(cfg, dataset=ds, caption_emb=emb)
        sim = load_distilled(res.checkpoint).similarity
        dense[constraint] = sim.dense().detach()
        if constraint == "nonneg":
            assert all(bool((p >= 0).all()) for p in sim.parameters()), "a factor went negative"
    assert float(dense["none"].min()) < 0, "the unconstrained S never went negative: the test shows nothing"
    assert float(dense["nonneg"].min()) >= 0
    assert not torch.allclose(dense["nonneg"], torch.eye(12)), "S never moved"
    with pytest.raises(ValueError, match=r"sim_constraint must be one of \('none', 'nonneg'\), got 'relu'"):
        DistillConfig(buffer="x", sim_constraint="relu")
