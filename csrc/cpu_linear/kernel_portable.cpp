// The portable kernel: plain C++ for any CPU. The 8 independent partial sums per dot product let
// the compiler vectorise the inner loop for the baseline target (SSE2 on x86-64) without
// reassociating anything.
#include <algorithm>

#include "cpu_linear/kernels.h"

namespace ws::cpu_linear::detail {
namespace {

constexpr int kLanes = 8;
constexpr int kRB = 4;  // W rows per block: each x element loaded once serves kRB rows

template <typename WT>
inline float widen(WT v);
template <>
inline float widen<float>(float v) { return v; }
template <>
inline float widen<uint16_t>(uint16_t v) { return bf16_to_float(v); }

// out[m][r] = dot(x row m0 + m, W row o + r) for MB rows of x and RB rows of W.
template <typename WT, int MB, int RB>
void block(const Job& j, int64_t m0, int64_t o) {
  const WT* w = static_cast<const WT*>(j.w) + o * j.I;
  const float* x = j.xs + m0 * j.ldxs;
  const int64_t I = j.I;
  float acc[MB][RB][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= I; i += kLanes) {
    for (int r = 0; r < RB; ++r) {
      float wv[kLanes];
      for (int l = 0; l < kLanes; ++l) wv[l] = widen<WT>(w[r * I + i + l]);
      for (int m = 0; m < MB; ++m)
        for (int l = 0; l < kLanes; ++l) acc[m][r][l] += wv[l] * x[m * j.ldxs + i + l];
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RB; ++r) {
      float s = 0.f;
      for (int l = 0; l < kLanes; ++l) s += acc[m][r][l];
      for (int64_t t = i; t < I; ++t) s += widen<WT>(w[r * I + t]) * x[m * j.ldxs + t];
      store_out(j, m0 + m, o + r, s);
    }
  }
}

template <typename WT, int RB>
void block_rows_of_x(const Job& j, int64_t o) {
  int64_t m0 = 0;
  for (; m0 + 4 <= j.M; m0 += 4) block<WT, 4, RB>(j, m0, o);
  switch (j.M - m0) {
    case 3: block<WT, 3, RB>(j, m0, o); break;
    case 2: block<WT, 2, RB>(j, m0, o); break;
    case 1: block<WT, 1, RB>(j, m0, o); break;
    default: break;
  }
}

template <typename WT>
void rows(const Job& j, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + kRB <= o1; o += kRB) block_rows_of_x<WT, kRB>(j, o);
  for (; o < o1; ++o) block_rows_of_x<WT, 1>(j, o);
}

}  // namespace

void prep_x_natural(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t I, float* xs, int64_t ldxs) {
  for (int64_t m = 0; m < M; ++m) {
    if (x_dtype == DType::kF32) {
      const float* src = static_cast<const float*>(x) + m * ldx;
      std::copy(src, src + I, xs + m * ldxs);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(x) + m * ldx;
      for (int64_t i = 0; i < I; ++i) xs[m * ldxs + i] = bf16_to_float(src[i]);
    }
  }
}

Kernel portable_kernel(DType w_dtype) {
  return Kernel{prep_x_natural, w_dtype == DType::kF32 ? rows<float> : rows<uint16_t>};
}

}  // namespace ws::cpu_linear::detail
