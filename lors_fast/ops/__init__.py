"""The fused Triton GPU backend: ``TritonPrimitives`` (the LSE and pair-sum primitives of
:mod:`lors_fast.core.compose` as chains of custom ops, forward → backward → double backward).

- :mod:`~lors_fast.ops.triton_kernels`: the kernels (their maths in the docstrings);
- :mod:`~lors_fast.ops.triton_backend`: launch configs and launchers;
- :mod:`~lors_fast.ops.strip` / :mod:`~lors_fast.ops.strip_kernels`: the strip path (library GEMM per
  strip of rows + one Triton epilogue) and the run-time choice between it and the fused kernels
  (``LORS_FAST_TRITON_PATH``, :func:`last_path`);
- :mod:`~lors_fast.ops.triton_ops`: the ``torch.library`` custom ops and ``TritonPrimitives``;
- :mod:`~lors_fast.ops.tuned_tables` / :mod:`~lors_fast.ops.triton_tuning`: per-GPU launch-config tables and
  the timing that writes them (``lors-fast tune-kernels``).

Triton itself is imported at the first kernel launch, not here.
"""

from lors_fast.ops.strip import last_path
from lors_fast.ops.triton_ops import TritonPrimitives

__all__ = ["TritonPrimitives", "last_path"]
