"""Every user-facing failure of buffer / distill / eval / coreset / import-buffer: one line ``Error: ...`` naming
the bad value, exit 1 (2 for usage errors), no traceback (only with --debug); plus resume from the stored
config, divergence / dead-run stops and checkpoint validation, on a tiny real store made by the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lors_fast.cli import main

SYS_DENIED = Path("/sys/lors_fast_denied")  # writing under /sys is refused even to root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 1-expert store S (hash:16 encoder, 64 train images) and a 2-iteration distill run R."""
    root = tmp_path_factory.mktemp("cli_errors")
    cache = root / "cache"
    e = {"LORS_FAST_CACHE": str(cache), "LORS_FAST_DEBUG": ""}
    r = CliRunner().invoke(main, ["buffer", "--dataset", "synthetic", "--out", str(root / "S"), "--experts", "1",
                                  "--epochs", "2", "--n-train", "64", "--batch-size", "32", "--text-encoder",
                                  "hash:16", "--eval-split", "none", "--threads", "1", "--no-progress"], env=e)
    assert r.exit_code == 0, r.output
    ns = {"root": root, "S": root / "S", "R": root / "R", "env": e}
    r = CliRunner().invoke(main, ["distill", *base(ns), "--out", str(ns["R"]), "--iterations", "2"], env=e)
    assert r.exit_code == 0, r.output
    return ns


def base(ns) -> list[str]:
    return ["--buffer", str(ns["S"]), "--n-pairs", "8", "--syn-steps", "2", "--mini-batch", "4", "--iterations",
            "6", "--rank", "2", "--threads", "1", "--no-progress", "--no-artifacts"]


def check(ns, args, code, *needles, debug=False):
    """Run the CLI; assert the exit code, exactly one `Error:` line containing every needle, no traceback."""
    res = CliRunner().invoke(main, [str(a) for a in args], env=ns["env"])
    out = res.output
    assert res.exit_code == code, f"exit {res.exit_code} != {code} for {args}:\n{out}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r} for {args}"
    lines = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, f"expected one Error line for {args}:\n{out}"
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    assert ("Traceback" in out) == debug, out
    return lines[0]


# ---------------------------------------------------------------------------------------------- distill
def test_distill_store_errors(env, tmp_path):
    b = [a for a in base(env) if a not in ("--buffer", str(env["S"]))]
    out = ["--out", tmp_path / "o"]
    check(env, ["distill", *b, *out, "--buffer", "/nonexistent/store"], 1, "/nonexistent/store", "not found")
    (tmp_path / "empty").mkdir()
    check(env, ["distill", *b, *out, "--buffer", tmp_path / "empty"], 1, "index not found", tmp_path / "empty")
    noexp = tmp_path / "noexp"
    noexp.mkdir()
    shutil.copy(env["S"] / "index.json", noexp / "index.json")
    check(env, ["distill", *b, *out, "--buffer", noexp], 1, "holds no finished expert", noexp)
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "index.json").write_text("{not json")
    check(env, ["distill", *b, *out, "--buffer", bad], 1, "malformed JSON", bad / "index.json")


def test_distill_value_errors(env, tmp_path):
    b, o = base(env), tmp_path / "o"
    check(env, ["distill", *b, "--out", o, "--n-pairs", "100000"], 1, "n_pairs=100000", "captions")
    f = tmp_path / "afile"
    f.write_text("x")
    check(env, ["distill", *b, "--out", f], 2, str(f), "is a file")  # click.Path: a usage error
    check(env, ["distill", *b, "--out", f / "sub"], 1, str(f), "not a folder")
    check(env, ["distill", *b, "--out", o, "--text-encoder", "hash:32"], 1, "text encoder", "hash:32")
    check(env, ["distill", *b, "--out", o, "--data-seed", "3"], 1, "dataset fingerprint")
    check(env, ["distill", *b, "--out", o, "--rank", "0"], 2, "rank", "0")
    check(env, ["distill", *b, "--out", o, "--config", tmp_path / "none.toml"], 2, "none.toml", "not found")
    check(env, ["distill", *b, "--out", o, "--clip-grad", "images"], 2, "GROUP=MAXNORM", "'images'")
    if not torch.cuda.is_available():
        check(env, ["distill", *b, "--out", o, "--device", "cuda"], 1, "'cuda'", "CUDA is not available")
    if Path("/sys").is_dir():
        check(env, ["distill", *b, "--out", SYS_DENIED / "run"], 1, str(SYS_DENIED / "run"), "cannot create")


