"""The fused Triton GPU backend: ``TritonPrimitives`` (the LSE and pair-sum primitives of
:mod:`lors_fast.core.compose` as chains of custom ops, forward → backward → double backward).

- :mod:`~lors_fast.ops.triton_kernels`: the kernels (their maths in the docstrings);
- :mod:`~lors_fast.ops.triton_backend`: launch configs and launchers;
- :mod:`~lors_fast.ops.triton_ops`: the ``torch.library`` custom ops and ``TritonPrimitives``;
- :mod:`~lors_fast.ops.tuned_tables` / :mod:`~lors_fast.ops.triton_tuning`: per-GPU launch-config tables and
  the timing that writes them (``lors-fast tune-kernels``).

Triton itself is imported at the first kernel launch, not here.
"""

from lors_fast.ops.triton_ops import TritonPrimitives

__all__ = ["TritonPrimitives"]
