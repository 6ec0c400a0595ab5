// The non-linear work of a CPU decode step, one call per op: RMSNorm (with the residual add
// folded in), RoPE in place, SiLU-and-multiply, and attention of a few new tokens over a KV cache
// (the new keys/values written first).
//
// Pure C++17 on raw pointers (no Python, no torch), single-threaded on the calling thread: at
// decode (a few rows) each op is a few microseconds of arithmetic, and torch's eager ops cost
// ~3-25 us each in dispatch and allocation on the machines we measure, ~40 of them per layer.
//
// Numerics follow the torch references op for op (welfare_server/kernels/cpu_native.py names
// them): fp32 element-wise results are the same roundings in the same order (sums of squares and
// dot products accumulate in another order: last-bit differences); bf16 values are widened to
// fp32, and every intermediate that torch stores in bf16 is rounded to bf16 here too (nearest
// even). Built with -ffp-contract=off, so no product and sum are fused where torch rounds both.
#pragma once

#include <cstdint>

#include "cpu_linear/linear.h"

namespace ws::cpu_decode {

using ws::cpu_linear::DType;

// sum = h + res (when res is given; rounded to the dtype), then
// y = w * (x * 1/sqrt(mean(x^2) + eps)) with x = the sum (or h), the normalised row rounded to the
// dtype before the product with w (LlamaRMSNorm). All tensors [rows, D] contiguous in `dtype`,
// w [D]. sum may alias h (in place); y must not alias h, res or sum.
void add_rmsnorm(const void* h, const void* res, void* sum, const void* w, void* y, int64_t rows, int64_t D,
                 float eps, DType dtype);

// x = x * cos + swap_halves(x) * sin_signed, in place, each product and the sum rounded to the
// dtype (HF's x * cos + rotate_half(x) * sin: rotate_half(x) * sin = swap_halves(x) * sin_signed
// with sin_signed = [-sin_lo, sin_hi]). x: rows of `heads` heads of hd elements, row r at
// x + r * ld_x elements, heads contiguous; cos / sin_signed: [rows, hd] contiguous, x's dtype.
void rope_inplace(void* x, int64_t rows, int64_t ld_x, int64_t heads, int64_t hd, const void* cos,
                  const void* sin_signed, DType dtype);

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: silu(g) = g / (1 + exp(-g)) rounded to the
// dtype, then the product rounded. exp here and in attend_decode is a call-free polynomial within
// 2 ulp (torch's vectorised exp is within 1): last-bit differences from torch. gu [rows, 2 * inter] and out [rows, inter] contiguous.
void silu_mul(const void* gu, void* out, int64_t rows, int64_t inter, DType dtype);

struct AttendArgs {
  const void* q = nullptr;      // [B, n_heads, hd]: row b at q + b * ld_q elements
  int64_t ld_q = 0;
  const void* k_new = nullptr;  // [B, n_kv, hd]: row b at k_new + b * ld_new elements
  const void* v_new = nullptr;  // same layout and row stride as k_new
  int64_t ld_new = 0;
  void* k_cache = nullptr;      // [S, n_kv, T, hd] contiguous (one layer)
  void* v_cache = nullptr;
  int64_t S = 0, T = 0;
  const int64_t* slots = nullptr;      // [B]: each row's cache slot
  const int64_t* positions = nullptr;  // [B]: the new token's position in its slot
  int64_t B = 0, n_heads = 0, n_kv = 0, hd = 0;
  int64_t window = 0;  // sliding window (keys at positions > position - window); 0: none
  float scale = 1.f;
  void* out = nullptr;  // [B, n_heads * hd] contiguous
  DType dtype = DType::kF32;
};

// Writes each row's new key and value at (slots[b], positions[b]), then attends: query head h of
// row b (kv head h / (n_heads / n_kv)) over its slot's keys at positions [lo, positions[b]],
// lo = max(0, positions[b] - window + 1); scores = scale * <q, k> in fp32, e = exp(score - max),
// out = (sum e v) / (sum e) in fp32, rounded to the dtype, with e rounded to the dtype in the
// product with v (as torch's CPU flash attention stores it). Rows are written in order before any row attends
// (two rows of one slot see each other's keys, as in one batched index_put then attention).
// Throws std::invalid_argument on sizes or positions out of range.
void attend_decode(const AttendArgs& args);

}  // namespace ws::cpu_decode
