// CUDA backend (see cuda_backend.h). Device code is only the shared WS_HD functions of
// csrc/maze/rules.h, so the CPU tests exercise the same logic and results are bitwise equal.
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../maze/backend_common.h"
#include "../maze/config.h"
#include "cuda_backend.h"

namespace ws {
namespace {

constexpr int THREADS = 256;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Blocks of a 1-D grid; gridDim.x is at most 2^31 - 1, and a larger count must raise rather than
// wrap in the unsigned cast (a wrapped grid launches fine and silently skips envs).
unsigned grid_blocks(int64_t blocks) {
  if (blocks > 2147483647)
    throw std::invalid_argument("CUDA launch of " + std::to_string(blocks) +
                                " blocks exceeds the 2^31 - 1 grid limit");
  return static_cast<unsigned>(blocks);
}
unsigned blocks_for(int64_t n, int per_block) { return grid_blocks((n + per_block - 1) / per_block); }

template <typename T>
T fetch(const T* device_ptr, cudaStream_t stream) {
  T h{};
  check(cudaMemcpyAsync(&h, device_ptr, sizeof(T), cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return h;
}

// The BFS order of each size, uploaded once per device and kept for the life of the process.
const int32_t* device_bfs_order(int32_t size) {
  static std::mutex mu;
  static std::map<std::pair<int, int32_t>, int32_t*> cache;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(device, size);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const std::vector<int32_t> order = compute_bfs_order(size);
  int32_t* d = nullptr;
  check(cudaMalloc(&d, order.size() * sizeof(int32_t)), "cudaMalloc(bfs_order)");
  check(cudaMemcpy(d, order.data(), order.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
        "cudaMemcpy(bfs_order)");
  // From pageable memory cudaMemcpy may return before the DMA lands, and kernels on a
  // non-blocking stream (PyTorch's) do not wait for the default stream that carried it: wait here
  // (once per device and size) so every later launch on any stream reads the whole table.
  check(cudaStreamSynchronize(0), "cudaStreamSynchronize(bfs_order)");
  cache.emplace(key, d);
  return d;
}

// A stream-ordered 8-byte device flag holding the first bad env index (UINT64_MAX = none).
struct FirstBad {
  unsigned long long* d = nullptr;
  cudaStream_t stream;
  explicit FirstBad(cudaStream_t s) : stream(s) {
    check(cudaMallocAsync(reinterpret_cast<void**>(&d), sizeof(*d), stream), "cudaMallocAsync");
    check(cudaMemsetAsync(d, 0xFF, sizeof(*d), stream), "cudaMemsetAsync");
  }
  ~FirstBad() { cudaFreeAsync(d, stream); }
  // Copies the flag back (waits for the stream); returns -1 when no env was bad.
  int64_t read() {
    const unsigned long long h = fetch(d, stream);
    return h == ~0ull ? -1 : static_cast<int64_t>(h);
  }
};

__global__ void reset_kernel(Config cfg, StateView s, const uint8_t* mask, const int32_t* order,
                             bool advance) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.num_envs || (mask != nullptr && !mask[i])) return;
  if (advance) advance_episode(s, i);
  reset_one_env(cfg, s, i, order);
}

__global__ void validate_step_kernel(Config cfg, StateView s, const int32_t* actions,
                                     unsigned long long* first_bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.num_envs) return;
  if (step_error(cfg, s, i, actions[i]) != STEP_OK)
    atomicMin(first_bad, static_cast<unsigned long long>(i));
}

__global__ void step_kernel(Config cfg, StateView s, const int32_t* actions, StepOut out,
                            const int32_t* order) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.num_envs) return;
  step_and_autoreset(cfg, s, i, actions[i], out, order);
}

// One block per destination: the grid copy is coalesced, thread 0 copies the scalars.
__global__ void clone_kernel(Config cfg, StateView s, int64_t src, int64_t dst_begin,
                             bool independent) {
  const int64_t dst = dst_begin + blockIdx.x;
  const int64_t S2 = static_cast<int64_t>(cfg.size) * cfg.size;
  const uint8_t* from = s.grid + src * S2;
  uint8_t* to = s.grid + dst * S2;
  for (int64_t j = threadIdx.x; j < S2; j += blockDim.x) to[j] = from[j];
  if (threadIdx.x == 0) clone_scalars(s, src, dst, independent);
}