def test_debug_prints_the_traceback(env, tmp_path, monkeypatch):
    args = ["distill", *base(env), "--out", tmp_path / "o", "--n-pairs", "100000"]
    check(env, [*args, "--debug"], 1, "n_pairs=100000", debug=True)
    env2 = {**env, "env": {**env["env"], "LORS_FAST_DEBUG": "1"}}
    check(env2, args, 1, "n_pairs=100000", debug=True)


def test_resume_errors(env, tmp_path):
    R = env["R"]
    check(env, ["distill", "--resume", tmp_path / "nope"], 1, str(tmp_path / "nope"), "no such run folder")
    check(env, ["distill", "--resume", R, "--rank", "3"], 1, "--rank 3", "the run has 2")
    line = check(env, ["distill", "--resume", R, "--lr-img", "5000", "--alpha", "7", "--seed", "9"], 1,
                 "--lr-img 5000.0", "--alpha 7.0", "--seed 9", "--iterations")
    assert "--rank" not in line
    check(env, ["distill", "--resume", R, "--out", tmp_path / "other"], 1, "differs from the run", str(R))
    (tmp_path / "fresh").mkdir()
    check(env, ["distill", "--resume", tmp_path / "fresh"], 1, "last.safetensors", "not found")
    nocfg = tmp_path / "nocfg" / "checkpoints"
    nocfg.mkdir(parents=True)
    shutil.copy(R / "checkpoints" / "last.safetensors", nocfg / "last.safetensors")
    check(env, ["distill", "--resume", nocfg.parent], 1, "config.json", "not found")


