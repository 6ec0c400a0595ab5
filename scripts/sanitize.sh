#!/usr/bin/env bash
# Builds the C++ maze core and its unit tests with AddressSanitizer + UndefinedBehaviorSanitizer
# (-fsanitize=address,undefined -fno-omit-frame-pointer) in a separate build dir, CPU only
# (WELFARE_CUDA=OFF, no Python module), and runs ctest. Any sanitizer report fails the run.
#   usage: scripts/sanitize.sh [build-dir]      (default: build/sanitize)
#   env:   JOBS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build/sanitize}"
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S . -B "$BUILD_DIR" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DWELFARE_CUDA=OFF \
  -DWELFARE_BUILD_PYTHON=OFF \
  -DWELFARE_BUILD_TESTS=ON \
  -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$BUILD_DIR" --output-on-failure
