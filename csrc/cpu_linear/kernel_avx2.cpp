// The AVX2 + FMA kernel. Every function carries the target attribute instead of the file being
// built with -mavx2, so the library still loads on any x86-64; linear.cpp calls in here only after
// __builtin_cpu_supports("avx2") and ("fma").
//
// A block is MB rows of x against RB rows of W: MB*RB accumulators of 8 lanes, one pass over I.
// With M > 4 the rows of x are taken 4 at a time over the same RB rows of W, which are then in L1
// (RB * I * 4 bytes: 12 KB at I = 1536), so W still comes from memory once per call.
//
// bf16 W: 16 weights per 256-bit load, widened by interleaving zero words below them
// (unpacklo/hi_epi16: each 32-bit lane becomes the bf16 bits << 16, i.e. the fp32 value). The
// unpacks work within 128-bit lanes, so the widened weights come out in the order
// [0..3, 8..11 | 4..7, 12..15] of each 16; prep_x_bf16w writes x in that order once per call
// instead of shuffling W for every row.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <type_traits>

#include "cpu_linear/kernels.h"

#define WS_AVX2 __attribute__((target("avx2,fma")))

namespace ws::cpu_linear::detail {
namespace {

WS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Keeps a vector in a register: without this GCC folds the W (or x) load into every FMA that uses
// it as a memory operand, which re-loads it MB (RB) times and made the M = 4 block load-bound
// (1.15 vs 1.8 FMA/cycle in cache on the Zen 2 VM).
#define WS_PIN(v) __asm__("" : "+x"(v))

template <int MB, int RB>
WS_AVX2 void block_f32(const Job& j, int64_t m0, int64_t o) {
  const float* w = static_cast<const float*>(j.w) + o * j.I;
  const float* x = j.xs + m0 * j.ldxs;
  const int64_t I = j.I, ldxs = j.ldxs;
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    __m256 wv[RB];
    for (int r = 0; r < RB; ++r) {
      wv[r] = _mm256_loadu_ps(w + r * I + i);
      if (MB > 1) WS_PIN(wv[r]);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * ldxs + i);
      if (RB > 1) WS_PIN(xv);
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = i; t < I; ++t) s += w[r * I + t] * x[m * ldxs + t];
      store_out(j, m0 + m, o + r, s);
    }
  }
}

// One half (lo: kHi false, hi: true) of a 16-weight step: RB widened W vectors against MB rows of x.
template <int MB, int RB, bool kHi>
WS_AVX2 inline void half_bf16(const uint16_t* w, int64_t I, const float* x, int64_t ldxs, int64_t i,
                              __m256i zero, __m256 (&acc)[MB][RB]) {
  __m256 wv[RB];
  for (int r = 0; r < RB; ++r) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * I + i));
    wv[r] = _mm256_castsi256_ps(kHi ? _mm256_unpackhi_epi16(zero, raw) : _mm256_unpacklo_epi16(zero, raw));
    if (MB > 1) WS_PIN(wv[r]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 xv = _mm256_loadu_ps(x + m * ldxs + i + (kHi ? 8 : 0));
    if (RB > 1) WS_PIN(xv);
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
  }
}

template <int MB, int RB>
WS_AVX2 void block_bf16(const Job& j, int64_t m0, int64_t o) {
  const uint16_t* w = static_cast<const uint16_t*>(j.w) + o * j.I;
  const float* x = j.xs + m0 * j.ldxs;
  const int64_t I = j.I, ldxs = j.ldxs;
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    half_bf16<MB, RB, false>(w, I, x, ldxs, i, zero, acc);
    half_bf16<MB, RB, true>(w, I, x, ldxs, i, zero, acc);
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = i; t < I; ++t) s += bf16_to_float(w[r * I + t]) * x[m * ldxs + t];
      store_out(j, m0 + m, o + r, s);
    }
  }
}

template <bool kBF16, int MB, int RB>
WS_AVX2 inline void block(const Job& j, int64_t m0, int64_t o) {
  if constexpr (kBF16) {
    block_bf16<MB, RB>(j, m0, o);
  } else {
    block_f32<MB, RB>(j, m0, o);
  }
}