__global__ void observe_kernel(Config cfg, StateView s, ObserveOut out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= s.num_envs) return;
  observe_one_env(cfg, s, i, out);
}

// A warp per env: every lane derives the same fragment list (a few dozen integer ops), then the
// lanes copy each fragment's ids and the padding with consecutive addresses (coalesced stores).
__global__ void render_kernel(Config cfg, StateView s, TokenTable tt, int32_t* out_ids,
                              int32_t* lengths, unsigned long long* first_bad) {
  const int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= s.num_envs) return;
  int32_t frags[MAX_TURN_FRAGMENTS];
  const int32_t nf = turn_fragments(cfg, s, i, frags);
  const int32_t len = nf < 0 ? RENDER_BAD_STATE : fragments_length(tt, frags, nf);
  if (lane == 0) lengths[i] = len;
  if (len < 0 || len > tt.max_len) {
    if (lane == 0) atomicMin(first_bad, static_cast<unsigned long long>(i));
    return;
  }
  int32_t* out = out_ids + i * tt.max_len;
  int32_t k = 0;
  for (int32_t j = 0; j < nf; ++j) {
    const int32_t b = tt.offsets[frags[j]], n = tt.offsets[frags[j] + 1] - b;
    for (int32_t p = lane; p < n; p += 32) out[k + p] = tt.ids[b + p];
    k += n;
  }
  for (int32_t p = k + lane; p < tt.max_len; p += 32) out[p] = tt.pad_id;
}

__global__ void oracle_kernel(Config cfg, StateView s, int64_t begin, int64_t count,
                              int32_t* dist, uint8_t* optimal, int32_t* dist_s, int32_t* queue_s,
                              uint8_t* mask_s) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= count) return;
  const int64_t i = begin + j;
  const int64_t cells = static_cast<int64_t>(cfg.size) * cfg.size;
  oracle_one_env(cfg, s, i, dist + i, optimal + 4 * i, dist_s + j * cells, queue_s + j * cells,
                 mask_s + j * cells);
}

}  // namespace

bool cuda_compiled() { return true; }

void cuda_reset(const PreparedConfig& prepared, const StateView& s, const uint8_t* mask,
                uintptr_t stream, bool advance) {
  const Config& cfg = prepared.get();
  check_state(s);
  if (s.num_envs == 0) return;
  const int32_t* order = device_bfs_order(cfg.size);
  reset_kernel<<<blocks_for(s.num_envs, THREADS), THREADS, 0, as_stream(stream)>>>(cfg, s, mask,
                                                                                    order, advance);
  check(cudaGetLastError(), "reset_kernel");
}

void cuda_step(const PreparedConfig& prepared, const StateView& s, const int32_t* actions,
               const StepOut& out, uintptr_t stream) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_step_out(out, s.num_envs);
  if (s.num_envs == 0) return;
  if (actions == nullptr) throw std::invalid_argument("actions is a null pointer");
  const cudaStream_t st = as_stream(stream);
  const unsigned blocks = blocks_for(s.num_envs, THREADS);
  {
    FirstBad flag(st);
    validate_step_kernel<<<blocks, THREADS, 0, st>>>(cfg, s, actions, flag.d);
    check(cudaGetLastError(), "validate_step_kernel");
    const int64_t bad = flag.read();
    if (bad >= 0) {
      const int32_t a = fetch(actions + bad, st);
      const int32_t r = fetch(s.row + bad, st), c = fetch(s.col + bad, st), t = fetch(s.t + bad, st);
      // Recompute the rule on the host from the fetched values (same function, host side).
      const uint8_t d = fetch(s.done + bad, st);
      StateView one{};
      one.num_envs = 1;
      int32_t hr = r, hc = c, ht = t;
      uint8_t hd = d;
      one.row = &hr;
      one.col = &hc;
      one.t = &ht;
      one.done = &hd;
      const int32_t code = step_error(cfg, one, 0, a);
      throw std::invalid_argument(step_error_message(cfg, code, bad, a, r, c, t));
    }
  }
  step_kernel<<<blocks, THREADS, 0, st>>>(cfg, s, actions, out, device_bfs_order(cfg.size));
  check(cudaGetLastError(), "step_kernel");
}

