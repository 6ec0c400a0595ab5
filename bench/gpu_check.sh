#!/usr/bin/env bash
# The one GPU check (run on the lent H100/H200 via the device tool, from the repo root):
# builds the extension with the CUDA backend, runs the CUDA/Triton tests and the GPU benchmarks,
# and writes logs and CSV rows under $OUT (fetched back by the device tool).
# The GPU image has torch/triton/transformers preinstalled and no network, hence --no-build-isolation.
# TOKENIZER_DIR: a HF tokenizer directory carried to the machine (the bundled model's tokenizer files,
# 3.5 MB), prepared here with
#   mkdir -p transfer/tokenizer && cp ~/.cache/welfare_server/models/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja,config.json} transfer/tokenizer/
# The image has no pytest: carry pure-Python wheels too, prepared here with
#   pip download --no-deps -d transfer/wheels pytest pluggy iniconfig
# and run there as: TOKENIZER_DIR=transfer/tokenizer bash bench/gpu_check.sh  (device tool, carry ["transfer"]).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
WELFARE_CUDA=ON pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
python -c "from welfare_server import _maze_core as c; assert c.cuda_compiled(); print('cuda backend compiled')"
if ! python -c "import pytest" 2>/dev/null && [ -d transfer/wheels ]; then
  pip install --no-index --no-deps transfer/wheels/*.whl > "$OUT/wheels.log" 2>&1
fi
TOK_ARGS=()
export WELFARE_TOKENIZER_DIR=${TOKENIZER_DIR:-}
[ -n "${TOKENIZER_DIR:-}" ] && TOK_ARGS=(--tokenizer "$TOKENIZER_DIR")
timeout 240 python -m pytest -q tests/kernels tests/maze/test_cuda_backend.py "tests/model/test_equality.py::test_cuda_graph_decode_matches_eager" > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; tail -5 "$OUT/pytest_gpu.log"
timeout 120 python bench/bench_steer.py --device cuda --out "$OUT/steer.csv" > "$OUT/bench_steer.log" 2>&1; echo "bench_steer rc=$?"
timeout 120 python bench/bench_maze.py --device cuda "${TOK_ARGS[@]}" --out "$OUT/maze.csv" > "$OUT/bench_maze.log" 2>&1; echo "bench_maze rc=$?"
timeout 180 python bench/bench_generate.py --device cuda --dtype bfloat16 --out "$OUT/generate.csv" > "$OUT/bench_generate.log" 2>&1; echo "bench_generate rc=$?"
tail -n 30 "$OUT"/bench_*.log
