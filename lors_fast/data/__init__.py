"""The data side: datasets (:mod:`~lors_fast.data.datasets`: Karpathy JSON, the embedded synthetic default in
:mod:`~lors_fast.data.synthetic`), text encoders and cached caption embeddings (:mod:`~lors_fast.data.text`),
the distilled-set format (:mod:`~lors_fast.data.distilled`), importers of the reference's files
(:mod:`~lors_fast.data.importers`) and atomic, checked file I/O (:mod:`~lors_fast.data.io`).

Nothing is imported here: import the modules.
"""
