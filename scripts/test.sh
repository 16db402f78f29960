#!/usr/bin/env bash
# Sets up (scripts/install.sh) and runs every test: pytest (the Python ops on every backend present,
# Triton kernels through TRITON_INTERPRET=1 when there is no GPU) and the C++ tests through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh

cmake_dir=build/cmake
mkdir -p "$cmake_dir"
# libtorch's CMake warns at length about things the CPU kernels do not use: keep its log, show it on failure.
cmake -S . -B "$cmake_dir" -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  >"$cmake_dir/configure.log" 2>&1 || { cat "$cmake_dir/configure.log"; exit 1; }
cmake --build "$cmake_dir" -j "$(nproc)" >/dev/null
ctest --test-dir "$cmake_dir" --output-on-failure

python -m pytest -q -p no:cacheprovider "$@"

# The CPU benchmarks (bench/test_cpu.py), each case run once as a test, untimed (timing them:
# bench/results/README.md).
python -m pytest -q -p no:cacheprovider bench/test_cpu.py --benchmark-disable
