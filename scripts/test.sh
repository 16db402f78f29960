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

# The tests that use transformers again, against the oldest release pyproject's transformers extra allows
# (installed beside the pinned one, with the pinned dependencies), so the range's lower bound stays true.
oldest=$(python -c 'import re, tomllib; extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["transformers"][0]; print(re.search(r">=([0-9.]+)", extra).group(1))')
oldest_dir=build/transformers-$oldest
[ -d "$oldest_dir/transformers" ] || python -m pip install --quiet --no-deps --target "$oldest_dir" "transformers==$oldest"
PYTHONPATH="$oldest_dir" python - "$oldest" <<'PY'
import sys, transformers
assert transformers.__version__ == sys.argv[1], f"expected transformers {sys.argv[1]}, imported {transformers.__version__}"
PY
PYTHONPATH="$oldest_dir" python -m pytest -q -p no:cacheprovider tests/integration/test_transformers.py tests/integration/test_processor_parity.py \
  tests/model/test_model_checkpoint.py tests/parallel/test_planner.py tests/model/test_generation.py::test_greedy_equals_transformers_generate \
  tests/bench/test_bench.py::test_transformers_baseline_computes_our_loss

# The CPU benchmarks (bench/test_cpu.py), each case run once as a test, untimed (timing them:
# bench/results/README.md).
python -m pytest -q -p no:cacheprovider bench/test_cpu.py --benchmark-disable
