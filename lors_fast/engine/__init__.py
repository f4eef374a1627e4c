"""The distillation engine, one module per stage, each with its typed config:

- :mod:`~lors_fast.engine.trajectories`: the expert-trajectory store;
- :mod:`~lors_fast.engine.buffer`: expert trajectories (``BufferConfig``);
- :mod:`~lors_fast.engine.tesla` / :mod:`~lors_fast.engine.distill`: TESLA / MTT trajectory matching
  (``DistillConfig`` in :mod:`~lors_fast.engine.distill_config`);
- :mod:`~lors_fast.engine.evaluate`: a fresh network trained on a distilled set (``EvalConfig``);
- :mod:`~lors_fast.engine.metrics`: retrieval metrics;
- :mod:`~lors_fast.engine.coreset`: coreset baselines (``CoresetConfig``);
- :mod:`~lors_fast.engine.artifacts`: pictures and caption listings of a run;
- :mod:`~lors_fast.engine.pipeline`: the main job (buffer → distill → eval on the embedded default).

Nothing is imported here: import the modules.
"""
