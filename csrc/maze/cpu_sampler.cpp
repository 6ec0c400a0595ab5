#include "cpu_sampler.h"

#include <cstdlib>

namespace ws {
namespace {

void portable(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
              int64_t remaining, uint64_t key, uint64_t& counter) {
  selection_sample(grid, size, n, from, to, need, remaining, key, counter);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_HAVE_AVX512_PATH 1
// j * GOLDEN, the offset of the j-th draw of a word from the word's first draw.
struct GoldenSteps {
  uint64_t v[64];
  constexpr GoldenSteps() : v() {
    for (int j = 0; j < 64; ++j) v[j] = static_cast<uint64_t>(j) * GOLDEN;
  }
};
constexpr GoldenSteps kSteps;

// Per word of candidates: first the p draws as a vector loop (independent of the decisions),
// then a short serial scan of the decisions. Measured at size 100 (AMD EPYC dev VM, CPU time):
// 31 us per maze against 37 us with the portable routine.
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,bmi,bmi2,popcnt"))) void avx512(
    uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
    int64_t remaining, uint64_t key, uint64_t& counter) {
  if (need <= 0) return;
  const uint64_t x0 = key + (counter + 1) * GOLDEN;
  uint64_t drawn = 0;
  uint64_t rem = static_cast<uint64_t>(remaining);
  uint64_t nd = static_cast<uint64_t>(need);
  alignas(64) uint64_t uni[64];  // uniform(rem - j) of the word's j-th candidate
  for (int32_t r = 1; r <= n; ++r) {
    uint8_t* line = grid + static_cast<int64_t>(r) * size + 1;
    for (int32_t c0 = 0; c0 < n; c0 += 64) {
      const int32_t len = n - c0 < 64 ? n - c0 : 64;
      uint64_t w = match_mask(line + c0, len, from);
      if (w == 0) continue;
      const int p = __builtin_popcountll(w);
      const uint64_t base = x0 + drawn * GOLDEN;
      for (int j = 0; j < p; ++j)  // vectorised: vpmullq
        uni[j] = ((mix64(base + kSteps.v[j]) >> 32) * (rem - static_cast<uint64_t>(j))) >> 32;
      for (int j = 0; j < p; ++j) {
        const int b = __builtin_ctzll(w);
        w &= w - 1;
        const uint64_t sel = uni[j] < nd;  // the only serial chain: compare, subtract
        line[c0 + b] = static_cast<uint8_t>(from ^ ((from ^ to) & (0u - static_cast<uint32_t>(sel))));
        nd -= sel;
        if (nd == 0) {
          counter += drawn + static_cast<uint64_t>(j) + 1;
          return;
        }
      }
      drawn += static_cast<uint64_t>(p);
      rem -= static_cast<uint64_t>(p);
    }
  }
  counter += drawn;
}
#endif

SampleFn choose(const char** name) {
  const char* off = std::getenv("WS_NO_SIMD");
  const bool forbid = off != nullptr && off[0] != '\0' && off[0] != '0';
#ifdef WS_HAVE_AVX512_PATH
  __builtin_cpu_init();
  if (!forbid && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("bmi2")) {
    *name = "avx512";
    return &avx512;
  }
#endif
  (void)forbid;
  *name = "portable";
  return &portable;
}

struct Choice {
  const char* name = nullptr;
  SampleFn fn = choose(&name);
};
const Choice& choice() {
  static const Choice c;
  return c;
}

}  // namespace

SampleFn cpu_sample_fn() { return choice().fn; }
const char* cpu_sampler_name() { return choice().name; }

}  // namespace ws
