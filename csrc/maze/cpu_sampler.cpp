#include "cpu_sampler.h"

#include <cstdlib>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "cpu_sampler_avx2.h"
#define WS_HAVE_AVX2_PATH 1
#endif

namespace ws {
namespace {

// rules.h's routines (the sampler out of line with the tiles as constants, see DefaultSampler).
void portable(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
              int64_t remaining, uint64_t key, uint64_t& counter) {
  DefaultSampler()(grid, size, n, from, to, need, remaining, key, counter);
}
void portable_walk(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S, uint8_t* grid,
                   int32_t& r, int32_t& c, int64_t& mold) {
  random_walk(g, counter, L, n, S, grid, r, c, mold);
}

#ifdef WS_HAVE_AVX2_PATH
// Out-of-line entry points for the function pointers (the routines are inline in the header).
__attribute__((target("avx2,bmi,popcnt"))) void avx2_sample(uint8_t* grid, int32_t size, int32_t n,
                                                            uint8_t from, uint8_t to, int64_t need,
                                                            int64_t remaining, uint64_t key,
                                                            uint64_t& counter) {
  avx2::sample(grid, size, n, from, to, need, remaining, key, counter);
}
__attribute__((target("avx2,bmi,popcnt"))) void avx2_walk(uint64_t g, uint64_t counter,
                                                          uint64_t L, int32_t n, int32_t S,
                                                          uint8_t* grid, int32_t& r, int32_t& c,
                                                          int64_t& mold) {
  avx2::walk(g, counter, L, n, S, grid, r, c, mold);
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_HAVE_AVX512_PATH 1
// GCC 12's shift/alignr intrinsics pass _mm512_undefined_epi32() as the (unused) merge source,
// which -Wmaybe-uninitialized flags falsely.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
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

// (a * b) >> 32 per 32-bit lane: even lanes' 64-bit products shifted down, odd lanes' high
// dwords already in place.
WS_AVX512_TARGET inline __m512i mulhi_epu32(__m512i a, __m512i b) {
  const __m512i pe = _mm512_mul_epu32(a, b);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

// Bit c of the result: line[c] == the byte of `v`, for c < len (1 <= len <= 64; reads no further).
WS_AVX512_TARGET inline uint64_t match_mask64(const uint8_t* line, int32_t len, __m512i v) {
  const __mmask64 inside = len == 64 ? ~0ull : (1ull << len) - 1;
  return _mm512_mask_cmpeq_epi8_mask(inside, _mm512_maskz_loadu_epi8(inside, line), v);
}

// Writes `to` into the selected candidates of a batch: candidates are the set bits of cand[0],
// then of cand[1], ... (each a 64-cell mask at at[k]); bit j of sel[] is candidate j.
WS_AVX512_TARGET inline void deposit(uint8_t* const* at, const uint64_t* cand, int nb,
                                     const uint64_t* sel, __m512i vto) {
  int off = 0;
  for (int k = 0; k < nb; ++k) {
    const int o = off & 63;
    const uint64_t* s = sel + (off >> 6);
    const uint64_t bits = o == 0 ? s[0] : (s[0] >> o) | (s[1] << (64 - o));
    _mm512_mask_storeu_epi8(at[k], _pdep_u64(bits, cand[k]), vto);
    off += __builtin_popcountll(cand[k]);
  }
}

// Algorithm S, 16 candidates per step with no serial chain inside the step. Candidate j of a chunk
// (0-based) is selected iff u_j + k_j < need, where u_j = uniform(remaining - j) from its word and
// k_j <= j is the number selected before it in the chunk. So u_j + j < need selects it and
// u_j >= need rejects it whatever k_j is; only the rare lanes in between (probability ~j/remaining)
// are resolved one by one, in order, from the already-known selections. A 16-bit lane of 32-bit
// words is exactly 8 draws' low and high halves in stream order (spec "Generation"), so one vpmullq
// pair serves 16 candidates; a stream starting on an odd word takes the window one dword later
// (valignd). Selections go back to cells with pdep and one masked byte store per 64-cell word.
// Measured at size 100 (AMD EPYC dev VM, CPU time, load ~2 on 2 cores): generation 30.6 -> 9.1 us
// per maze, of which this routine is ~6.5 (the old one-draw-per-candidate serial scan was 22).
// The chain through `need` bounds it: 32 candidates per step measured no faster (more lanes fall
// in the unsure band), and always running the full number of steps per mask was slower.
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
  // Batches of up to kBatch non-empty 64-cell masks, across rows: at size 100 four rows per
  // batch, so the chunk loop's exit (data dependent, hence mispredicted) and the hashing restart
  // come once per ~200 candidates (9.6 us per maze with one batch per row; 10.5 per 64 cells).
  constexpr int kBatch = 8;
  uint8_t* at[kBatch];
  uint64_t cand[kBatch];
  int32_t r = 1, c0 = 0;
  while (r <= n) {
    int nb = 0, p = 0;
    while (nb < kBatch && r <= n) {
      uint8_t* line = grid + static_cast<int64_t>(r) * size + 1 + c0;
      const uint64_t m = match_mask64(line, n - c0 < 64 ? n - c0 : 64, vfrom);
      at[nb] = line;
      cand[nb] = m;
      nb += m != 0;
      p += __builtin_popcountll(m);
      c0 += 64;
      if (c0 >= n) {
        c0 = 0;
        ++r;
      }
    }
    if (p == 0) break;  // only when the rows ran out
    // draws from the one holding word w, 8 per vector
    __m512i x = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<long long>(key + ((w >> 1) + 1) * GOLDEN)), steps);
    __m512i h = mix64x8(x);
    const __mmask16 odd = (w & 1) ? 0xFFFF : 0;
    uint64_t sel[kBatch + 1] = {};  // bit j: candidate j of the batch selected
    for (int q = 0; q * 16 < p; ++q) {
      x = _mm512_add_epi64(x, step8);
      const __m512i hn = mix64x8(x);
      const __m512i words = _mm512_mask_blend_epi32(odd, h, _mm512_alignr_epi32(hn, h, 1));
      h = hn;
      const __m512i remv = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(rem - 16 * q)), lane);
      const __m512i u = mulhi_epu32(words, remv);  // uniform(remaining - j) per lane
      const int left = p - 16 * q;
      const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __m512i ndv = _mm512_set1_epi32(static_cast<int>(nd));
      // both compares hang off nd alone (nd is the serial chain; computing `unsure` from `s`
      // measured ~0.9 us per maze slower); unsure = maybe but not surely selected
      uint32_t s = _mm512_mask_cmplt_epu32_mask(valid, _mm512_add_epi32(u, lane), ndv);
      uint32_t unsure = _mm512_mask_cmplt_epu32_mask(valid, u, ndv) & ~s;
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
      sel[q >> 2] |= static_cast<uint64_t>(s) << (16 * (q & 3));
      if (nd == 0) {  // the last selected candidate completes the sample: no further words
        deposit(at, cand, nb, sel, vto);
        counter = w + static_cast<uint64_t>(16 * q + 31 - __builtin_clz(s)) + 1;
        return;
      }
    }
    deposit(at, cand, nb, sel, vto);
    w += static_cast<uint64_t>(p);
    rem -= static_cast<uint32_t>(p);
  }
  counter = w;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

