"""Every command's options: help text (a sentence or a real default), click.Path for paths, one option name for
the image root (--data-root; buffer keeps --root as a hidden alias), and distill's --tensorboard."""

from __future__ import annotations

import json
import math
import re

import click
import pytest
import torch
from click.testing import CliRunner
from lors_fast.cli import main


def _commands(group: click.Group, prefix=""):
    for name, cmd in group.commands.items():
        yield prefix + name, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + name + " ")


def test_every_option_has_help():
    bad = []
    for name, cmd in [("", main), *_commands(main)]:
        assert (cmd.help or "").strip(), f"command {name!r} has no help"
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            text = re.sub(r"\[default:[^\]]*\]", "", p.help or "").strip()
            real_default = p.show_default and p.default is not None
            if not (text or real_default) or "[default: None" in (p.help or ""):
                bad.append(f"{name} {p.opts[0]}: {p.help!r}")
    assert not bad, "options without a help sentence or a real default:\n" + "\n".join(bad)


PATH_OPTIONS = {"buffer": ("out", "cache_dir", "root", "ann_root", "image_weights"),
                "distill": ("buffer", "out", "data_root", "ann_root", "cache_dir", "resume", "tensorboard",
                            "config_file"),
                "eval": ("ckpt", "data_root", "ann_root", "cache_dir", "out", "arch_weights"),
                "coreset": ("buffer", "data_root", "ann_root", "cache_dir", "out")}


@pytest.mark.parametrize("command", sorted(PATH_OPTIONS))
def test_path_options_are_click_paths(command):
    params = {p.name: p for p in main.commands[command].params}
    for name in PATH_OPTIONS[command]:
        assert isinstance(params[name].type, click.Path), (command, name, params[name].type)


def test_one_name_for_the_image_root():
    for command in ("buffer", "distill", "eval", "coreset"):
        opts = {o for p in main.commands[command].params for o in p.opts if not getattr(p, "hidden", False)}
        assert "--data-root" in opts and "--root" not in opts, command
    buf = {p.name: p for p in main.commands["buffer"].params}
    assert buf["root_alias"].hidden and buf["root_alias"].opts == ["--root"]


@pytest.mark.parametrize("flag", ["--data-root", "--root"])
def test_buffer_data_root_and_its_alias(tmp_path, flag, monkeypatch):
    seen = {}

    def fake_run(cfg):
        seen["root"] = cfg.root
        return {"rank": 0, "store": cfg.out, "world": 1, "trained": [], "skipped": []}

    monkeypatch.setattr("lors_fast.cli.buffer_cmd.run_buffer", fake_run)
    r = CliRunner().invoke(main, ["buffer", "--preset", "synthetic", flag, str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert seen["root"] == str(tmp_path)


def test_tensorboard_missing_is_one_line(monkeypatch, tmp_path):
    from lors_fast.engine import distill_config

    monkeypatch.setattr(distill_config, "tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match="tensorboard=.* needs the tensorboard package, which is not installed"):
        distill_config.DistillConfig(tensorboard=str(tmp_path))
    r = CliRunner().invoke(main, ["distill", "--preset", "default", "--tensorboard", str(tmp_path / "tb")])
    assert r.exit_code == 2 and "needs the tensorboard package" in r.output and "Traceback" not in r.output


class FakeWriter:
    """Records add_scalar calls as TensorBoard's SummaryWriter would receive them."""

    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = logdir, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_metric(monkeypatch, tmp_path):
    from test_distill_run import make_fixture, tiny_cfg

    from lors_fast.engine import distill, distill_config

    writers = []
    monkeypatch.setattr(distill_config, "tensorboard_available", lambda: True)
    monkeypatch.setattr(distill, "make_metrics_writer", lambda d: writers.append(FakeWriter(d)) or writers[-1])
    torch.set_num_threads(1)
    ds, emb, store = make_fixture(tmp_path)
    cfg = tiny_cfg(tmp_path, store, iterations=2, tensorboard=str(tmp_path / "tb"))
    res = distill.run(cfg, dataset=ds, caption_emb=emb)
    (w,) = writers
    assert w.logdir == str(tmp_path / "tb") and w.closed
    lines = [json.loads(x) for x in (res.out / "metrics.jsonl").read_text().splitlines()]
    want = [(f"distill/{k}", float(v), m["iteration"]) for m in lines for k, v in m.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    def nan_safe(rows):  # NaN != NaN: a diagnostic with no pairs in a bin is logged as NaN on both sides
        return [(tag, "nan" if math.isnan(v) else v, step) for tag, v, step in rows]

    assert nan_safe(w.scalars) == nan_safe(want) and {"distill/loss", "distill/lr_img", "distill/time_s"} <= {t for t, _, _ in want}
