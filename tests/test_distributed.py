"""Several expert windows per iteration (--trajectories W) and distillation under torchrun (gloo, 2 ranks).

W = 1 is the single-window iteration bit for bit (an oracle that draws expert, start epoch and plan the way
the one-window loop does); W = 2 is the mean of the two single-window gradients; ``torchrun
--nproc-per-node 2 -m lors_fast.cli distill --trajectories 2`` equals the one-process run, resumes
under torchrun, writes from rank 0 only, and one rank's failure stops both with one message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lors_fast.engine.distill import Distiller, run  # noqa: E402
from lors_fast.engine.distill_config import DistillConfig, load_config  # noqa: E402
from lors_fast.engine.tesla import make_plan, mtt_iteration, tesla_iteration  # noqa: E402

TEXT_DIM = 16
ENCODER = f"hash:{TEXT_DIM}"


from helpers import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def make_store(root: Path, n_experts: int = 3, epochs: int = 3) -> Path:
    """A store of random-walk experts over the synthetic train split (40 images, 8 px), hash:16 captions."""
    from lors_fast.data.datasets import load_split
    from lors_fast.engine.trajectories import TrajectoryStore
    from lors_fast.models import FlatModel, StudentSpec, build_student

    ds = load_split("synthetic", "train", image_size=8, n_images=40, seed=0)
    spec = StudentSpec(image_size=8, convnet_width=4, convnet_depth=1, text_dim=TEXT_DIM)
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img), FlatModel(txt)
    store_dir = root / "store"
    meta = {"spec": spec.to_dict(), "encoder": ENCODER, "dataset": ds.fingerprint, "epochs": epochs,
            "n_train": 40, "img_params": fi.describe(), "txt_params": ft.describe()}
    store = TrajectoryStore.create(store_dir, meta)
    g = torch.Generator().manual_seed(0)
    for e in range(n_experts):
        ti = torch.cat([fi.flat()[None], fi.flat()[None] + (0.05 * torch.randn(epochs, fi.num_params, generator=g)).cumsum(0)])
        tt = torch.cat([ft.flat()[None], ft.flat()[None] + (0.05 * torch.randn(epochs, ft.num_params, generator=g)).cumsum(0)])
        store.write_expert(e, ti, tt)
    store.finalize()
    return store_dir


OPTS = dict(n_pairs=12, syn_steps=3, mini_batch=4, max_start_epoch=2, rank=3, n_train=40, ckpt_every=1,
            text_encoder=ENCODER, loss_backend="reference", threads=1)


def _cfg(root: Path, store: Path, **kw) -> DistillConfig:
    base = dict(OPTS, buffer=str(store), out=str(root / "run"), cache_dir=str(root / "cache"), iterations=3,
                progress=False, artifacts=False)
    return load_config("default", **{**base, **kw})


def _oracle_windows(d: Distiller, w: int):
    """The draws of the first iteration as the one-window loop makes them, window after window."""
    cfg, gen = d.cfg, torch.Generator().manual_seed(d.cfg.seed + 1)
    perm = torch.randperm(len(d.expert_ids), generator=gen)
    out = []
    for j in range(w):
        e = d.expert_ids[int(perm[j])]
        s = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=gen))
        out.append((e, s, make_plan(cfg.n_pairs, cfg.mini_batch, cfg.syn_steps, gen)))
    return out


def _single(d: Distiller, e: int, s: int, plan):
    fn = tesla_iteration if d.cfg.method == "tesla" else mtt_iteration
    return fn(d.student, d.loss_fn, d.images, d.texts, d.slicer, d.lr_img, d.lr_txt, d._snapshot(e, s),
              d._snapshot(e, s + d.cfg.expert_epochs), plan, merge_branches=d.cfg.merge_loss_branches)


def _flat(res) -> list[torch.Tensor]:
    return [res.grad_images, res.grad_texts, res.grad_lr_img, res.grad_lr_txt, *res.grad_sim]


def _flat_grads(g: dict) -> list[torch.Tensor]:
    return [*g["images"], *g["texts"], *g["lrs"], *g["sim"]]


@pytest.mark.parametrize("method", ["tesla", "mtt"])
def test_one_window_bitwise_and_two_windows_are_the_mean(tmp_path, method):
    store = make_store(tmp_path)
    one = Distiller(_cfg(tmp_path, store, method=method))
    (e, s, plan), = _oracle_windows(one, 1)
    ref = _single(one, e, s, plan)
    grads, m = one.gradients()
    assert (m["expert"], m["start_epoch"]) == (e, s)
    for a, b in zip(_flat_grads(grads), _flat(ref)):
        assert torch.equal(a, b)
    assert m["loss"] == ref.loss and m["student_loss"] == ref.student_loss

    two = Distiller(_cfg(tmp_path, store, method=method, trajectories=2))
    draws = _oracle_windows(two, 2)
    assert draws[0][0] != draws[1][0], "two windows of one cycle must use distinct experts"
    r0, r1 = (_single(two, *w) for w in draws)
    grads, m = two.gradients()
    assert m["experts"] == [draws[0][0], draws[1][0]] and m["start_epochs"] == [draws[0][1], draws[1][1]]
    for a, b0, b1 in zip(_flat_grads(grads), _flat(r0), _flat(r1)):
        assert torch.allclose(a, (b0 + b1) / 2, rtol=1e-6, atol=0), float((a - (b0 + b1) / 2).abs().max())
    assert not torch.equal(r0.grad_images, r1.grad_images) and float(r0.grad_images.abs().max()) > 0
    assert abs(m["loss"] - (r0.loss + r1.loss) / 2) <= 1e-12 * abs(m["loss"])


def test_trajectories_validation(tmp_path):
    with pytest.raises(ValueError, match="trajectories must be an int >= 1"):
        DistillConfig(buffer="x", trajectories=0)
    with pytest.raises(ValueError, match="deepspeed_config applies to checkpoint='deepspeed' only"):
        DistillConfig(buffer="x", deepspeed_config="ds.json")


def _torchrun(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _cli_args(cfg: DistillConfig) -> list[str]:
    keys = ("buffer", "out", "cache_dir", "iterations", "trajectories", "n_pairs", "syn_steps", "mini_batch",
            "max_start_epoch", "rank", "n_train", "ckpt_every", "text_encoder", "loss_backend", "threads")
    args = ["-m", "lors_fast.cli", "distill", "--no-progress", "--no-artifacts"]
    for k in keys:
        args += ["--" + k.replace("_", "-"), str(getattr(cfg, k))]
    return args + (["--resume", cfg.resume] if cfg.resume else [])


def _final(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("rng.cpu")}


def test_torchrun_two_ranks_equal_one_process_and_resume(tmp_path):
    store = make_store(tmp_path)
    ref = run(_cfg(tmp_path, store, out=str(tmp_path / "one"), trajectories=2, iterations=4))
    # 2 ranks x 1 window, 2 iterations, then resumed under torchrun to 4
    part = _cfg(tmp_path, store, out=str(tmp_path / "two"), trajectories=2, iterations=2)
    proc = _torchrun(_cli_args(part))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distilled 12 pairs") == 1, proc.stdout  # rank 0 reports, once
    proc = _torchrun(_cli_args(part.replace(iterations=4, resume=str(tmp_path / "two"))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final(ref.checkpoint), _final(tmp_path / "two" / "distilled.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = max(float(a[k].abs().max()), 1e-30)
            err = float((a[k].double() - b[k].double()).abs().max())
            assert err <= 1e-5 * scale, f"{k}: max abs err {err:.3e} vs scale {scale:.3e}"
        else:
            assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3, 4]  # one writer, no duplicate lines
    for m, r in zip(lines, ref.metrics):
        assert m["experts"] == r["experts"] and abs(m["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"])


_FAIL = """
import sys
from lors_fast.engine import distill
from lors_fast.engine.dist import rank_world
from lors_fast.engine.distill_config import load_config
import json
orig = distill.Distiller._window
def window(self, *a):
    if rank_world()[0] == 1 and self.iteration == 1:
        raise FloatingPointError("non-finite student loss in pass 1: [nan]")
    return orig(self, *a)
