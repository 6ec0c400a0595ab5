// Microbenchmark of the CPU backend: microseconds per maze generation at size 100 (each generator
// routine the CPU runs: portable, avx2, avx512), and env-steps per second at B=1024 with and
// without token rendering, on 1 and 2 threads.
//   ws_bench_maze            full run
//   ws_bench_maze --smoke    a quick run (ctest keeps it compiling and running)
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "batch.h"
#include "maze/config.h"
#include "maze/cpu_backend.h"
#include "maze/cpu_sampler.h"

using namespace ws;
using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
// CPU time of this thread: on a shared machine, wall time also counts time spent descheduled.
static double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// A token table shaped like a real tokenizer's (lengths of SmolLM2's tokens for the office glyphs).
struct Table {
  std::vector<int32_t> ids, offsets;
  TokenTable tt;
  explicit Table(int size) {
    const int nf = expected_num_fragments(size);
    offsets.push_back(0);
    for (int f = 0; f < nf; ++f) {
      int len;
      if (f < 4) len = 12;              // wind sentence
      else if (f < 6) len = 13;         // head
      else if (f == 6) len = 2;         // ")."
      else if (f == 7) len = 15;        // tail
      else if (f < 10) len = 5;         // chat template pieces
      else if (f < 58) len = 8;         // clause with an emoji glyph
      else len = 2;                     // numbers
      for (int j = 0; j < len; ++j) ids.push_back(f * 16 + j);
      offsets.push_back(int32_t(ids.size()));
    }
    tt = TokenTable{ids.data(), offsets.data(), nf, 128, 0};
  }
};

static void pick_actions(Batch& b, std::vector<int32_t>& a, int s) {
  for (int64_t i = 0; i < b.B; ++i) {
    int d = int((i * 7 + s * 3) & 3);
    for (int k = 0; k < 4; ++k, d = (d + 1) & 3) {
      const int r = b.row[size_t(i)] + dir_drow(d), c = b.col[size_t(i)] + dir_dcol(d);
      if (r >= 0 && r < b.S && c >= 0 && c < b.S) break;
    }
    a[size_t(i)] = d;
  }
}

int main(int argc, char** argv) {
  const bool smoke = argc > 1 && std::string(argv[1]) == "--smoke";
  const bool gen_only = argc > 1 && std::string(argv[1]) == "--gen";  // for perf stat
  const int size = 100;
  const int64_t B = smoke ? 64 : 1024;

  // ---- generation, single core ----
  {
    Config c;
    c.size = size;
    c = prepare(c);
    std::vector<uint8_t> grid(size_t(size) * size);
    const int32_t* order = cached_bfs_order(size);
    const int n = smoke ? 50 : 20000;
    int32_t r, col;
    uint64_t sink = 0;
    // every routine this CPU runs (portable first), each on the same mazes
    for (const CpuRoutine& routine : cpu_supported_routines()) {
      const CpuSampler sampler(routine);
      for (int i = 0; i < 200; ++i)
        generate_maze(c, episode_key(1, 0, uint64_t(i)), grid.data(), order, r, col, sampler);
      const auto t0 = Clock::now();
      const double c0 = thread_cpu_seconds();
      for (int i = 0; i < n; ++i) {
        generate_maze(c, episode_key(1, uint64_t(i), 0), grid.data(), order, r, col, sampler);
        sink += uint64_t(r + col);
      }
      const double us = seconds_since(t0) / n * 1e6;
      const double cpu_us = (thread_cpu_seconds() - c0) / n * 1e6;
      std::printf("generate size=%d: %.2f us/maze CPU time (%.2f wall; 1 core, %d mazes, routine %s%s, sink %llu)\n",
                  size, cpu_us, us, n, routine.name,
                  std::string(routine.name) == cpu_sampler_name() ? " (in use)" : "",
                  (unsigned long long)sink);
    }
  }

  if (gen_only) return 0;
  // ---- steps ----
  Table table(size);
  for (int threads : {1, 2}) {
    for (int mode = 0; mode < 3; ++mode) {
      // mode 0: step only; 1: step + render; 2: step + render with same-step autoreset (maze
      // regeneration inside the timed region, every episode_steps steps)
      Config c;
      c.size = size;
      c.autoreset = mode == 2;
      Batch b(B, size);
      cpu_reset(c, b.view(), nullptr, threads);
      std::vector<int32_t> a(static_cast<size_t>(B)), lengths(static_cast<size_t>(B));
      std::vector<int32_t> out_ids(static_cast<size_t>(B) * table.tt.max_len);
      const int steps = smoke ? 30 : (mode == 2 ? 600 : 3000);
      double timed = 0, cpu = 0;
      int64_t tokens = 0;
      for (int s = 0; s < steps; ++s) {
        if (mode != 2 && b.t[0] == c.episode_steps) {
          for (auto& e : b.episode) ++e;
          cpu_reset(c, b.view(), nullptr, threads);  // outside the timed region
        }
        pick_actions(b, a, s);
        const auto t0 = Clock::now();
        const double c0 = thread_cpu_seconds();
        cpu_step(c, b.view(), a.data(), b.out(), threads);
        if (mode >= 1)
          cpu_render_tokens(c, b.view(), table.tt, out_ids.data(), lengths.data(), threads);
        timed += seconds_since(t0);
        cpu += thread_cpu_seconds() - c0;
        if (mode >= 1) tokens += lengths[0];
      }
      const char* names[3] = {"step", "step+render", "step+render+autoreset"};
      // 1 thread: CPU-time rate (immune to other load); 2 threads: wall-time rate only.
      std::printf("B=%lld threads=%d %-22s %12.0f env-steps/s wall (%.2f us/batch step)",
                  (long long)B, threads, names[mode], double(B) * steps / timed,
                  timed / steps * 1e6);
      if (threads == 1) std::printf("  %12.0f env-steps/s CPU time", double(B) * steps / cpu);
      std::printf("\n");
      (void)tokens;
    }
  }
  return 0;
}