void cuda_clone(const PreparedConfig& prepared, const StateView& s, int64_t src, int64_t dst_begin,
                int64_t dst_end, bool independent, uintptr_t stream) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_clone_range(s, src, dst_begin, dst_end);
  if (dst_end == dst_begin) return;
  clone_kernel<<<grid_blocks(dst_end - dst_begin), THREADS, 0, as_stream(stream)>>>(
      cfg, s, src, dst_begin, independent);
  check(cudaGetLastError(), "clone_kernel");
}

void cuda_observe(const PreparedConfig& prepared, const StateView& s, const ObserveOut& out,
                  uintptr_t stream) {
  const Config& cfg = prepared.get();
  check_state(s);
  if (s.num_envs == 0) return;
  if (!out.neighbours || !out.order) throw std::invalid_argument("observe: null output pointer");
  observe_kernel<<<blocks_for(s.num_envs, THREADS), THREADS, 0, as_stream(stream)>>>(cfg, s, out);
  check(cudaGetLastError(), "observe_kernel");
}

void cuda_observe(const PreparedConfig& prepared, const StateView& s, int32_t* neighbours,
                  int32_t* order, uintptr_t stream) {
  ObserveOut out;
  out.neighbours = neighbours;
  out.order = order;
  cuda_observe(prepared, s, out, stream);
}

void cuda_render_tokens(const PreparedConfig& prepared, const StateView& s, const TokenTable& tt,
                        int32_t* out_ids, int32_t* lengths, uintptr_t stream) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_token_table(cfg, tt);
  if (s.num_envs == 0) return;
  if (!out_ids || !lengths) throw std::invalid_argument("render_tokens: null output pointer");
  const cudaStream_t st = as_stream(stream);
  FirstBad flag(st);
  render_kernel<<<blocks_for(s.num_envs * 32, THREADS), THREADS, 0, st>>>(cfg, s, tt, out_ids,
                                                                          lengths, flag.d);
  check(cudaGetLastError(), "render_kernel");
  const int64_t bad = flag.read();
  if (bad >= 0)
    throw std::invalid_argument(render_error_message(bad, fetch(lengths + bad, st), tt.max_len));
}

size_t cuda_oracle_scratch_bytes(const PreparedConfig& prepared, int64_t envs) {
  const Config& cfg = prepared.get();
  return oracle_scratch_bytes_per_env(cfg.size) * static_cast<size_t>(envs < 0 ? 0 : envs);
}

void cuda_oracle(const PreparedConfig& prepared, const StateView& s, int32_t* dist, uint8_t* optimal,
                 void* scratch, size_t scratch_bytes, uintptr_t stream) {
  const Config& cfg = prepared.get();
  check_state(s);
  if (s.num_envs == 0) return;
  if (!dist || !optimal) throw std::invalid_argument("oracle: null output pointer");
  const size_t per_env = oracle_scratch_bytes_per_env(cfg.size);
  const int64_t cap = scratch == nullptr ? 0 : static_cast<int64_t>(scratch_bytes / per_env);
  if (cap < 1)
    throw std::invalid_argument("cuda_oracle: scratch of " + std::to_string(scratch_bytes) +
                                " bytes holds no env; need at least " + std::to_string(per_env) +
                                " (cuda_oracle_scratch_bytes(cfg, 1))");
  const cudaStream_t st = as_stream(stream);
  const int64_t cells = static_cast<int64_t>(cfg.size) * cfg.size;
  // Layout of a chunk: dist int32[cap*cells] | queue int32[cap*cells] | mask uint8[cap*cells].
  int32_t* dist_s = static_cast<int32_t*>(scratch);
  int32_t* queue_s = dist_s + cap * cells;
  uint8_t* mask_s = reinterpret_cast<uint8_t*>(queue_s + cap * cells);
  for (int64_t begin = 0; begin < s.num_envs; begin += cap) {
    const int64_t count = std::min<int64_t>(cap, s.num_envs - begin);
    // dist must read -1 (all bytes 0xFF) where unvisited; a coalesced memset beats per-thread
    // clearing. Each chunk reuses the scratch, ordered on the stream.
    check(cudaMemsetAsync(dist_s, 0xFF, static_cast<size_t>(count * cells) * sizeof(int32_t), st),
          "cudaMemsetAsync(oracle scratch)");
    oracle_kernel<<<blocks_for(count, THREADS), THREADS, 0, st>>>(cfg, s, begin, count, dist,
                                                                   optimal, dist_s, queue_s, mask_s);
    check(cudaGetLastError(), "oracle_kernel");
  }
}

}  // namespace ws
