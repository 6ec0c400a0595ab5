#include "cpu_backend.h"

#include <atomic>
#include <stdexcept>
#include <vector>

#include "backend_common.h"
#include "config.h"
#include "cpu_sampler.h"
#include "thread_pool.h"

namespace ws {
namespace {

// Envs per thread below which a call stays on fewer threads: waking a pooled worker costs a few
// microseconds, so cheap per-env work only splits at large batches (measured at size 100, B=1024,
// one core of the AMD EPYC dev VM: a step is ~14 ns per env, step + render ~90 ns). Generation is
// 9-45 us per env (by routine and CPU), so resets (and autoresetting steps) split at once.
constexpr int64_t MIN_RESET = 1;
constexpr int64_t MIN_STEP = 2048;
constexpr int64_t MIN_OBSERVE = 4096;
constexpr int64_t MIN_RENDER = 512;
constexpr int64_t MIN_ORACLE = 8;

}  // namespace

void cpu_reset(const PreparedConfig& prepared, const StateView& s, const uint8_t* mask,
               int num_threads, bool advance) {
  const Config& cfg = prepared.get();
  check_state(s);
  const int32_t* order = cached_bfs_order(cfg.size);
  const CpuSampler sampler;
  parallel_for(s.num_envs, num_threads, MIN_RESET, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (mask == nullptr || mask[i]) {
        if (advance) advance_episode(s, i);
        reset_one_env(cfg, s, i, order, sampler);
      }
  });
}

void cpu_step(const PreparedConfig& prepared, const StateView& s, const int32_t* actions,
              const StepOut& out, int num_threads) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_step_out(out, s.num_envs);
  if (s.num_envs > 0 && actions == nullptr)
    throw std::invalid_argument("actions is a null pointer");
  // Validation pass first (serial: a compare per env), so a rejected call changes nothing.
  for (int64_t i = 0; i < s.num_envs; ++i) {
    const int32_t code = step_error(cfg, s, i, actions[i]);
    if (code != STEP_OK)
      throw std::invalid_argument(
          step_error_message(cfg, code, i, actions[i], s.row[i], s.col[i], s.t[i]));
  }
  const int32_t* order = cached_bfs_order(cfg.size);
  // With autoreset, a batch whose episodes end together regenerates every maze in this call, so
  // split it like a reset when that can happen (all envs share one episode length).
  const int64_t min_per = cfg.autoreset ? MIN_RESET : MIN_STEP;
  const CpuSampler sampler;
  parallel_for(s.num_envs, num_threads, min_per, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      step_and_autoreset(cfg, s, i, actions[i], out, order, sampler);
  });
}

void cpu_clone(const PreparedConfig& prepared, const StateView& s, int64_t src, int64_t dst_begin,
               int64_t dst_end, bool independent) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_clone_range(s, src, dst_begin, dst_end);
  for (int64_t d = dst_begin; d < dst_end; ++d) clone_one_env(cfg, s, src, d, independent);
}

void cpu_observe(const PreparedConfig& prepared, const StateView& s, const ObserveOut& out,
                 int num_threads) {
  const Config& cfg = prepared.get();
  check_state(s);
  if (s.num_envs > 0 && (!out.neighbours || !out.order))
    throw std::invalid_argument("observe: null output pointer");
  parallel_for(s.num_envs, num_threads, MIN_OBSERVE, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) observe_one_env(cfg, s, i, out);
  });
}

void cpu_observe(const PreparedConfig& prepared, const StateView& s, int32_t* neighbours,
                 int32_t* order, int num_threads) {
  ObserveOut out;
  out.neighbours = neighbours;
  out.order = order;
  cpu_observe(prepared, s, out, num_threads);
}

void cpu_render_tokens(const PreparedConfig& prepared, const StateView& s, const TokenTable& tt,
                       int32_t* out_ids, int32_t* lengths, int num_threads) {
  const Config& cfg = prepared.get();
  check_state(s);
  check_token_table(cfg, tt);
  if (s.num_envs > 0 && (!out_ids || !lengths))
    throw std::invalid_argument("render_tokens: null output pointer");
  // The table is host memory here, so its offsets can be checked (they index ids).
  if (tt.offsets[0] < 0)
    throw std::invalid_argument("TokenTable.offsets[0] must be >= 0");
  for (int32_t f = 0; f < tt.num_fragments; ++f)
    if (tt.offsets[f + 1] < tt.offsets[f])
      throw std::invalid_argument("TokenTable.offsets must be non-decreasing (fragment " +
                                  std::to_string(f) + ")");
  std::atomic<int64_t> first_bad{s.num_envs};
  parallel_for(s.num_envs, num_threads, MIN_RENDER, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int32_t len = render_one_env_tokens(cfg, s, i, tt, out_ids + i * tt.max_len);
      lengths[i] = len;
      if (len < 0 || len > tt.max_len) {
        int64_t cur = first_bad.load();
        while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {
        }
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < s.num_envs) throw std::invalid_argument(render_error_message(bad, lengths[bad], tt.max_len));
}

void cpu_oracle(const PreparedConfig& prepared, const StateView& s, int32_t* dist, uint8_t* optimal,
                int num_threads) {
  const Config& cfg = prepared.get();
  check_state(s);
  if (s.num_envs > 0 && (!dist || !optimal))
    throw std::invalid_argument("oracle: null output pointer");
  parallel_for(s.num_envs, num_threads, MIN_ORACLE, [&](int64_t b, int64_t e) {
    // Per-thread scratch, kept between calls; dist holds -1 everywhere between uses.
    thread_local std::vector<int32_t> dist_s, queue_s;
    thread_local std::vector<uint8_t> mask_s;
    const size_t cells = static_cast<size_t>(cfg.size) * cfg.size;
    if (dist_s.size() < cells) {
      dist_s.assign(cells, -1);
      queue_s.resize(cells);
      mask_s.resize(cells);
    }
    for (int64_t i = b; i < e; ++i)
      oracle_one_env(cfg, s, i, dist + i, optimal + 4 * i, dist_s.data(), queue_s.data(),
                     mask_s.data());
  });
}

}  // namespace ws
