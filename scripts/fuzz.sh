#!/usr/bin/env bash
# Builds the libFuzzer harness of the C++ maze core (tests/cpp/fuzz_maze.cpp) with Clang and
# -fsanitize=fuzzer,address,undefined (-fno-sanitize-recover=undefined, -fno-omit-frame-pointer) in
# a separate build dir, CPU only (WELFARE_CUDA=OFF, no Python module, WELFARE_BUILD_FUZZ=ON), then
# fuzzes for the given number of seconds with a persistent corpus in <build-dir>/corpus. Any crash,
# sanitizer report, harness check failure, leak or timeout fails the run (non-zero exit); the
# reproducer is written to <build-dir>/artifacts/ (replay: <build-dir>/ws_fuzz_maze <file>).
#   usage: scripts/fuzz.sh [seconds] [build-dir] [-- extra libFuzzer flags]
#          (defaults: 120, build/fuzz)
#   env:   JOBS (build parallelism, default 2), FUZZ_WORKERS (libFuzzer -fork=N worker processes,
#          default 1 = no fork), CXX (default clang++), WS_NO_SIMD=1 (fuzz the portable routines
#          instead of the AVX-512 or AVX2 ones, which are otherwise checked against them)
#   needs: clang and its libFuzzer runtime (Debian: apt-get install -y clang libclang-rt-14-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-120}"
BUILD_DIR="${2:-build/fuzz}"
shift $(( $# < 2 ? $# : 2 ))
if [[ "${1:-}" == "--" ]]; then shift; fi
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S . -B "$BUILD_DIR" \
  -DCMAKE_CXX_COMPILER="${CXX:-clang++}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DWELFARE_CUDA=OFF \
  -DWELFARE_BUILD_PYTHON=OFF \
  -DWELFARE_BUILD_TESTS=OFF \
  -DWELFARE_BUILD_FUZZ=ON \
  -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}" --target ws_fuzz_maze
mkdir -p "$BUILD_DIR/corpus" "$BUILD_DIR/artifacts"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ARGS=(-max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
      -artifact_prefix="$BUILD_DIR/artifacts/")
if [[ "${FUZZ_WORKERS:-1}" -gt 1 ]]; then ARGS+=(-fork="$FUZZ_WORKERS"); fi
"$BUILD_DIR/ws_fuzz_maze" "${ARGS[@]}" "$@" "$BUILD_DIR/corpus"
