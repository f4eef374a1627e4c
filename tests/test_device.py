"""`--device auto` (the default of every stage): CUDA when available, else CPU."""

from __future__ import annotations

import pytest
import torch

from lors_fast.core.device import check_device, resolve_device


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_follows_cuda_availability(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)


def test_explicit_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("gpu", "cuda:x", "meta", 3):
        assert check_device(bad) is not None
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)
    assert check_device("auto") is None and check_device("cuda:0") is None


def test_every_stage_config_defaults_to_auto():
    from lors_fast.engine.buffer import BufferConfig
    from lors_fast.engine.distill_config import DistillConfig, load_config
    from lors_fast.engine.evaluate import EvalConfig

    assert BufferConfig().device == "auto"
    assert BufferConfig.from_preset("synthetic").device == "auto"
    assert DistillConfig().device == "auto" and load_config("default").device == "auto"
    assert EvalConfig().device == "auto"
    for make in (lambda: BufferConfig(device="gpu"), lambda: DistillConfig(device="gpu"),
                 lambda: EvalConfig(device="gpu")):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
            make()


def test_cli_device_defaults_and_env(monkeypatch):
    from click.testing import CliRunner
    from lors_fast.cli import main

    for name in ("buffer", "distill", "eval", "coreset"):
        opt = next(p for p in main.commands[name].params if p.name == "device")
        assert opt.default in ("auto", None) and "auto" in opt.help, (name, opt.default, opt.help)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(main, ["env"])
    assert r.exit_code == 0, r.output
    assert "device (auto)        cpu" in r.output
