"""The main job end to end (`lors-fast distill` without --buffer): a fast smoke version in the default run,
the full default run as a slow test."""

import json
import os

import pytest
from click.testing import CliRunner
from lors_fast.cli import main

from lors_fast.engine.pipeline import MainJobConfig, format_table


def _invoke(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_main_job_smoke(tmp_path):
    """Tiny everything (64 train images, hash text encoder, 2 iterations): the whole pipeline runs, writes its
    table, results and pictures; a second run reuses the buffer, and its two-worker schedule (distillations
    and evaluation seeds interleaved over spawn workers, one thread each) computes exactly what the serial
    schedule did with one thread: same distilled tensors, same metrics."""
    import torch
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    args = ["distill", "--rank", "2", "--n-pairs", "8", "--mini-batch", "4", "--iterations", "2", "--n-train", "64",
            "--text-encoder", "hash:32", "--eval-runs", "2", "--eval-epochs", "2", "--no-progress",
            "--cache-dir", str(cache)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = _invoke(args + ["--serial", "--out", str(tmp_path / "serial")])
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "serial"
    rec = json.loads((out / "results.json").read_text())
    assert set(rec["summaries"]) == {"lors", "tm", "random"}
    for s in rec["summaries"].values():
        assert s["runs"] == 2 and 0.0 <= s["final"]["r_mean"]["mean"] <= 100.0
    md = (out / "results.md").read_text()
    assert "LoRS (rank 2)" in md and "random real subset" in md and "TM, no mining" in md
    assert "| set (8 pairs) |" in first
    assert (out / "lors" / "images.png").is_file() and (out / "lors" / "similarity.png").is_file()
    assert any(p.endswith("images.png") for p in rec["pictures"])
    store = rec["buffer"]
    assert os.path.isfile(os.path.join(store, "index.json"))
    # second run, two workers: the buffer is reused (no expert retrained), the same numbers come out
    mtimes = {f: os.path.getmtime(os.path.join(store, f)) for f in os.listdir(store) if f.startswith("expert_")}
    assert mtimes
    par = _invoke(args + ["--parallel", "--no-random-subset", "--out", str(tmp_path / "parallel")])
    assert "2 worker processes" in par
    assert {f: os.path.getmtime(os.path.join(store, f)) for f in mtimes} == mtimes
    rec2 = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert set(rec2["summaries"]) == {"lors", "tm"}
    for name in ("lors", "tm"):
        assert rec2["summaries"][name] == rec["summaries"][name], name
        a, b = ({k: v for k, v in load_file(str(tmp_path / m / name / "distilled.safetensors")).items()
                 if not k.startswith("rng.cpu")} for m in ("serial", "parallel"))  # (the process's global RNG)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_main_job_config_errors():
    with pytest.raises(ValueError, match="rank"):
        MainJobConfig(rank=0)
    with pytest.raises(ValueError, match=r"rank \(20\) must be <= n_pairs \(10\)"):
        MainJobConfig(rank=20, n_pairs=10)
    with pytest.raises(ValueError, match="eval_runs"):
        MainJobConfig(eval_runs=0)


def test_main_job_cli_rejects_bad_option(tmp_path):
    res = CliRunner().invoke(main, ["distill", "--rank", "0", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "rank" in res.output


def test_format_table_shows_mean_and_std():
    m = {k: {"mean": 10.0, "std": 0.5} for k in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10",
                                                  "r_mean")}
    table = format_table({"lors": {"summary": {"val_selected": m, "final": m}}}, MainJobConfig(rank=3))
    assert "| LoRS (rank 3) | 10.00 ± 0.50 |" in table


@pytest.mark.slow
def test_main_job_default_beats_random(tmp_path):
    """The README's main job as a newcomer runs it (`lors-fast distill --rank 10`, everything default)."""
    out = tmp_path / "run"
    _invoke(["distill", "--rank", "10", "--no-progress", "--out", str(out)])
    rec = json.loads((out / "results.json").read_text())
    s = {k: v["val_selected"]["r_mean"]["mean"] for k, v in rec["summaries"].items()}
    assert s["lors"] >= s["random"] + 5.0, s
    # issue 7 target, a regression guard of the default seed only: measured 21.39 vs 21.13 (inside the std;
    # with --seed 1 it is 19.45 vs 19.53, a tie)
    assert s["lors"] >= s["tm"], s


def test_worker_error_stops_the_parallel_schedule(tmp_path):
    """An error inside a worker (here: a distillation whose text encoder does not match the buffer's, found
    only when the worker opens the store) surfaces in the main process as the worker's exception (the queue is
    cancelled and the workers stopped), instead of hanging or being swallowed."""
    import time

    from lors_fast.engine.pipeline import run_main_job

    cfg = MainJobConfig(out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), rank=2, n_pairs=8,
                        iterations=2, eval_runs=1, eval_epochs=2, n_train=64, text_encoder="hash:32",
                        parallel=True, progress=False, distill={"mini_batch": 4, "text_encoder": "hash:16"})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="hash:16"):
        run_main_job(cfg)
    assert time.perf_counter() - t0 < 120, "the schedule hung after a worker error"
