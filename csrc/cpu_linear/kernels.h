// Internal: what the per-ISA kernels share with the dispatcher (linear.cpp). Not installed.
#pragma once

#include <cstdint>

#include "cpu_linear/linear.h"

namespace ws::cpu_linear::detail {

// One call, as the row kernels see it: x already widened to fp32 (in the layout the kernel's
// prep_x wrote), everything else as the caller passed it.
struct Job {
  const float* xs = nullptr;  // [M, ldxs] fp32 scratch
  int64_t ldxs = 0;
  const void* w = nullptr;
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  void* y = nullptr;
  int64_t ldy = 0;
  DType y_dtype = DType::kF32;
  int64_t M = 0, I = 0;
};

struct Kernel {
  // Writes x (rows ldx apart, dtype x_dtype) as fp32 into xs ([M, ldxs], ldxs >= I).
  void (*prep_x)(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t I, float* xs, int64_t ldxs);
  // Computes output columns [o0, o1) of every row of y.
  void (*rows)(const Job& job, int64_t o0, int64_t o1);
};

Kernel portable_kernel(DType w_dtype);
// Only called where the CPU has AVX2 and FMA (the functions carry target attributes).
Kernel avx2_kernel(DType w_dtype);

// Natural-order widening of x to fp32 (every kernel's tail uses this layout).
void prep_x_natural(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t I, float* xs, int64_t ldxs);

inline float load_elem(const void* p, DType t, int64_t i) {
  return t == DType::kF32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// y[m, o] = acc (+ bias[o]) in y's dtype.
inline void store_out(const Job& j, int64_t m, int64_t o, float acc) {
  if (j.bias) acc += load_elem(j.bias, j.bias_dtype, o);
  if (j.y_dtype == DType::kF32) {
    static_cast<float*>(j.y)[m * j.ldy + o] = acc;
  } else {
    static_cast<uint16_t*>(j.y)[m * j.ldy + o] = float_to_bf16(acc);
  }
}

}  // namespace ws::cpu_linear::detail
