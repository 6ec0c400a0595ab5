#!/usr/bin/env bash
# The one GPU check (run on the lent H100/H200 via the device tool, from the repo root): builds the
# extension with the CUDA backend, runs the CUDA/Triton tests and the GPU benchmarks, and writes
# logs and CSV rows under $OUT (fetched back by the device tool).
#
#   TOKENIZER_DIR=transfer/tokenizer bash bench/gpu_check.sh [STAGE ...]     (device tool, carry ["transfer"])
#
# STAGES, in order of what the open issues need most (default: all of them; rollout only with MODEL_DIR):
#   build     pip install -e . with WELFARE_CUDA=ON (the image has torch/triton and no network)
#   maze      CUDA maze parity tests, then bench_maze.py --device cuda
#   kernels   Triton kernel tests on CUDA, then bench_steer.py --sweep
#   engine    CUDA-graph decode test, then bench_generate.py bf16
#   rollout   the engine and session tests on CUDA, then bench_rollout.py bf16 at 256 envs
#             (needs MODEL_DIR: the bundled model's converted directory, carried in two parts)
#   train     bench_train.py bf16: whole Dr. GRPO steps (rollout + LoRA update), 8 x 32 episodes (MODEL_DIR)
# Stage time limits below add up to ~9 min at worst (typically far less); the device session has
# 15 min including the machine's start. A later call on the still-warm machine can rerun single
# stages (the build stays in the working tree between calls).
#
# TOKENIZER_DIR: the bundled model's tokenizer files (3.5 MB) for the maze's token rendering,
#   mkdir -p transfer/tokenizer && cp ~/.cache/welfare_server/models/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja,config.json} transfer/tokenizer/
# MODEL_DIR (rollout stage): the converted model (540 MB fp32 safetensors) does not fit one call's
#   64 MiB; save it in bf16 (270 MB) and carry it in parts over several calls into /tmp there:
#   python -c "from welfare_server.model.loading import load_model as l; m=l('smollm2-135m-instruct', dtype='bfloat16'); m.model.save_pretrained('transfer/model_bf16'); m.tokenizer.save_pretrained('transfer/model_bf16')"
#   then split -b 60000000 and join under /tmp/model_bf16 on the device, checking the sha256.
# The image has pytest (2026-11); if a future image lacks it, carry pure-Python wheels in
# transfer/wheels (pip download --no-deps -d transfer/wheels pytest pluggy iniconfig).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build maze kernels engine) && [ -n "${MODEL_DIR:-}" ] && STAGES+=(rollout train)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export WELFARE_TOKENIZER_DIR=${TOKENIZER_DIR:-}
TOK_ARGS=()
[ -n "${TOKENIZER_DIR:-}" ] && TOK_ARGS=(--tokenizer "$TOKENIZER_DIR")
SUMMARY="$OUT/summary.txt"

note() { echo "$*" | tee -a "$SUMMARY"; }
# run NAME SECONDS CMD...: runs with a time limit, logs to $OUT/NAME.log, records rc and seconds.
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)"
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
if ! python -c "import pytest" 2>/dev/null && [ -d transfer/wheels ]; then
  pip install --no-index --no-deps transfer/wheels/*.whl > "$OUT/wheels.log" 2>&1
fi

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      WELFARE_CUDA=ON run build 240 pip install --no-build-isolation --no-deps -e . || { tail -40 "$OUT/build.log"; exit 1; }
      python -c "from welfare_server import _maze_core as c; assert c.cuda_compiled(); print('cuda backend compiled')" | tee -a "$SUMMARY"
      ;;
    maze)
      run pytest_maze 90 python -m pytest -q -x tests/maze/test_cuda_backend.py; tail -3 "$OUT/pytest_maze.log"
      run bench_maze 90 python bench/bench_maze.py --device cuda "${TOK_ARGS[@]}" --out "$OUT/maze.csv"
      ;;
    kernels)
      run pytest_kernels 120 python -m pytest -q tests/kernels; tail -3 "$OUT/pytest_kernels.log"
      run bench_steer 110 python bench/bench_steer.py --device cuda --sweep --budget-s 95 --out "$OUT/steer.csv"
      ;;
    engine)
      run pytest_engine 90 python -m pytest -q tests/model/test_equality.py -k "cuda_graph"; tail -3 "$OUT/pytest_engine.log"
      # The targets' batch sizes first (1 and 128), so a cut-short run keeps them.
      run bench_generate 170 python bench/bench_generate.py --device cuda --dtype bfloat16 --batches 1,128,8,32,256 \
        --repeats 2 --budget-s 120 --out "$OUT/generate.csv"
      ;;
    rollout)
      run pytest_rollout 120 python -m pytest -q -x tests/model/test_sessions.py tests/model/test_streaming.py \
        tests/train/test_rollout.py -k "not bundled_model"; tail -3 "$OUT/pytest_rollout.log"
      [ -n "${MODEL_DIR:-}" ] && run bench_rollout 200 python bench/bench_rollout.py --model "$MODEL_DIR" --device cuda \
        --dtype bfloat16 --envs 256,64 --no-reference --budget-s 150 --out "$OUT/rollout.csv"
      ;;
    train)
      # Policy moves/s of whole Dr. GRPO steps (rollout + LoRA update) in bf16: 8 mazes x 32 episodes.
      [ -n "${MODEL_DIR:-}" ] && run bench_train 200 python bench/bench_train.py --model "$MODEL_DIR" --device cuda \
        --dtype bfloat16 --preset paper --groups 8 --group-size 32 --train-steps 1 --no-reference --out "$OUT/train.csv"
      ;;
    *) echo "unknown stage $stage (build, maze, kernels, engine, rollout, train)"; exit 2 ;;
  esac
done
for f in "$OUT"/bench_*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 25 "$f"; }; done
echo "== summary"; cat "$SUMMARY"
