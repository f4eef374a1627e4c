"""Runs users can trust: kill -9 then `--resume RUN` alone from another directory equals the uninterrupted run
bitwise; one writer per folder (the lock, its holder named, stale locks taken over, stale temporaries removed);
atomic writes follow the umask; absolute paths in run configs; small API checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lors_fast.cli import main

from lors_fast.data.io import atomic_write, remove_stale_temps
from lors_fast.data.runlock import LOCK_NAME, LockHeldError, hold, holder

DISTILL = ["--n-pairs", "8", "--syn-steps", "2", "--mini-batch", "4", "--rank", "2", "--threads", "1",
           "--no-progress", "--no-artifacts", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    env = {"LORS_FAST_CACHE": str(root / "cache")}
    r = CliRunner().invoke(main, ["buffer", "--dataset", "synthetic", "--out", str(root / "S"), "--experts", "2",
                                  "--epochs", "2", "--n-train", "64", "--batch-size", "32", "--text-encoder",
                                  "hash:16", "--eval-split", "none", "--threads", "1", "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    return root, env


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k != "rng.cpu"}


def _wait_lines(path: Path, n: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"child exited early: {proc.stderr.read().decode()[-2000:]}"
        time.sleep(0.05)
    pytest.fail(f"no progress in {timeout} s")


def test_kill9_then_resume_alone_from_another_directory(store, tmp_path, monkeypatch):
    root, env = store
    work = tmp_path / "a"
    work.mkdir()
    (work / "S").symlink_to(root / "S")
    cmd = [sys.executable, "-m", "lors_fast.cli", "distill", "--buffer", "S", "--out", "K", "--iterations", "400",
           *DISTILL]
    proc = subprocess.Popen(cmd, cwd=work, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_lines(work / "K" / "metrics.jsonl", 3, proc)
        assert holder(work / "K")["pid"] == proc.pid  # the live run holds the lock, naming itself
        res = CliRunner().invoke(main, ["distill", "--resume", str(work / "K")], env=env)
        assert res.exit_code == 1 and f"pid {proc.pid}" in res.output and "in use" in res.output, res.output
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = work / "K"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["buffer"] == str((work / "S").resolve()) and Path(cfg["out"]).is_absolute()
    assert (run / LOCK_NAME).is_file()  # left by the killed process: a stale lock
    stale = run / "checkpoints" / ".last.safetensors.ab12cd34.tmp"
    stale.write_bytes(b"partial")
    done = int(_tensors(run / "checkpoints" / "last.safetensors")["state.iteration"])
    assert done >= 2
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(main, ["distill", "--resume", os.path.relpath(run, elsewhere), "--iterations",
                                    str(done + 2)], env=env)
    assert res.exit_code == 0, res.output
    assert not stale.exists() and not (run / LOCK_NAME).exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(1, done + 3))
    ref = tmp_path / "ref"
    res = CliRunner().invoke(main, ["distill", "--buffer", str(root / "S"), "--out", str(ref), "--iterations",
                                    str(done + 2), *DISTILL], env=env)
    assert res.exit_code == 0, res.output
    a, b = _tensors(ref / "distilled.safetensors"), _tensors(run / "distilled.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + --resume"
    ref_loss = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert ref_loss == [m["loss"] for m in lines]


_HOLDER = """
import sys, time
from lors_fast.data.runlock import hold
with hold(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_writer_refused_at_once(store, tmp_path):
    root, env = store
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().decode().strip() == "held"
        t0 = time.perf_counter()
        res = CliRunner().invoke(main, ["distill", "--buffer", str(root / "S"), "--out", str(out),
                                        "--iterations", "2", *DISTILL], env=env)
        assert time.perf_counter() - t0 < 10
        assert res.exit_code == 1, res.output
        line = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
        assert len(line) == 1 and f"pid {proc.pid} on host {socket.gethostname()!r}" in line[0], res.output
        assert "Traceback" not in res.output and not (out / "metrics.jsonl").exists()
        res = CliRunner().invoke(main, ["buffer", "--out", str(out), "--n-train", "64", "--experts", "1",
                                        "--epochs", "1", "--text-encoder", "hash:16", "--no-progress"], env=env)
        assert res.exit_code == 1 and f"pid {proc.pid}" in res.output, res.output
        with pytest.raises(LockHeldError, match=f"pid {proc.pid}"):
            with hold(out):
                pass
    finally:
        proc.kill()
        proc.wait()
    with hold(out):  # the holder is gone: the lock is free again
        assert holder(out)["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_taken_over_and_temps_removed(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(),
                                                "started": 0, "what": "a dead run"}))
    ours = [folder / ".config.json.a1B2c3D4.tmp", folder / "checkpoints" / ".last.safetensors.zz_99xyz.tmp"]
    kept = [folder / "notes.tmp", folder / ".hidden", folder / "checkpoints" / "last.safetensors"]
    for p in ours + kept:
        p.write_bytes(b"x")
    with hold(folder, "test"):
        info = holder(folder)
        assert info["pid"] == os.getpid() and info["what"] == "test"
        assert not any(p.exists() for p in ours) and all(p.exists() for p in kept)
        with hold(folder):  # re-entrant in one process
            pass
        assert holder(folder)["pid"] == os.getpid()
    assert remove_stale_temps(tmp_path / "absent") == []


