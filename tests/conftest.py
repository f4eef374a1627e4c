"""Test-wide environment: offline hubs, DeepSpeed on CPU, Triton kernels in the interpreter without a GPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # run the Triton kernels on CPU tensors (set before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")
