#!/usr/bin/env bash
# Installs internvl3_engine with its dependencies and builds the compiled extension.
# Keeps an installed torch >= 2.11; otherwise installs torch 2.14.1 (a CUDA 13 build).
# Every other package is installed at the exact version the tests passed with (scripts/constraints.txt,
# written by scripts/pin_dependencies.py): a new release upstream cannot turn a fresh install red.
# INTERNVL3_ENGINE_BUILD=auto|cuda|cpu|none chooses the extension's variant (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python - <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PY
then
  python -m pip install --quiet "torch==2.14.1"
fi
python -m pip install --quiet -c scripts/constraints.txt "triton>=3.6,<3.9" ninja nvidia-ml-py numpy pillow tokenizers \
  pyyaml safetensors transformers tensorboard torchdata av pytest pytest-benchmark hypothesis matplotlib tqdm
# torchvision (transformers' InternVL image and video processors, for the video parity test) is built for one
# torch minor: installed only beside the torch 2.14 it is pinned for; elsewhere that test is skipped.
if python -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.14.') else 1)"; then
  python -m pip install --quiet -c scripts/constraints.txt torchvision
fi
python -m pip install --quiet -c scripts/constraints.txt --no-build-isolation -e .
python -m internvl3_engine info
