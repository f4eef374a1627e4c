"""The loss core: contrastive losses over Z = s·U·Vᵀ (+ b) against an identity, low-rank or dense target.

- :mod:`~lors_fast.core.kinds`: the loss kinds, ε and the clamps, and φ (the pair-loss function) — written once;
- :mod:`~lors_fast.core.targets`: ``LowRankTarget`` and the learnable ``LowRankSimilarity`` / ``FullSimilarity``;
- :mod:`~lors_fast.core.functional`: ``contrastive_loss`` (validation, then dispatch to a backend);
- :mod:`~lors_fast.core.compose`: every kind as torch algebra over two pairwise primitives (LSE, pair sums);
- :mod:`~lors_fast.core.reference`: the materialised oracle;
- :mod:`~lors_fast.core.streaming`: the chunked CPU primitives (never N×N at any derivative order);
- :mod:`~lors_fast.core.losses`: open_clip ``ClipLoss`` / ``SigLipLoss`` drop-ins.
- :mod:`~lors_fast.core.device`: ``--device auto`` (CUDA when available, else CPU), the stages' default.

The fused GPU primitives live in :mod:`lors_fast.ops`. Nothing is imported here: import the modules.
"""
