"""The options of the fused Triton backend: one frozen value, changed only inside :func:`override` blocks.

``BackendOptions`` replaces the former mutable module globals of ``triton_backend`` (FP32_PRECISION,
CONFIG_OVERRIDE, FWD_FUSED_COLUMNS, LOWRANK_16BIT, DBL_FUSED_PRE, ...). Launchers read :func:`current`;
tests, ``bench/gpu_check.py``, ``bench/aot_check.py`` and :mod:`lors_fast.ops.triton_tuning` change it with
``with override(...)``, which restores it on exit, exceptions included (nothing to save and restore by hand).
The options are process-wide (a stack, not a context variable) so that autograd's device threads running a
backward inside a block see the block's options.

Fields:
  fp32_precision: ``tl.dot`` input precision for fp32 inputs ("tf32" | "ieee" | "tf32x3");
  lowrank_precision: that of the rank-r target tiles (None: "ieee" when the main GEMMs are exact, else "tf32");
  configs: launch-config overrides, ``{stage | (stage, dtype name): {key: value}}`` (later wins over the
      tuned tables and the defaults; :func:`override` merges a ``configs=`` argument into the current one);
  fwd_fused_columns: the LSE forward writes per-row-block column partials (True) or runs a second row pass;
  dbl_fused_pre / dbl_fused_pre_max_bytes: the LSE double backward's pre-pass computes ρ and κ in one pass
      while its partials buffer stays under the byte cap, else in two;
  interpret_native_16bit: tests only — under the interpreter keep 16-bit GEMM operands (the GPU code path).

Experimental, unmeasured on a GPU, kept apart and off by default:
  experimental_lowrank_16bit: rank-r target tiles in the 16-bit input dtype (hi/lo split for S).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from types import MappingProxyType

__all__ = ["BackendOptions", "current", "override"]


def _freeze(configs) -> MappingProxyType:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in dict(configs).items()})


@dataclass(frozen=True)
class BackendOptions:
    fp32_precision: str = "tf32"
    lowrank_precision: str | None = None
    configs: MappingProxyType = field(default_factory=lambda: _freeze({}))
    fwd_fused_columns: bool = True
    dbl_fused_pre: bool = True
    dbl_fused_pre_max_bytes: int = 64 * 2**20
    interpret_native_16bit: bool = False
    experimental_lowrank_16bit: bool = False

    def config_for(self, stage: str, dtype_name: str) -> dict:
        """The override keys of a stage: those of ``stage``, then those of ``(stage, dtype name)``."""
        out = dict(self.configs.get(stage, {}))
        out.update(self.configs.get((stage, dtype_name), {}))
        return out


_STACK: list[BackendOptions] = [BackendOptions()]


def current() -> BackendOptions:
    """The backend options in force (the innermost :func:`override`, else the defaults)."""
    return _STACK[-1]


@contextlib.contextmanager
def override(*, replace_configs: bool = False, **changes):
    """A block with some fields of :class:`BackendOptions` replaced; ``configs=`` is merged into the current
    overrides (``replace_configs=True``: replaces them)."""
    cur = _STACK[-1]
    if "configs" in changes:
        merged = {} if replace_configs else dict(cur.configs)
        merged.update(changes["configs"])
        changes["configs"] = _freeze(merged)
    if changes.get("fp32_precision", "tf32") not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"fp32_precision must be 'ieee', 'tf32' or 'tf32x3', got {changes['fp32_precision']!r}")
    opts = replace(cur, **changes)
    _STACK.append(opts)
    try:
        yield opts
    finally:
        _STACK.pop()
