"""The main job end to end (`lors-fast distill` without --buffer): a fast smoke version in the default run,
the full default run as a slow test."""

import json
import os

import pytest
from click.testing import CliRunner
from lors_fast.cli import main

from lors_fast.pipeline import MainJobConfig, format_table


def _invoke(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_main_job_smoke(tmp_path):
    """Tiny everything (64 train images, hash text encoder, 2 iterations): the whole pipeline runs, writes its
    table, results and pictures, and reuses the buffer the second time."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["distill", "--rank", "2", "--n-pairs", "8", "--mini-batch", "4", "--iterations", "2", "--n-train", "64",
            "--text-encoder", "hash:32", "--eval-runs", "1", "--eval-epochs", "2", "--serial", "--no-progress",
            "--out", str(out), "--cache-dir", str(cache)]
    first = _invoke(args)
    rec = json.loads((out / "results.json").read_text())
    assert set(rec["summaries"]) == {"lors", "tm", "random"}
    for s in rec["summaries"].values():
        r = s["final"]["r_mean"]["mean"]
        assert 0.0 <= r <= 100.0
    md = (out / "results.md").read_text()
    assert "LoRS (rank 2)" in md and "random real subset" in md and "TM, no mining" in md
    assert "| set (8 pairs) |" in first
    assert (out / "lors" / "images.png").is_file() and (out / "lors" / "similarity.png").is_file()
    assert any(p.endswith("images.png") for p in rec["pictures"])
    store = rec["buffer"]
    assert os.path.isfile(os.path.join(store, "index.json"))
    # second run: the buffer is reused (no expert retrained), the table is produced again
    mtimes = {f: os.path.getmtime(os.path.join(store, f)) for f in os.listdir(store) if f.startswith("expert_")}
    assert mtimes
    _invoke(args + ["--no-baseline", "--no-random-subset"])
    assert {f: os.path.getmtime(os.path.join(store, f)) for f in mtimes} == mtimes
    rec2 = json.loads((out / "results.json").read_text())
    assert set(rec2["summaries"]) == {"lors"}


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
