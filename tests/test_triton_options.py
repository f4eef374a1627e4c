"""ops/ without mutable module-level toggles: the frozen options and their override blocks, the launch-config
defaults table (one reason per row, every stage × dtype class × architecture)."""

import dataclasses

import pytest
import torch

from lors_fast.ops import launch_defaults, options, strip
from lors_fast.ops import triton_backend as tb


def test_no_module_toggles_left():
    for name in ("FP32_PRECISION", "CONFIG_OVERRIDE", "FWD_FUSED_COLUMNS", "LOWRANK_16BIT", "DBL_FUSED_PRE",
                 "DBL_FUSED_PRE_MAX_BYTES", "LOWRANK_PRECISION", "_INTERPRET_NATIVE_16BIT"):
        assert not hasattr(tb, name), f"triton_backend.{name} is back"


def test_override_is_scoped_and_frozen():
    base = options.current()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.fp32_precision = "ieee"
    with pytest.raises(TypeError):
        base.configs["bwd"] = {}
    with pytest.raises(RuntimeError), options.override(fp32_precision="ieee", configs={"bwd": {"BN": 8}}):
        assert options.current().fp32_precision == "ieee"
        with options.override(configs={("bwd", "float32"): {"BM": 16}}):  # merged into the outer block's
            assert options.current().config_for("bwd", "float32") == {"BN": 8, "BM": 16}
            assert tb._config("bwd", 20, torch.float32, torch.device("cpu")).BM == 16
        with options.override(configs={"fwd": {}}, replace_configs=True):
            assert "bwd" not in options.current().configs
        raise RuntimeError("leave the block by an exception")
    assert options.current() is base, "override not undone after an exception"
    with pytest.raises(ValueError, match="fp32_precision must be"), options.override(fp32_precision="fast"):
        pass
    with strip.override(strip_rows=3):
        assert strip.options().strip_rows == 3
    assert strip.options().strip_rows is None


def test_defaults_table_complete_with_reasons():
    stages = ("fwd", "bwd", "pre", "dbl", "fwd_pair", "bwd_pair", "dbl_pair")
    keys = {(st, dc, a) for st in stages for dc in ("16bit", "32bit") for a in ("sm90", "sm80")}
    assert set(launch_defaults.DEFAULTS) == keys
    for key, (cfg, reason) in launch_defaults.DEFAULTS.items():
        assert isinstance(reason, str) and len(reason) > 5, key
        assert set(cfg) == {"BM", "BN", "BK", "BDO", "num_warps", "num_stages"}, key
    cuda = torch.device("cuda")  # a device object only
    got = tb._config("bwd_pair", 512, torch.bfloat16, cuda, cc=80)
    assert (got.BN, got.BK, got.BDO) == (32, 32, 256), "the sm80 16-bit pair backward row"
    assert tb._config("bwd", 512, torch.bfloat16, cuda, cc=90).QFAST is False
    with pytest.raises(ValueError, match="unknown kernel stage"):
        launch_defaults.default_config("nope", True, 90, True)
