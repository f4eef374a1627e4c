"""open_clip drop-ins (the documented path): ``from lors_fast.losses import ClipLoss, SigLipLoss``."""

from lors_fast.core.losses import *  # noqa: F401,F403
from lors_fast.core.losses import __all__  # noqa: F401
