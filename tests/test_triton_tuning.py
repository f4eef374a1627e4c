"""`lors-fast tune-kernels` / lors_fast.ops.triton_tuning: timing candidate launch configs, saving the winners,
and the backend picking them up (under the interpreter on CPU: the mechanism, not the speed)."""

import json

import pytest
import torch

pytest.importorskip("triton")

from lors_fast.ops import triton_backend as tb  # noqa: E402
from lors_fast.ops import triton_tuning as tt  # noqa: E402
from lors_fast.ops.options import current, override  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CANDS = {"bwd": [None, dict(BM=32, BN=16, num_warps=4, num_stages=1)],
         "fwd_pair": [None, dict(BM=16, BN=32, num_warps=4, num_stages=1, WD=True)]}


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    p = tmp_path / "tuned.json"
    monkeypatch.setenv(tt.ENV, str(p))
    tt.reset_cache()
    yield p
    tt.reset_cache()


def test_tune_save_and_lookup(table_path):
    res = tt.tune(DEV, torch.float32, d=20, n=40, stages=["bwd", "fwd_pair"], candidates=CANDS)
    assert res["device"] == tt.device_key(DEV) and [e["stage"] for e in res["entries"]] == ["bwd", "fwd_pair"]
    for e in res["entries"]:
        assert len(e["table"]) == 2 and all("ms" in t and t["ms"] > 0 for t in e["table"]), e["table"]
        default, cand = e["table"]
        # the candidate wins only by more than the 3 % margin
        assert e["config"] == ({} if cand["ms"] > 0.97 * default["ms"] else cand["config"])
        assert e["ms"] == (default["ms"] if e["config"] == {} else cand["ms"])
        assert e["key"] == f"{e['stage']}|float32|32"  # d = 20 → DP = 32
    assert not current().configs  # tuning leaves no override behind
    # force a known winner, save, and the backend's config lookup returns it for this device, dtype and DP
    res["entries"][0]["config"] = dict(BM=32, BN=16, num_warps=4, num_stages=1)
    assert tt.save(res) == table_path
    saved = json.loads(table_path.read_text())
    assert saved["devices"][tt.device_key(DEV)]["bwd|float32|32"]["config"]["BN"] == 16
    cfg = tb._config("bwd", 20, torch.float32, torch.device(DEV))
    assert (cfg.BM, cfg.BN, cfg.num_warps) == (32, 16, 4)
    assert tb._config("bwd", 20, torch.bfloat16, torch.device(DEV)).BN != 16  # another dtype: no entry
    assert tb._config("bwd", 600, torch.float32, torch.device(DEV)).BN != 16  # DP = 1024: no entry
    # an options override still wins over the table
    with override(configs={("bwd", "float32"): dict(BN=8)}):
        assert tb._config("bwd", 20, torch.float32, torch.device(DEV)).BN == 8
    # saving again merges (the fwd_pair entry stays, a second dtype is added)
    res["dtype"] = "bfloat16"
    for e in res["entries"]:
        e["key"] = e["key"].replace("float32", "bfloat16")
    tt.save(res)
    keys = set(json.loads(table_path.read_text())["devices"][tt.device_key(DEV)])
    assert {"bwd|float32|32", "fwd_pair|float32|32", "bwd|bfloat16|32", "fwd_pair|bfloat16|32"} <= keys


def test_tuned_configs_stay_correct(table_path):
    # a loss computed under a tuned (non-default) config still matches the reference
    import lors_fast

    dt, tol = (torch.float64, 1e-10) if DEV == "cpu" else (torch.float32, 5e-3)  # (TF32 dots on a GPU)
    res = tt.tune(DEV, dt, d=12, n=24, stages=["bwd"],
                  candidates={"bwd": [dict(BM=16, BN=16, BK=16, BDO=16, num_warps=4, num_stages=1)]})
    tt.save(res)
    assert tb._config("bwd", 12, dt, torch.device(DEV)).BN == 16
    g = torch.Generator().manual_seed(3)
    U = torch.randn(24, 12, generator=g, dtype=torch.float64).to(DEV, dt).requires_grad_(True)
    V = torch.randn(24, 12, generator=g, dtype=torch.float64).to(DEV, dt).requires_grad_(True)
    a = lors_fast.contrastive_loss(U, V, 3.0, kind="infonce", backend="triton")
    b = lors_fast.contrastive_loss(U, V, 3.0, kind="infonce", backend="reference")
    assert abs(float((a - b).detach())) < tol
    for x, y in zip(torch.autograd.grad(a, (U, V)), torch.autograd.grad(b, (U, V))):
        assert float((x - y).abs().max()) < tol


def test_precompile_runs_every_candidate_in_worker_processes(table_path):
    """The parallel warm-up runs each (stage, candidate) once in spawned workers; a failing candidate comes back
    as an error row, not an exception (under the interpreter nothing is compiled: the mechanism only)."""
    cands = {"bwd": CANDS["bwd"], "fwd_pair": CANDS["fwd_pair"] + [dict(BM=16, BN=32, BK=0)]}  # BK 0: fails
    rows = tt.precompile(DEV, torch.float32, d=20, stages=["bwd", "fwd_pair"], candidates=cands, workers=2, n=24)
    assert [(r["stage"], r["config"]) for r in rows] == [
        ("bwd", "default"), ("bwd", CANDS["bwd"][1]), ("fwd_pair", "default"), ("fwd_pair", CANDS["fwd_pair"][1]),
        ("fwd_pair", dict(BM=16, BN=32, BK=0))]
    assert all("error" not in r and r["s"] > 0 for r in rows[:4]), rows
    assert "error" in rows[4], rows[4]
    ex, futs = tt.precompile(DEV, torch.float32, d=20, stages=["bwd"], candidates=CANDS, workers=1, n=24,
                             wait=False)
    try:
        assert len(futs) == 2 and all("error" not in f.result(timeout=300) for f in futs)
    finally:
        ex.shutdown()
    assert not current().configs


