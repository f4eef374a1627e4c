"""lors-fast: fast, exact LoRS (low-rank similarity mining) dataset distillation and contrastive losses."""

from lors_fast.core.functional import contrastive_loss
from lors_fast.core.targets import FullSimilarity, LowRankSimilarity, LowRankTarget

__version__ = "0.1.0"

__all__ = ["contrastive_loss", "LowRankTarget", "LowRankSimilarity", "FullSimilarity", "retrieval_metrics",
           "__version__"]


def __getattr__(name):
    # lazy: keeps `import lors_fast` light (no engine imports) while offering the public metric function
    if name == "retrieval_metrics":
        from lors_fast.engine.metrics import retrieval_metrics

        return retrieval_metrics
    raise AttributeError(f"module 'lors_fast' has no attribute {name!r}")
