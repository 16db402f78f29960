#!/usr/bin/env bash
# One script for a lent GPU (the device tool's H100/H200: torch 2.11, triton 3.6, no network), in stages so
# that a 30-minute lease fits in a few calls of at most 10 minutes each. Everything it writes goes to $OUT
# (default ./gpu_out): at most 8 files, logs and tarballs, as the device tool returns them.
#
#   bash scripts/gpu_check.sh build test        # build the extension (sm_90) and run every test on the GPU
#   bash scripts/gpu_check.sh sanitize          # compute-sanitizer memcheck + racecheck over every op
#   bash scripts/gpu_check.sh bench             # python -m bench --suite all --sizes real, tarred
#                                               # (BENCH_ARGS replaces those arguments: a suite or ops at a time)
#   bash scripts/gpu_check.sh profile           # ncu (--clock-control none) of the attention kernels
#                                               # (PROFILE_OPS / PROFILE_KERNELS: other ops, e.g.
#                                               # pixel_unshuffle_layernorm / regex:layernorm)
#   bash scripts/gpu_check.sh blocks            # sweep the attention kernels' block sizes (bench.attention_blocks,
#                                               # compiling in 16 processes first; BLOCKS_CASES='LLM 7B' sweeps
#                                               # one case where all three do not fit in one call)
#
# Stages run in the order given; the build persists on a warm machine between calls. A failing stage is
# reported and the next ones still run; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

stage_build() {
  # The machine's torch is kept (--no-build-isolation, --no-deps): only the extension is built, for Hopper.
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" INTERNVL3_ENGINE_BUILD=cuda MAX_JOBS="${MAX_JOBS:-16}" \
    python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20 || return 1
  python -m internvl3_engine info
  # The machine keeps nothing between leases: the extension comes back, to be carried into the next call.
  cp internvl3_engine/_C*.so "$OUT/" && strip --strip-debug "$OUT"/_C*.so
}

stage_test() {
  # GPU tests first (real sizes, bf16), then the whole suite, where every op test also runs on CUDA: in
  # parallel (pytest-xdist, one file per worker), about 4 minutes on 16 cores; a per-test limit turns a
  # hang into a failure that still gets reported. The machine has no network: the data pipeline's torchdata
  # and PyAV come from carried wheels (pip download --no-deps torchdata==0.11.0 av==18.1.0 -d build/wheels;
  # carry build/wheels).
  for package in torchdata av; do
    python -c "import $package" 2>/dev/null || python -m pip install --no-deps --no-index build/wheels/$package-*.whl 2>&1 | tail -2
  done
  python -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tail -30 || return 1
  python -m pytest -q -p no:cacheprovider -n 14 --dist loadfile --timeout 300 -rfE --tb=short --durations=15 2>&1 | tail -80
}

stage_sanitize() {
  local tool status=0
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 python scripts/ops_smoke.py --device cuda 2>&1 | tail -25 || status=1
  done
  return $status
}

stage_bench() {
  local folder="$OUT/bench_results"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  python -m bench ${BENCH_ARGS:---suite all --sizes real} --out "$folder" 2>&1 | tail -60 || return 1
  tar czf "$OUT/bench_results.tgz" -C "$OUT" bench_results && rm -rf "$folder"
}

stage_profile() {
  # A small ncu pass over one op's kernels at the benchmark's real sizes (default: attention at the 16k-token
  # pack): launch stats, occupancy and the speed-of-light sections, with the card's clocks as found (never locked).
  local ops="${PROFILE_OPS:-v2pe_attention}" kernels="${PROFILE_KERNELS:-regex:attention}"
  ncu --clock-control none --kernel-name "$kernels" --launch-count 6 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis -o "$OUT/profile" \
    python -m bench --suite kernels --sizes real --ops "$ops" --quick --out /tmp/bench_profile 2>&1 | tail -30 || return 1
  ncu --import "$OUT/profile.ncu-rep" --page details 2>&1 | tail -120
}

stage_blocks() {
  # Each candidate launch configuration of each attention kernel, timed by its own device time.
  python -m bench.attention_blocks ${BLOCKS_CASES:+--cases "$BLOCKS_CASES"} --out "$OUT" 2>&1 | tail -70
}

for stage in "$@"; do
  case "$stage" in
    build|test|sanitize|bench|profile|blocks) ;;
    *) echo "unknown stage $stage (build, test, sanitize, bench, profile, blocks)"; exit 2 ;;
  esac
  echo "=== $stage"
  # Each stage returns non-zero at its first failing command (pipefail: the command's status, not tail's).
  if ! "stage_$stage" 2>&1 | tee "$OUT/$stage.log"; then
    failed+=("$stage")
  fi
done
if ((${#failed[@]})); then
  echo "failed stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed: $*"
