"""Issue 18: the main job on the many-to-many dataset (`lors-fast distill --dataset synthetic-mm`), LoRS-only
overrides, and the protocol script's cells and paired-difference table (tiny sizes)."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from lors_fast.cli import main

from lors_fast.engine.pipeline import MainJobConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import mining_protocol  # noqa: E402

TINY = ["--rank", "2", "--n-pairs", "8", "--mini-batch", "4", "--iterations", "2", "--n-train", "64",
        "--text-encoder", "hash:32", "--eval-runs", "2", "--eval-epochs", "2", "--no-progress", "--serial"]


def test_main_job_runs_on_synthetic_mm(tmp_path):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, ["distill", "--dataset", "synthetic-mm", "--cache-dir", str(tmp_path / "c"),
                                        "--out", str(tmp_path / "mm"), *TINY], catch_exceptions=False)
    finally:
        torch.set_num_threads(n)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "mm" / "results.json").read_text())
    assert Path(rec["buffer"]).name.startswith("synthetic-mm-")
    assert set(rec["run_r_mean"]) == {"lors", "tm", "random"} and len(rec["run_r_mean"]["tm"]) == 2
    cfg = json.loads((tmp_path / "mm" / "lors" / "config.json").read_text())
    assert cfg["dataset"] == "synthetic-mm"
    ms = [json.loads(x) for x in (tmp_path / "mm" / "lors" / "metrics.jsonl").read_text().splitlines()]
    assert "sim_dS_offdiag" in ms[0] and (tmp_path / "mm" / "lors" / "sim_diagnostics.png").is_file()
    assert "embedded dataset synthetic-mm" in (tmp_path / "mm" / "results.md").read_text()


def test_lors_only_overrides_and_dataset_check(tmp_path):
    from lors_fast.engine.pipeline import _distill_cfg

    cfg = MainJobConfig(out=str(tmp_path), dataset="synthetic-mm", lors_distill={"sim_init_right": 0.01})
    lors = _distill_cfg(cfg, "buf", "lors", "lowrank", 1)
    tm = _distill_cfg(cfg, "buf", "tm", "none", 1)
    assert lors.sim_init_right == 0.01 and tm.sim_init_right == 0.0
    assert lors.dataset == tm.dataset == "synthetic-mm"
    with pytest.raises(ValueError, match="dataset must be 'synthetic' or 'synthetic-mm'"):
        MainJobConfig(dataset="flickr")


def test_protocol_report_pairs_by_evaluation_seed():
    rows = [{"dataset": "d", "seed": 0, "variant": "v", "lors": [3.0, 4.0, 5.0], "tm": [1.0, 2.0, 3.0],
             "random": [0.5, 0.5, 0.5]},
            {"dataset": "d", "seed": 1, "variant": "v", "lors": [2.0, 3.0, 4.0], "tm": [0.0, 1.0, 2.0],
             "random": [0.4, 0.4, 0.4]},
            {"dataset": "d", "seed": 0, "variant": "w", "lors": [1.0, 2.5, 2.0]}]
    table = mining_protocol.report(rows)
    line_v = next(x for x in table.splitlines() if "| v |" in x)
    assert "2.00 ± 0.00 | yes |" in line_v  # every paired difference is +2: it pays
    line_w = next(x for x in table.splitlines() if "| w |" in x)
    assert "| 0,0 |" not in line_w and line_w.endswith("| no |")  # differences 0, 0.5, -1
    assert set(mining_protocol.VARIANTS) >= {"lors-default", "adam-r", "caption-adam", "wbce-paper"}


def test_protocol_labels_loss_matched_experts():
    assert mining_protocol.label("synthetic-mm", 0.3) == "synthetic-mm+soft0.3"
    assert mining_protocol.label("synthetic", 0.0) == "synthetic"
