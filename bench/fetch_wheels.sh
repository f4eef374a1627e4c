#!/usr/bin/env bash
# Download, into bench/wheels/ (gitignored), the wheels needed to pip-install inf-cl and open_clip_torch
# OFFLINE on the device machine (Python 3.12, Linux x86_64, torch + triton already installed, no internet).
#
#   bash bench/fetch_wheels.sh            # here, with internet (package registry)
#
# torch, torchvision, triton and nvidia-* are NOT downloaded: the packages that require them (inf-cl,
# open_clip_torch, timm) are fetched with --no-deps, their other dependencies explicitly (with their own
# dependency trees, which do not contain torch). gpu_check.py loads open_clip's loss module directly when
# `import open_clip` fails for want of torchvision, so torchvision is not needed for the benchmark.
#
# Offline install on the device (from the repository root; already-installed packages are kept, torch is
# never touched):
#
#   python -m pip install -q --no-index --no-deps --find-links bench/wheels inf-cl open_clip_torch timm
#   python -m pip install -q --no-index --find-links bench/wheels ftfy regex tqdm huggingface_hub safetensors \
#       pyyaml numpy
#
# (the first line: packages that require torch/torchvision/triton, installed without resolving them; the
# second: the rest, resolved from the folder only, so whatever is already installed and satisfies them is kept)
set -euo pipefail

cd "$(dirname "$0")"
DEST=wheels
mkdir -p "$DEST"
PY=${PYTHON:-python}
TARGET=(--python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --implementation cp --only-binary=:all: -d "$DEST")

# 1. the packages that depend on torch / torchvision / triton: without their dependencies
"$PY" -m pip download "${TARGET[@]}" --no-deps inf-cl open_clip_torch "timm>=1.0.17"

# 2. their non-torch dependencies (Requires-Dist of inf-cl: numpy, triton; of open_clip_torch: torch,
#    torchvision, regex, ftfy, tqdm, huggingface-hub, safetensors, timm; of timm: torch, torchvision, pyyaml,
#    huggingface_hub, safetensors), each with its own (torch-free) dependency tree
"$PY" -m pip download "${TARGET[@]}" ftfy regex tqdm huggingface_hub safetensors pyyaml numpy

# guard: nothing from the torch family may have slipped in
if ls "$DEST" | grep -E -i '^(torch|torchvision|triton|nvidia)[-_]' ; then
    echo "error: torch-family wheels in $DEST (listed above)" >&2
    exit 1
fi
ls -l "$DEST"
du -sh "$DEST"
