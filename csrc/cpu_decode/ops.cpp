// The CPU decode ops (ops.h). Loops keep independent partial sums in small arrays so that the
// compiler vectorises them at the baseline target; the AVX2 clones of the hot loops are picked at
// run time (GCC/Clang target_clones), with -ffp-contract=off keeping every rounding torch does.
#include "cpu_decode/ops.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace ws::cpu_decode {

using ws::cpu_linear::bf16_to_float;
using ws::cpu_linear::float_to_bf16;

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__SANITIZE_ADDRESS__)
#define WS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define WS_CLONES
#endif

namespace {

constexpr int kLanes = 8;

// Storage access by dtype: fp32 as float, bf16 as its raw uint16.
template <typename T>
inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// The value torch would store in this dtype.
template <typename T>
inline float round_to(float v);
template <>
inline float round_to<float>(float v) { return v; }
template <>
inline float round_to<uint16_t>(float v) { return bf16_to_float(float_to_bf16(v)); }

template <typename T>
inline void store(T* p, int64_t i, float v);
template <>
inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
inline void store<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("cpu_decode: ") + what);
}

template <typename T>
WS_CLONES float sum_of_squares(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = load(x, i + j);
      acc[j] += v * v;
    }
  float s = 0.f;
  for (; i < n; ++i) s += load(x, i) * load(x, i);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
void add_rmsnorm_t(const T* h, const T* res, T* sum, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = h + r * D;
    if (res != nullptr) {
      T* s = sum + r * D;
      const T* b = res + r * D;
      for (int64_t i = 0; i < D; ++i) store(s, i, load(x, i) + load(b, i));
      x = s;
    }
    const float inv = 1.f / std::sqrt(sum_of_squares(x, D) / static_cast<float>(D) + eps);
    T* out = y + r * D;
    for (int64_t i = 0; i < D; ++i) store(out, i, load(w, i) * round_to<T>(load(x, i) * inv));
  }
}

template <typename T>
void rope_t(T* x, int64_t rows, int64_t ld_x, int64_t heads, int64_t hd, const T* cos, const T* sin_signed) {
  const int64_t half = hd / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * hd;
    const T* s = sin_signed + r * hd;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + r * ld_x + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float lo = load(v, i), hi = load(v, i + half);
        const float new_lo = round_to<T>(lo * load(c, i)) + round_to<T>(hi * load(s, i));
        const float new_hi = round_to<T>(hi * load(c, i + half)) + round_to<T>(lo * load(s, i + half));
        store(v, i, new_lo);
        store(v, i + half, new_hi);
      }
    }
  }
}

// exp(x) without a call, so that loops over it vectorise: Cody-Waite reduction by ln 2 and
// Cephes' degree-7 polynomial, 2^n built in the exponent bits; within 2 ulp of exp over the
// clamped range (torch's vectorised exp, Sleef's, is within 1). x is clamped to [-87.3, 88.3],
// where 2^n stays a normal float: silu's tails come out as their limits (a, or a signed ~1e-37
// where torch gives -0).
inline float exp_no_call(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

template <typename T>
WS_CLONES void silu_mul_row(const T* g, const T* u, T* o, int64_t inter) {
  for (int64_t i = 0; i < inter; ++i) {
    const float a = load(g, i);
    store(o, i, round_to<T>(a / (1.f + exp_no_call(-a))) * load(u, i));
  }
}

template <typename T>
void silu_mul_t(const T* gu, T* out, int64_t rows, int64_t inter) {
  for (int64_t r = 0; r < rows; ++r) silu_mul_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, out + r * inter, inter);
}

