"""What the GPU script and the pytest benchmarks share about outside providers (no import-time side effects)."""

from __future__ import annotations

import os


def load_clip_loss():
    """open_clip's ClipLoss class and where it came from. Reading: `import open_clip` pulls in torchvision and timm
    (the model zoo); loss.py itself needs only torch, so it is loaded from the installed package on its own when
    the package import fails."""
    try:
        import open_clip
        from open_clip.loss import ClipLoss
        return ClipLoss, f"open_clip {getattr(open_clip, '__version__', '?')}"
    except Exception as e:  # e.g. ModuleNotFoundError: torchvision
        import importlib.util

        spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise
        path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
        mspec = importlib.util.spec_from_file_location("_open_clip_loss_only", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod.ClipLoss, f"{path} loaded alone (import open_clip: {type(e).__name__}: {str(e)[:80]})"