bool avx512_supported() {
#ifdef WS_HAVE_AVX512_PATH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool avx2_supported() {
#ifdef WS_HAVE_AVX2_PATH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

// Portable first, then each SIMD routine the CPU runs, widest last.
std::vector<CpuRoutine> supported() {
  std::vector<CpuRoutine> out{{"portable", &portable, &portable_walk}};
#ifdef WS_HAVE_AVX2_PATH
  if (avx2_supported()) out.push_back({"avx2", &avx2_sample, &avx2_walk});
#endif
#ifdef WS_HAVE_AVX512_PATH
  // Its walk stays rules.h's: the AVX2 walk is only measured on Zen 2.
  if (avx512_supported()) out.push_back({"avx512", &avx512, &portable_walk});
#endif
  return out;
}

CpuRoutine choose() {
  const char* off = std::getenv("WS_NO_SIMD");
  const bool forbid = off != nullptr && off[0] != '\0' && off[0] != '0';
  const std::vector<CpuRoutine> all = supported();
  return forbid ? all.front() : all.back();
}

}  // namespace

const CpuRoutine& cpu_routine() {
  static const CpuRoutine chosen = choose();
  return chosen;
}
const char* cpu_sampler_name() { return cpu_routine().name; }
std::vector<CpuRoutine> cpu_supported_routines() { return supported(); }

}  // namespace ws