@pytest.fixture
def umask():
    def set_(m):
        os.umask(m)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def test_atomic_write_follows_umask(tmp_path, umask):
    for m, want in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(m)
        p = atomic_write(tmp_path / f"f{m:o}", b"x")
        with open(tmp_path / f"plain{m:o}", "w"):
            pass
        assert (p.stat().st_mode & 0o777) == want == (os.stat(tmp_path / f"plain{m:o}").st_mode & 0o777)
    umask(0o022)
    p = tmp_path / "existing"
    p.write_bytes(b"a")
    p.chmod(0o660)
    atomic_write(p, b"b")
    assert p.stat().st_mode & 0o777 == 0o660 and p.read_bytes() == b"b"  # as open(p, "w") would keep it


def test_run_files_keep_the_umask_after_resume(store, tmp_path, umask):
    root, env = store
    umask(0o002)
    out = tmp_path / "r"
    args = ["distill", "--buffer", str(root / "S"), "--out", str(out), "--iterations", "1", *DISTILL]
    assert CliRunner().invoke(main, args, env=env).exit_code == 0
    files = ["metrics.jsonl", "config.json", "distilled.safetensors", "checkpoints/last.safetensors"]
    assert {f: (out / f).stat().st_mode & 0o777 for f in files} == {f: 0o664 for f in files}
    res = CliRunner().invoke(main, ["distill", "--resume", str(out), "--iterations", "2"], env=env)
    assert res.exit_code == 0, res.output
    assert {f: (out / f).stat().st_mode & 0o777 for f in files} == {f: 0o664 for f in files}


def test_api_resume_refuses_a_changed_rank(store, tmp_path):
    from lors_fast.engine.distill import run
    from lors_fast.engine.distill_config import load_config

    root, env = store
    os.environ.setdefault("LORS_FAST_CACHE", env["LORS_FAST_CACHE"])
    kw = dict(buffer=str(root / "S"), n_pairs=8, syn_steps=2, mini_batch=4, rank=2, threads=1, progress=False,
              artifacts=False, iterations=1, cache_dir=env["LORS_FAST_CACHE"])
    run(load_config("default", out=str(tmp_path / "r"), **kw))
    with pytest.raises(ValueError, match=r"changed options: --rank 3 \(the checkpoint's run has 2\)"):
        run(load_config("default", out=str(tmp_path / "r2"), resume=str(tmp_path / "r"), **{**kw, "rank": 3}))


def test_canonical_paths(tmp_path, monkeypatch):
    from lors_fast.data.text import canonical_encoder
    from lors_fast.engine.buffer import BufferConfig

    monkeypatch.chdir(tmp_path)
    assert canonical_encoder("hf:bert") == f"hf:{tmp_path / 'bert'}"
    assert canonical_encoder("hf-mean:./m") == f"hf-mean:{tmp_path / 'm'}"
    assert canonical_encoder("open_clip:ViT-B-32:w.pt") == f"open_clip:ViT-B-32:{tmp_path / 'w.pt'}"
    assert canonical_encoder("hash:16") == "hash:16" and canonical_encoder("minilm") == "minilm"
    cfg = BufferConfig(image_arch="nfnet_l0", image_weights="w.pth", text_encoder="hash:8")
    assert cfg.spec(text_dim=8).image_weights == str(tmp_path / "w.pth")


def test_kl_temperature_and_rank_checks():
    import numpy as np

    from lors_fast.core.functional import contrastive_loss
    from lors_fast.core.targets import LowRankSimilarity

    u = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    for bad in (float("nan"), float("inf"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match="kl_temperature must be a finite number > 0"):
            contrastive_loss(u, u, 10.0, torch.eye(4, dtype=torch.float64), kind="kl", kl_temperature=bad)
    assert torch.isfinite(contrastive_loss(u, u, 10.0, torch.eye(4, dtype=torch.float64), kind="kl",
                                           kl_temperature=np.float32(5.0)))
    with pytest.raises(ValueError, match="rank must be a positive int, got True"):
        LowRankSimilarity(4, True)
    s = LowRankSimilarity(np.int64(4), np.int64(2))
    assert s.rank == 2 and type(s.rank) is int and s.left.shape == (4, 2)


def test_distill_needs_no_image_weight_file(tmp_path):
    """The student's parameters come from the trajectories: the store's image_weights file may be gone."""
    from lors_fast.data.datasets import load_split
    from lors_fast.engine.distill import run
    from lors_fast.engine.distill_config import DistillConfig
    from lors_fast.engine.trajectories import TrajectoryStore
    from lors_fast.models import FlatModel, StudentSpec, build_student

    ds = load_split("synthetic", "train", image_size=16, n_images=24)
    emb = torch.nn.functional.normalize(torch.randn(len(ds.captions), 12, generator=torch.Generator().manual_seed(0)))
    w = tmp_path / "w.pt"
    img, _ = build_student(StudentSpec(image_arch="test_resnet", image_size=16, text_dim=12), seed=0)
    torch.save(img.state_dict(), w)
    spec = StudentSpec(image_arch="test_resnet", image_weights=str(w), image_size=16, text_dim=12)
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img), FlatModel(txt)
    store = TrajectoryStore.create(tmp_path / "S", {"spec": spec.to_dict(), "encoder": "hash:12",
                                                   "dataset": ds.fingerprint, "epochs": 2,
                                                   "img_params": fi.describe(), "txt_params": ft.describe()})
    store.write_expert(0, torch.stack([fi.flat()] * 3) + 0.01 * torch.arange(3.0)[:, None],
                       torch.stack([ft.flat()] * 3) + 0.01 * torch.arange(3.0)[:, None])
    w.unlink()
    cfg = DistillConfig(buffer=str(tmp_path / "S"), out=str(tmp_path / "r"), n_pairs=6, syn_steps=1, mini_batch=3,
                        iterations=1, rank=2, progress=False, artifacts=False, threads=1)
    res = run(cfg, dataset=ds, caption_emb=emb)
    assert [m["iteration"] for m in res.metrics] == [1]