distill.Distiller._window = window
try:
    distill.run(load_config("default", **json.loads(sys.argv[1])))
except distill.DistillDivergedError as e:
    sys.stdout.write(f"caught: {e}\\n")  # one write (< PIPE_BUF): the two ranks' lines never interleave
    sys.stdout.flush()
    sys.exit(3)
"""


def test_failure_on_one_rank_stops_all_with_one_message(tmp_path):
    store = make_store(tmp_path)
    cfg = _cfg(tmp_path, store, out=str(tmp_path / "fail"), trajectories=2, iterations=3)
    (tmp_path / "w.py").write_text(_FAIL)
    opts = {k: v for k, v in cfg.to_dict().items() if k in (*OPTS, "buffer", "out", "cache_dir", "iterations",
                                                              "trajectories", "progress", "artifacts")}
    proc = _torchrun([str(tmp_path / "w.py"), json.dumps(opts)])
    assert proc.returncode != 0
    msgs = [x for x in proc.stdout.splitlines() if x.startswith("caught")]
    assert len(msgs) == 2 and msgs[0] == msgs[1], proc.stdout + proc.stderr[-2000:]  # both ranks, same message
    assert "rank 1: iteration 2: non-finite student loss" in msgs[0]
    ck = _final(tmp_path / "fail" / "checkpoints" / "last.safetensors")
    assert int(ck["state.iteration"]) == 1  # the last good checkpoint is kept


_EVAL = """
import json, sys
from lors_fast.engine.coreset import CoresetConfig, run as coreset_run
from lors_fast.engine.evaluate import EvalConfig, run as eval_run
a = json.loads(sys.argv[1])
eval_run(EvalConfig(**a["eval"]), progress=print)
coreset_run(CoresetConfig(**{**a["coreset"], "eval": EvalConfig(**a["coreset"]["eval"])}), progress=print)
"""


def test_eval_and_coreset_seeds_over_two_ranks_equal_one_process(tmp_path):
    from lors_fast.engine.coreset import CoresetConfig
    from lors_fast.engine.coreset import run as coreset_run
    from lors_fast.engine.evaluate import EvalConfig
    from lors_fast.engine.evaluate import run as eval_run

    store = make_store(tmp_path)
    d = run(_cfg(tmp_path, store, out=str(tmp_path / "d"), iterations=1))
    proto = dict(runs=3, epochs=2, eval_every=1, dataset="synthetic", text_encoder=ENCODER,
                 cache_dir=str(tmp_path / "cache"))  # 3 seeds on 2 ranks: an uneven split
    ev = dict(proto, ckpt=str(d.checkpoint))
    co = dict(method="random", n=10, dataset="synthetic", text_encoder=ENCODER, cache_dir=str(tmp_path / "cache"),
              buffer=str(store), eval=dict(proto, val_split=None))
    one_e = eval_run(EvalConfig(**ev, out=str(tmp_path / "e1.json")), progress=None)
    one_c = coreset_run(CoresetConfig(**{**co, "out": str(tmp_path / "c1.json"), "eval": EvalConfig(**co["eval"])}),
                        progress=None)
    (tmp_path / "w.py").write_text(_EVAL)
    arg = {"eval": dict(ev, out=str(tmp_path / "e2.json")), "coreset": dict(co, out=str(tmp_path / "c2.json"))}
    proc = _torchrun([str(tmp_path / "w.py"), json.dumps(arg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run 2/3 (seed 1)") == 2, proc.stdout  # eval + coreset, from rank 0 only
    for one, path in ((one_e, "e2.json"), (one_c, "c2.json")):
        two = json.loads((tmp_path / path).read_text())
        assert [r["seed"] for r in two["runs"]] == [0, 1, 2]
        assert two["runs"] == json.loads(json.dumps(one["runs"])) and two["summary"] == json.loads(
            json.dumps(one["summary"]))
