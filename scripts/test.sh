#!/usr/bin/env bash
# Sets up (scripts/install.sh) and runs every test: pytest (the Python ops on every backend present,
# Triton kernels through TRITON_INTERPRET=1 when there is no GPU) and the C++ tests through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh

cmake_dir=build/cmake
cmake -S . -B "$cmake_dir" -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$cmake_dir" -j "$(nproc)" >/dev/null
ctest --test-dir "$cmake_dir" --output-on-failure

python -m pytest -q -p no:cacheprovider "$@"