// All rows of x against RB rows of W from o: MBs rows of x at a time, in turn (the W rows stay in
// L1 between them).
template <bool kBF16, int RB, int MB, int... Rest>
WS_AVX2 inline void x_rows(const Job& j, int64_t m0, int64_t o) {
  block<kBF16, MB, RB>(j, m0, o);
  if constexpr (sizeof...(Rest) > 0) x_rows<kBF16, RB, Rest...>(j, m0 + MB, o);
}

template <bool kBF16, int RB, int... MBs>
WS_AVX2 void rows_plan(const Job& j, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + RB <= o1; o += RB) x_rows<kBF16, RB, MBs...>(j, 0, o);
  for (; o < o1; ++o) x_rows<kBF16, 1, MBs...>(j, 0, o);
}

// M > 8: 4 rows of x at a time, then the rest.
template <bool kBF16, int RB>
WS_AVX2 void rows_many(const Job& j, int64_t o0, int64_t o1) {
  auto one = [&](int64_t o, auto rb) {
    constexpr int R = decltype(rb)::value;
    int64_t m0 = 0;
    for (; m0 + 4 <= j.M; m0 += 4) block<kBF16, 4, R>(j, m0, o);
    switch (j.M - m0) {
      case 3: block<kBF16, 3, R>(j, m0, o); break;
      case 2: block<kBF16, 2, R>(j, m0, o); break;
      case 1: block<kBF16, 1, R>(j, m0, o); break;
      default: break;
    }
  };
  int64_t o = o0;
  for (; o + RB <= o1; o += RB) one(o, std::integral_constant<int, RB>{});
  for (; o < o1; ++o) one(o, std::integral_constant<int, 1>{});
}

// One W row at a time with U independent accumulators per row of x, for M = 1 and 2 where the
// call is bound by memory, not arithmetic: W is then read as one sequential stream per thread,
// which the hardware prefetchers follow better than the RB short row streams of a block (rows
// are 1-2 KB in bf16). Measured on one core of the Zen 2 VM over the model's shapes, streamed:
// bf16 M=1 8.4 -> 9.5-11.5 GB/s, M=2 8.5 -> 9.5-11 GB/s; fp32 unchanged at the core's ~12.5 GB/s
// (software prefetch one block ahead instead: +10% bf16, nothing for fp32).
template <int MB, int U>
WS_AVX2 void row_seq_f32(const Job& j, int64_t o) {
  const float* w = static_cast<const float*>(j.w) + o * j.I;
  const float* x = j.xs;
  const int64_t I = j.I, ldxs = j.ldxs;
  __m256 acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= I; i += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 wv = _mm256_loadu_ps(w + i + 8 * u);
      if (MB > 1) WS_PIN(wv);
      for (int m = 0; m < MB; ++m)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldxs + i + 8 * u), acc[m][u]);
    }
  }
  for (; i + 8 <= I; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldxs + i), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum(a);
    for (int64_t t = i; t < I; ++t) s += w[t] * x[m * ldxs + t];
    store_out(j, m, o, s);
  }
}

template <int MB, int U>
WS_AVX2 void row_seq_bf16(const Job& j, int64_t o) {
  const uint16_t* w = static_cast<const uint16_t*>(j.w) + o * j.I;
  const float* x = j.xs;
  const int64_t I = j.I, ldxs = j.ldxs;
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc[MB][2 * U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 2 * U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= I; i += 16 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 16 * u));
      const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
      const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
      for (int m = 0; m < MB; ++m) {
        acc[m][2 * u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldxs + i + 16 * u), acc[m][2 * u]);
        acc[m][2 * u + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldxs + i + 16 * u + 8), acc[m][2 * u + 1]);
      }
    }
  }
  for (; i + 16 <= I; i += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldxs + i), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldxs + i + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < 2 * U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum(a);
    for (int64_t t = i; t < I; ++t) s += bf16_to_float(w[t]) * x[m * ldxs + t];
    store_out(j, m, o, s);
  }
}

// All M (= MB) rows of x against each W row of [o0, o1) in turn.
template <bool kBF16, int MB, int U>
WS_AVX2 void rows_seq(const Job& j, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    if constexpr (kBF16) {
      row_seq_bf16<MB, U>(j, o);
    } else {
      row_seq_f32<MB, U>(j, o);
    }
  }
}

