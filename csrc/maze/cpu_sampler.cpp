#include "cpu_sampler.h"

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace ws {
namespace {

void portable(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
              int64_t remaining, uint64_t key, uint64_t& counter) {
  selection_sample(grid, size, n, from, to, need, remaining, key, counter);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_HAVE_AVX512_PATH 1
#define WS_AVX512_TARGET \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,bmi,bmi2,popcnt,lzcnt")))

// mix64 of 8 lanes (vpmullq).
WS_AVX512_TARGET inline __m512i mix64x8(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                         _mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                         _mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBull)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// Algorithm S, 16 candidates per step with no serial chain inside the step. Candidate j of a chunk
// (0-based) is selected iff u_j + k_j < need, where u_j = uniform(remaining - j) from its word and
// k_j <= j is the number selected before it in the chunk. So u_j + j < need selects it and
// u_j >= need rejects it whatever k_j is; only the rare lanes in between (probability ~j/remaining)
// are resolved one by one, in order, from the already-known selections. A 16-bit lane of 32-bit
// words is exactly 8 draws' low and high halves in stream order (spec "Generation"), so one vpmullq
// pair serves 16 candidates; a stream starting on an odd word takes the window one dword later
// (valignd). Selections go back to cells with pdep and one masked byte store per 64-cell word.
// Measured at size 100 (AMD EPYC dev VM, CPU time, load ~2 on 2 cores): generation 31 -> ~9 us
// per maze (the old one-draw-per-candidate serial scan was 22 us of it).
WS_AVX512_TARGET void avx512(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                             int64_t need, int64_t remaining, uint64_t key, uint64_t& counter) {
  if (need <= 0) return;
  uint64_t w = counter;  // word index of the next candidate's word
  // need <= remaining <= interior < 2^20 (MAX_SIZE 1000): 32-bit lanes suffice
  uint32_t nd = static_cast<uint32_t>(need);
  uint32_t rem = static_cast<uint32_t>(remaining);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i steps = _mm512_setr_epi64(
      0, static_cast<long long>(GOLDEN), static_cast<long long>(2 * GOLDEN),
      static_cast<long long>(3 * GOLDEN), static_cast<long long>(4 * GOLDEN),
      static_cast<long long>(5 * GOLDEN), static_cast<long long>(6 * GOLDEN),
      static_cast<long long>(7 * GOLDEN));
  const __m512i step8 = _mm512_set1_epi64(static_cast<long long>(8 * GOLDEN));
  const __m512i vfrom = _mm512_set1_epi8(static_cast<char>(from));
  const __m512i vto = _mm512_set1_epi8(static_cast<char>(to));
  for (int32_t r = 1; r <= n; ++r) {
    uint8_t* line = grid + static_cast<int64_t>(r) * size + 1;
    for (int32_t c0 = 0; c0 < n; c0 += 64) {
      const int32_t len = n - c0 < 64 ? n - c0 : 64;
      const __mmask64 inside = len == 64 ? ~0ull : (1ull << len) - 1;
      const __m512i bytes = _mm512_maskz_loadu_epi8(inside, line + c0);
      const uint64_t cand = _mm512_mask_cmpeq_epi8_mask(inside, bytes, vfrom);
      if (cand == 0) continue;
      const int p = __builtin_popcountll(cand);
      // draws from the one holding word w, 8 per vector
      __m512i x = _mm512_add_epi64(
          _mm512_set1_epi64(static_cast<long long>(key + ((w >> 1) + 1) * GOLDEN)), steps);
      __m512i h = mix64x8(x);
      const __mmask16 odd = (w & 1) ? 0xFFFF : 0;
      uint64_t sel = 0;
      for (int q = 0; q * 16 < p; ++q) {
        x = _mm512_add_epi64(x, step8);
        const __m512i hn = mix64x8(x);
        const __m512i words = _mm512_mask_blend_epi32(odd, h, _mm512_alignr_epi32(hn, h, 1));
        h = hn;
        const __m512i remv = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(rem - 16 * q)), lane);
        // u = (word * rem_j) >> 32 per 32-bit lane: even lanes' products shifted down, odd lanes'
        // high dwords already in place
        const __m512i pe = _mm512_mul_epu32(words, remv);
        const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(words, 32), _mm512_srli_epi64(remv, 32));
        const __m512i u = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
        const int left = p - 16 * q;
        const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        const __m512i ndv = _mm512_set1_epi32(static_cast<int>(nd));
        uint32_t s = _mm512_mask_cmplt_epu32_mask(valid, _mm512_add_epi32(u, lane), ndv);
        uint32_t unsure = _mm512_mask_cmplt_epu32_mask(static_cast<__mmask16>(valid & ~s), u, ndv);
        if (unsure) {
          alignas(64) uint32_t ua[16];
          _mm512_store_si512(ua, u);
          do {
            const int i = __builtin_ctz(unsure);
            unsure &= unsure - 1;
            const uint32_t k = static_cast<uint32_t>(__builtin_popcount(s & ((1u << i) - 1)));
            s |= static_cast<uint32_t>(ua[i] + k < nd) << i;
          } while (unsure);
        }
        nd -= static_cast<uint32_t>(__builtin_popcount(s));
        sel |= static_cast<uint64_t>(s) << (16 * q);
        if (nd == 0) {  // the last selected candidate completes the sample: no further words
          _mm512_mask_storeu_epi8(line + c0, _pdep_u64(sel, cand), vto);
          counter = w + static_cast<uint64_t>(16 * q + 31 - __builtin_clz(s)) + 1;
          return;
        }
      }
      _mm512_mask_storeu_epi8(line + c0, _pdep_u64(sel, cand), vto);
      w += static_cast<uint64_t>(p);
      rem -= static_cast<uint32_t>(p);
    }
  }
  counter = w;
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
