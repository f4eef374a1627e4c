"""Test-wide environment: offline hubs, DeepSpeed on CPU, Triton kernels in the interpreter without a GPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

import torch  # noqa: E402

# tuned launch configs: never the developer's own table (~/.cache/lors_fast); tests that need one point
# LORS_FAST_TRITON_CONFIGS at a file of their own
os.environ["LORS_FAST_TRITON_CONFIGS"] = os.path.join(tempfile.mkdtemp(prefix="lors_tuned_"), "none.json")

if not torch.cuda.is_available():
    # run the Triton kernels on CPU tensors (set before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    # Bind the kernels now, in the mode just chosen: @triton.jit reads TRITON_INTERPRET when the module is
    # first imported, so a test that unsets it (monkeypatch) before the first import would otherwise leave
    # compiled-mode kernels behind for every later interpreter test.
    import lors_fast.ops.triton_kernels  # noqa: E402, F401
except ImportError:  # no triton: the triton tests skip themselves
    pass