// e[t] = exp(e[t] - m), stored rounded to T's precision; returns the sum of the unrounded values.
template <typename T>
WS_CLONES float exp_sum_round(float* e, int64_t n, float m) {
  float acc[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = exp_no_call(e[t + j] - m);
      acc[j] += v;
      e[t + j] = round_to<T>(v);
    }
  float total = 0.f;
  for (; t < n; ++t) {
    const float v = exp_no_call(e[t] - m);
    total += v;
    e[t] = round_to<T>(v);
  }
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

template <typename T>
WS_CLONES float dot(const T* a, const T* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += load(a, i + j) * load(b, i + j);
  float s = 0.f;
  for (; i < n; ++i) s += load(a, i) * load(b, i);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
WS_CLONES void axpy(float p, const T* v, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += p * load(v, i);
}

template <typename T>
void attend_t(const AttendArgs& a) {
  const int64_t hd = a.hd, g = a.n_heads / a.n_kv;
  T* kc = static_cast<T*>(a.k_cache);
  T* vc = static_cast<T*>(a.v_cache);
  const int64_t slot_stride = a.n_kv * a.T * hd, head_stride = a.T * hd;
  for (int64_t b = 0; b < a.B; ++b) {
    const T* kn = static_cast<const T*>(a.k_new) + b * a.ld_new;
    const T* vn = static_cast<const T*>(a.v_new) + b * a.ld_new;
    for (int64_t j = 0; j < a.n_kv; ++j) {
      T* kd = kc + a.slots[b] * slot_stride + j * head_stride + a.positions[b] * hd;
      T* vd = vc + a.slots[b] * slot_stride + j * head_stride + a.positions[b] * hd;
      std::copy(kn + j * hd, kn + (j + 1) * hd, kd);
      std::copy(vn + j * hd, vn + (j + 1) * hd, vd);
    }
  }
  std::vector<float> scores, acc(hd);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t pos = a.positions[b];
    const int64_t lo = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
    const int64_t n = pos - lo + 1;
    scores.resize(n);
    const T* qrow = static_cast<const T*>(a.q) + b * a.ld_q;
    T* orow = static_cast<T*>(a.out) + b * a.n_heads * hd;
    for (int64_t h = 0; h < a.n_heads; ++h) {
      const int64_t j = h / g;
      const T* keys = kc + a.slots[b] * slot_stride + j * head_stride + lo * hd;
      const T* vals = vc + a.slots[b] * slot_stride + j * head_stride + lo * hd;
      const T* qh = qrow + h * hd;
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        scores[t] = dot(qh, keys + t * hd, hd) * a.scale;
        m = std::max(m, scores[t]);
      }
      // torch's CPU flash attention order: the weights' sum in fp32, the unnormalised weights
      // stored in the dtype (bf16: rounded) for the product with V, the sum divided out last.
      const float total = exp_sum_round<T>(scores.data(), n, m);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) axpy(scores[t], vals + t * hd, acc.data(), hd);
      const float inv = 1.f / total;
      for (int64_t i = 0; i < hd; ++i) store(orow + h * hd, i, acc[i] * inv);
    }
  }
}

}  // namespace

void add_rmsnorm(const void* h, const void* res, void* sum, const void* w, void* y, int64_t rows, int64_t D,
                 float eps, DType dtype) {
  require(rows >= 0 && D > 0, "add_rmsnorm: rows must be >= 0 and D > 0");
  require(h && w && y && (res == nullptr || sum != nullptr), "add_rmsnorm: null pointer");
  if (dtype == DType::kF32)
    add_rmsnorm_t(static_cast<const float*>(h), static_cast<const float*>(res), static_cast<float*>(sum),
                  static_cast<const float*>(w), static_cast<float*>(y), rows, D, eps);
  else
    add_rmsnorm_t(static_cast<const uint16_t*>(h), static_cast<const uint16_t*>(res), static_cast<uint16_t*>(sum),
                  static_cast<const uint16_t*>(w), static_cast<uint16_t*>(y), rows, D, eps);
}

void rope_inplace(void* x, int64_t rows, int64_t ld_x, int64_t heads, int64_t hd, const void* cos,
                  const void* sin_signed, DType dtype) {
  require(rows >= 0 && heads >= 0 && hd > 0 && hd % 2 == 0, "rope: sizes (hd must be even and > 0)");
  require(ld_x >= heads * hd, "rope: ld_x < heads * hd");
  require(x && cos && sin_signed, "rope: null pointer");
  if (dtype == DType::kF32)
    rope_t(static_cast<float*>(x), rows, ld_x, heads, hd, static_cast<const float*>(cos),
           static_cast<const float*>(sin_signed));
  else
    rope_t(static_cast<uint16_t*>(x), rows, ld_x, heads, hd, static_cast<const uint16_t*>(cos),
           static_cast<const uint16_t*>(sin_signed));
}

void silu_mul(const void* gu, void* out, int64_t rows, int64_t inter, DType dtype) {
  require(rows >= 0 && inter > 0, "silu_mul: sizes");
  require(gu && out, "silu_mul: null pointer");
  if (dtype == DType::kF32)
    silu_mul_t(static_cast<const float*>(gu), static_cast<float*>(out), rows, inter);
  else
    silu_mul_t(static_cast<const uint16_t*>(gu), static_cast<uint16_t*>(out), rows, inter);
}

void attend_decode(const AttendArgs& a) {
  require(a.B >= 0 && a.n_heads > 0 && a.n_kv > 0 && a.hd > 0 && a.n_heads % a.n_kv == 0,
          "attend: n_heads must be a positive multiple of n_kv, hd > 0");
  require(a.S > 0 && a.T > 0 && a.window >= 0, "attend: cache sizes");
  require(a.ld_q >= a.n_heads * a.hd && a.ld_new >= a.n_kv * a.hd, "attend: row strides too small");
  require(a.q && a.k_new && a.v_new && a.k_cache && a.v_cache && a.slots && a.positions && a.out,
          "attend: null pointer");
  for (int64_t b = 0; b < a.B; ++b) {
    require(a.slots[b] >= 0 && a.slots[b] < a.S, "attend: slot out of range");
    require(a.positions[b] >= 0 && a.positions[b] < a.T, "attend: position out of range");
  }
  if (a.dtype == DType::kF32)
    attend_t<float>(a);
  else
    attend_t<uint16_t>(a);
}

}  // namespace ws::cpu_decode