def test_bad_tables_and_arguments(table_path):
    table_path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        tt.lookup(DEV, "bwd", torch.float32, 32)
    tt.reset_cache()
    table_path.write_text(json.dumps({"version": 1, "devices": {"cpu": {"bwd|float32|32": {"config": {"XX": 1}}}}}))
    with pytest.raises(ValueError, match="keys among"):
        tt.lookup(DEV, "bwd", torch.float32, 32)
    tt.reset_cache()
    table_path.unlink()
    assert tt.lookup(DEV, "bwd", torch.float32, 32) == {}
    with pytest.raises(ValueError, match="unknown stages"):
        tt.tune(DEV, torch.float32, d=8, n=8, stages=["nope"])
    with pytest.raises(ValueError, match="d and n"):
        tt.tune(DEV, torch.float32, d=0, n=8, stages=["bwd"])


def test_cli_tune_kernels(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from lors_fast.cli import main

    out = tmp_path / "t.json"
    if DEV == "cpu":
        r = CliRunner().invoke(main, ["tune-kernels", "--dtype", "fp32", "--d", "16", "--n", "32", "--stage", "bwd",
                                      "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert "fastest per stage" in r.output and out.exists()
        assert "bwd|float32|16" in json.loads(out.read_text())["devices"]["cpu"]
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        r = CliRunner().invoke(main, ["tune-kernels", "--out", str(out)])
        assert r.exit_code != 0 and "needs a CUDA GPU" in r.output
    r = CliRunner().invoke(main, ["tune-kernels", "--stage", "nope", "--out", str(out)])
    assert r.exit_code != 0 and "unknown stages" in r.output


def test_env_reports_tuned_tables(table_path):
    from click.testing import CliRunner
    from lors_fast.cli import main

    r = CliRunner().invoke(main, ["env", "--full"])
    assert r.exit_code == 0, r.output
    assert "triton configs" in r.output and "user: none" in r.output
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tt.save({"device": tt.device_key(dev), "entries": [dict(key="bwd|float32|32", config={"BN": 16}, ms=1.0, n=8,
                                                             triton="x", date="y")]})
    r = CliRunner().invoke(main, ["env", "--full"])
    assert r.exit_code == 0 and f"1 entries for {tt.device_key(dev)}" in r.output, r.output


@pytest.mark.parametrize("stage", list(tt.CANDIDATES))
def test_every_candidate_config_is_correct(stage, monkeypatch):
    # whatever the GPU tuning picks computes the same values, gradients and second derivatives (interpreter,
    # float64 vs the reference; every candidate of the stage in turn, the stage's own workload kind)
    import lors_fast
    from lors_fast import LowRankTarget

    if DEV == "cuda":
        pytest.skip("float64 kernels are interpreter-only; the GPU check post-checks the tuned configs")
    kind, lowrank = tt.STAGES[stage]
    g = torch.Generator().manual_seed(11)
    n, d, r = 40, 40, 3
    U = torch.randn(n, d, generator=g, dtype=torch.float64).div(d ** 0.5).to(DEV).requires_grad_(True)
    V = torch.randn(n, d, generator=g, dtype=torch.float64).div(d ** 0.5).to(DEV).requires_grad_(True)
    s = torch.tensor(4.0, dtype=torch.float64, device=DEV, requires_grad=True)
    xs = [U, V, s]
    tgt = None
    if lowrank:
        a = torch.rand(n, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
        L = (torch.randn(n, r, generator=g, dtype=torch.float64) * 0.3).to(DEV).requires_grad_(True)
        R = (torch.randn(n, r, generator=g, dtype=torch.float64) * 0.3).to(DEV).requires_grad_(True)
        tgt = LowRankTarget(a, L, R, 1.0 / r)
        xs += [a, L, R]

    def derivs(backend):
        loss = lors_fast.contrastive_loss(U, V, s, tgt, kind=kind, backend=backend)
        g1 = torch.autograd.grad(loss, xs, create_graph=True)
        w = torch.Generator().manual_seed(5)
        f2 = sum((torch.randn(x.shape, generator=w, dtype=torch.float64) * x).sum() for x in g1)
        return [loss.detach()] + [x.detach() for x in g1] + list(torch.autograd.grad(f2, xs))

    ref = derivs("reference")
    for cfg in tt.CANDIDATES[stage]:
        if cfg is None:
            continue
        key = stage.replace("_pair", "")  # applied to every pass of its family, so each kernel runs it
        over = {(st + ("_pair" if stage.endswith("_pair") else ""), "float64"): dict(cfg)
                for st in (("fwd", "bwd", "dbl") if key in ("fwd", "bwd", "dbl") else (key,))}
        if not stage.endswith("_pair"):
            over[("pre", "float64")] = {k: v for k, v in cfg.items() if k != "BDO"}
        with override(configs=over, replace_configs=True):
            got = derivs("triton")
        for i, (a_, b_) in enumerate(zip(got, ref)):
            err = float((a_ - b_).abs().max())
            assert err <= 1e-9 * max(1.0, float(b_.abs().max())), (stage, cfg, i, err)