// The plan per M: rows_seq for M = 1, 2 (above: bound by memory); beyond, RB rows of W per
// block, rows of x taken MBs at a time against them, chosen by arithmetic rate measured in cache
// on one core of the Zen 2 VM (GFLOP/s, 48 x 576 weight). Every plan keeps <= 12 accumulators so
// they, the pinned W vectors and one x vector fit the 16 ymm registers (RB 4 with 3 rows of x
// spills: 37 vs 63).
//   fp32  M=3 RB3 63 | M=4 RB3 77 (RB2 60) | M=5 RB3 3+2 58 | M=6 RB3 3+3 65 | M=7 RB3 4+3 70 |
//         M=8 RB3 4+4 75 (RB2 59, 8 rows at once 56)
//   bf16  M=3 RB3 65 (RB2 50) | M=4 RB2 59 (RB3 38: spills) | M=5 RB3 3+2 59 | M=6 RB3 3+3 66 |
//         M=7 RB3 3+2+2 56 | M=8 RB2 4+4 60
// bf16 tops out lower than fp32 because each block widens its W again for every group of x rows.
// 12-13 GB/s of fp32 W per core (what one core streams here) needs 6 GFLOP/s per row of x, so
// fp32 stays bound by memory to M = 8 on two cores; bf16 (half the bytes per weight) from M ~ 4
// on is bound by arithmetic.
template <bool kBF16>
WS_AVX2 void rows(const Job& j, int64_t o0, int64_t o1) {
  switch (j.M) {
    case 1: rows_seq<kBF16, 1, 4>(j, o0, o1); break;  // 4 (fp32) or 8 (bf16) accumulators
    case 2: rows_seq<kBF16, 2, kBF16 ? 2 : 4>(j, o0, o1); break;  // 8 accumulators
    case 3: rows_plan<kBF16, 3, 3>(j, o0, o1); break;
    case 4:
      if constexpr (kBF16) {
        rows_plan<kBF16, 2, 4>(j, o0, o1);
      } else {
        rows_plan<kBF16, 3, 4>(j, o0, o1);
      }
      break;
    case 5: rows_plan<kBF16, 3, 3, 2>(j, o0, o1); break;
    case 6: rows_plan<kBF16, 3, 3, 3>(j, o0, o1); break;
    case 7:
      if constexpr (kBF16) {
        rows_plan<kBF16, 3, 3, 2, 2>(j, o0, o1);
      } else {
        rows_plan<kBF16, 3, 4, 3>(j, o0, o1);
      }
      break;
    case 8:
      if constexpr (kBF16) {
        rows_plan<kBF16, 2, 4, 4>(j, o0, o1);
      } else {
        rows_plan<kBF16, 3, 4, 4>(j, o0, o1);
      }
      break;
    default: rows_many<kBF16, kBF16 ? 2 : 3>(j, o0, o1); break;
  }
}

// x in the lane order block_bf16's unpacks produce W in (see the top of the file); the tail past
// the last whole 16 stays in natural order.
WS_AVX2 void prep_x_bf16w(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t I, float* xs,
                          int64_t ldxs) {
  prep_x_natural(x, ldx, x_dtype, M, I, xs, ldxs);
  for (int64_t m = 0; m < M; ++m) {
    float* row = xs + m * ldxs;
    for (int64_t i = 0; i + 16 <= I; i += 16) {
      const __m256 a = _mm256_loadu_ps(row + i);      // x0..x7
      const __m256 b = _mm256_loadu_ps(row + i + 8);  // x8..x15
      _mm256_storeu_ps(row + i, _mm256_permute2f128_ps(a, b, 0x20));      // x0..3, x8..11
      _mm256_storeu_ps(row + i + 8, _mm256_permute2f128_ps(a, b, 0x31));  // x4..7, x12..15
    }
  }
}

}  // namespace

Kernel avx2_kernel(DType w_dtype) {
  if (w_dtype == DType::kF32) return Kernel{prep_x_natural, rows<false>};
  return Kernel{prep_x_bf16w, rows<true>};
}

}  // namespace ws::cpu_linear::detail

#else  // not x86: never called (isa_supported(kAvx2) is false there)

#include "cpu_linear/kernels.h"

namespace ws::cpu_linear::detail {
Kernel avx2_kernel(DType w_dtype) { return portable_kernel(w_dtype); }
}  // namespace ws::cpu_linear::detail

#endif