def test_resume_alone_from_another_directory(env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(env["R"], run)
    monkeypatch.chdir(tmp_path)  # the store path recorded in config.json is absolute
    res = CliRunner().invoke(main, ["distill", "--resume", "run", "--iterations", "3"], env=env["env"])
    assert res.exit_code == 0, res.output
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["iterations"] == 3


@pytest.mark.parametrize("extra,needle", [
    (["--lr-img", "1e30"], "diverged"),
    (["--lr-txt", "1e30"], "dead run: every gradient has been exactly 0"),
    (["--init-lr-img", "1e6", "--init-lr-txt", "1e6"], "exceeded loss_bound=100"),
])
def test_divergence_and_dead_runs_exit_1(env, tmp_path, extra, needle):
    from safetensors import safe_open

    out = tmp_path / "d"
    check(env, ["distill", *base(env), "--out", out, "--ckpt-every", "1", *extra], 1, needle, "last good checkpoint")
    with safe_open(str(out / "checkpoints" / "last.safetensors"), "pt") as f:  # the kept checkpoint is finite
        for k in ("image", "text", "lr_img", "lr_txt"):
            assert torch.isfinite(f.get_tensor(k)).all(), k
    assert not (out / "distilled.safetensors").exists()


def test_dead_run_check_can_be_switched_off(env, tmp_path):
    res = CliRunner().invoke(main, ["distill", *base(env), "--out", tmp_path / "d", "--iterations", "5",
                                    "--lr-txt", "1e30", "--no-dead-run-check"], env=env["env"])
    assert res.exit_code == 0, res.output
    norms = [json.loads(x)["grad_norm_texts"] for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert len(norms) == 5 and norms[-1] == 0.0


# ---------------------------------------------------------------------------------------------- buffer
def test_buffer_errors(env, tmp_path):
    b = ["buffer", "--dataset", "synthetic", "--n-train", "64", "--experts", "1", "--epochs", "1",
         "--text-encoder", "hash:16", "--no-progress"]
    f = tmp_path / "file"
    f.write_text("x")
    check(env, [*b, "--out", f], 2, str(f), "is a file")
    check(env, [*b, "--out", f / "sub"], 1, str(f), "not a folder")
    check(env, [*b, "--out", tmp_path / "o", "--experts", "0"], 1, "experts must be a positive int, got 0")
    check(env, [*b, "--out", tmp_path / "o", "--batch-size", "1"], 1, "batch_size", "got 1")
    check(env, [*b, "--out", tmp_path / "o", "--text-encoder", "bogus"], 1, "'bogus'", "expected 'minilm'")
    check(env, [*b, "--out", tmp_path / "o", "--text-encoder", "hf:/nonexistent/bert"], 1, "/nonexistent/bert")
    check(env, [*b, "--out", tmp_path / "o", "--image-arch", "nfnet_l0", "--image-weights", tmp_path / "w.pth"], 1, "w.pth", "not found")
    check(env, [*b, "--out", tmp_path / "o", "--lr-img", "-1"], 1, "lr_img", "-1")
    if not torch.cuda.is_available():
        check(env, [*b, "--out", tmp_path / "o", "--device", "cuda"], 1, "'cuda'", "CUDA is not available")
    if Path("/sys").is_dir():
        check(env, [*b, "--out", SYS_DENIED], 1, str(SYS_DENIED), "cannot create")
    # re-running into a store with a different config is refused by name
    check(env, [*b, "--epochs", "2", "--batch-size", "32", "--eval-split", "none", "--out", env["S"],
                "--lr-img", "0.2"], 1, "lrs", "another --out")


def test_buffer_hf_folder_without_tokenizer(env, tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                     intermediate_size=8, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    check(env, ["buffer", "--dataset", "synthetic", "--n-train", "64", "--experts", "1", "--epochs", "1",
                "--text-encoder", f"hf:{tmp_path / 'bert'}", "--out", tmp_path / "o", "--no-progress"], 1,
          str(tmp_path / "bert"), "no usable tokenizer")


def test_buffer_eval_split_none_is_honoured(monkeypatch, tmp_path):
    import lors_fast.cli.buffer_cmd as bc

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"rank": 0, "store": cfg.out, "world": 1, "trained": [], "skipped": []}

    monkeypatch.setattr(bc, "run_buffer", fake)
    for split, want in (("none", None), ("val", "val"), (None, "test")):
        args = ["buffer", "--out", str(tmp_path / "o"), "--text-encoder", "hash:8"]
        res = CliRunner().invoke(main, args + (["--eval-split", split] if split else []))
        assert res.exit_code == 0, res.output
        assert seen["cfg"].eval_split == want


# ---------------------------------------------------------------------------------------------- eval
def _ckpt_variant(env, tmp_path, name, *, drop=(), replace=None, info=None):
    from safetensors.torch import load_file, save_file

    src = env["R"] / "distilled.safetensors"
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    t = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    t.update(replace or {})
    d = json.loads(meta["lors_fast"])
    if info is not None:
        d = info(d)
    meta["lors_fast"] = json.dumps(d)
    p = tmp_path / f"{name}.safetensors"
    save_file(t, str(p), metadata=meta)
    return p


def test_eval_checkpoint_validation(env, tmp_path):
    def ev(p, *needles, extra=()):
        check(env, ["eval", "--ckpt", p, "--runs", "1", "--epochs", "1", *extra], 1, str(p), *needles)

    ev(tmp_path / "missing.safetensors", "not found")
    (tmp_path / "x.txt").write_text("x")
    ev(tmp_path / "x.txt", "unknown checkpoint type")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    ev(tmp_path / "junk.safetensors", "not a readable safetensors file")
    ev(_ckpt_variant(env, tmp_path, "nolr", drop=("lr_img",)), "missing tensors ['lr_img']")
    ev(_ckpt_variant(env, tmp_path, "bogus", info=lambda d: {**d, "similarity": "bogus"}),
       "'similarity' is 'bogus'")
    ev(_ckpt_variant(env, tmp_path, "nosim", info=lambda d: {k: v for k, v in d.items() if k != "similarity"}),
       "'similarity' is missing")
    ev(_ckpt_variant(env, tmp_path, "vec", replace={"lr_img": torch.ones(2)}), "'lr_img' must be one finite number")
    ev(_ckpt_variant(env, tmp_path, "nan", replace={"lr_txt": torch.tensor(float("nan"))}),
       "'lr_txt' must be one finite number")
    ev(_ckpt_variant(env, tmp_path, "left", replace={"sim.left": torch.zeros(8, 5)}), "'sim.left'", "(8, 2)")
    ev(_ckpt_variant(env, tmp_path, "rank", info=lambda d: {**d, "rank": 0}), "'rank' is 0")
    ev(_ckpt_variant(env, tmp_path, "loss", info=lambda d: {**d, "loss": "nope"}), "'loss' is 'nope'")
    ev(_ckpt_variant(env, tmp_path, "spec", info=lambda d: {**d, "spec": {"bogus": 1}}), "'spec'", "bogus")
    ev(_ckpt_variant(env, tmp_path, "schema", info=lambda d: {**d, "schema": "x/9"}), "schema 'x/9'")


def test_eval_output_and_device_checked_before_training(env, tmp_path):
    ck = env["R"] / "distilled.safetensors"
    e = ["eval", "--ckpt", ck, "--runs", "1", "--epochs", "1"]
    (tmp_path / "dir").mkdir()
    check(env, [*e, "--out", tmp_path / "dir"], 2, str(tmp_path / "dir"), "is a directory")
    (tmp_path / "f").write_text("x")
    check(env, [*e, "--out", tmp_path / "f" / "r.json"], 1, str(tmp_path / "f"), "not a folder")
    if Path("/sys").is_dir():  # the final write would fail: refused before any training
        check(env, [*e, "--out", SYS_DENIED.with_suffix(".json")], 1, "/sys", "Permission denied")
    if not torch.cuda.is_available():
        check(env, [*e, "--device", "cuda"], 1, "'cuda'", "CUDA is not available")
    check(env, [*e, "--loss", "bogus"], 1, "loss must be one of", "'bogus'")
    check(env, [*e, "--runs", "0"], 1, "runs must be an int >= 1, got 0")


# ---------------------------------------------------------------------------------------------- coreset
def test_coreset_errors(env, tmp_path):
    c = ["coreset", "--runs", "1", "--epochs", "1", "--text-encoder", "hash:16"]
    check(env, [*c, "--buffer", "/nonexistent"], 1, "/nonexistent", "not found")
    (tmp_path / "nostore").mkdir()
    check(env, [*c, "--buffer", tmp_path / "nostore"], 1, str(tmp_path / "nostore"), "index.json")
    check(env, [*c, "--method", "forgetting"], 1, "forgetting", "needs buffer")
    check(env, [*c, "--n", "0"], 1, "n must be a positive int, got 0")
    (tmp_path / "d").mkdir()
    check(env, [*c, "--out", tmp_path / "d"], 2, str(tmp_path / "d"), "is a directory")
    (tmp_path / "f").write_text("x")
    check(env, [*c, "--out", tmp_path / "f" / "r.json"], 1, str(tmp_path / "f"), "not a folder")
    check(env, [*c, "--method", "bogus"], 2, "'bogus'")


# ---------------------------------------------------------------------------------------------- import-buffer
def test_import_buffer_errors(env, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    check(env, ["import-buffer", src, out, "--spec-json", "[1,2]"], 2, "--spec-json", "JSON object", "[1,2]")
    check(env, ["import-buffer", src, out, "--spec-json", "{bad"], 2, "--spec-json", "not valid JSON")
    check(env, ["import-buffer", src, out, "--spec-json", '{"bogus": 1}'], 2, "--spec-json", "bogus")
    check(env, ["import-buffer", tmp_path / "nope", out], 1, str(tmp_path / "nope"), "not found")
    check(env, ["import-buffer", src, out], 1, "no img_replay_buffer", str(src))
    assert not out.exists()
