// C++ test of the CPU decode ops (ctest: cpu_decode): each op against a double-precision
// reference on odd sizes, fp32 and bf16, in place where the op works in place; attention with GQA,
// sliding windows, several rows in one slot and in different slots; refused arguments.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "cpu_decode/ops.h"
#include "cpu_linear/expect.h"

using namespace ws::cpu_decode;
using ws::cpu_linear::bf16_to_float;
using ws::cpu_linear::float_to_bf16;

namespace {

// Values held in one dtype: `f` is what the storage reads back as, `raw` the storage itself.
struct Buf {
  DType dt;
  std::vector<float> f;
  std::vector<uint16_t> raw;
  Buf(DType d, size_t n, std::mt19937& rng, float scale = 1.f) : dt(d), f(n), raw(n) {
    std::normal_distribution<float> nd(0.f, scale);
    for (size_t i = 0; i < n; ++i) set(i, nd(rng));
  }
  void set(size_t i, float v) {
    if (dt == DType::kBF16) {
      raw[i] = float_to_bf16(v);
      f[i] = bf16_to_float(raw[i]);
    } else {
      f[i] = v;
    }
  }
  void* ptr() { return dt == DType::kBF16 ? static_cast<void*>(raw.data()) : static_cast<void*>(f.data()); }
  float at(size_t i) const { return dt == DType::kBF16 ? bf16_to_float(raw[i]) : f[i]; }
};

double tol(DType dt, double magnitude) { return (dt == DType::kBF16 ? 1.6e-2 : 2e-6) * (1.0 + magnitude); }

void test_rmsnorm(DType dt, bool residual, int64_t rows, int64_t D, uint32_t seed) {
  std::mt19937 rng(seed);
  Buf h(dt, rows * D, rng, 3.f), res(dt, rows * D, rng), w(dt, D, rng), y(dt, rows * D, rng), sum(dt, rows * D, rng);
  std::vector<float> h0 = h.f;
  add_rmsnorm(h.ptr(), residual ? res.ptr() : nullptr, residual ? h.ptr() : nullptr, w.ptr(), y.ptr(), rows, D,
              1e-5f, dt);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    std::vector<double> x(D);
    for (int64_t i = 0; i < D; ++i) {
      x[i] = residual ? static_cast<double>(h0[r * D + i]) + res.f[r * D + i] : h0[r * D + i];
      if (residual) EXPECT(std::fabs(h.at(r * D + i) - x[i]) <= tol(dt, std::fabs(x[i])) * 0.5, "sum in place");
      ss += x[i] * x[i];
    }
    const double inv = 1.0 / std::sqrt(ss / D + 1e-5);
    for (int64_t i = 0; i < D; ++i) {
      const double want = x[i] * inv * w.f[i];
      EXPECT(std::fabs(y.at(r * D + i) - want) <= tol(dt, std::fabs(want)) * 2, "rmsnorm dt=%d r=%lld i=%lld %g vs %g",
             static_cast<int>(dt), static_cast<long long>(r), static_cast<long long>(i), y.at(r * D + i), want);
    }
  }
}

void test_rope(DType dt, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t rows = 3, heads = 5, hd = 12, ld = heads * hd + 7;  // a strided view, like q|k of qkv
  Buf x(dt, rows * ld, rng), c(dt, rows * hd, rng), s(dt, rows * hd, rng);
  const std::vector<float> x0 = x.f;
  rope_inplace(x.ptr(), rows, ld, heads, hd, c.ptr(), s.ptr(), dt);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = heads * hd; i < ld; ++i) EXPECT(x.at(r * ld + i) == x0[r * ld + i], "rope wrote past the heads");
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t o = r * ld + h * hd;
        const double swapped = x0[o + (i < hd / 2 ? i + hd / 2 : i - hd / 2)];
        const double want = static_cast<double>(x0[o + i]) * c.f[r * hd + i] + swapped * s.f[r * hd + i];
        EXPECT(std::fabs(x.at(o + i) - want) <= tol(dt, std::fabs(want)) * 2, "rope %g vs %g", x.at(o + i), want);
      }
  }
}

void test_silu_mul(DType dt, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t rows = 2, inter = 37;
  Buf gu(dt, rows * 2 * inter, rng, 4.f), out(dt, rows * inter, rng);
  silu_mul(gu.ptr(), out.ptr(), rows, inter, dt);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu.f[r * 2 * inter + i], u = gu.f[r * 2 * inter + inter + i];
      const double want = g / (1 + std::exp(-g)) * u;
      EXPECT(std::fabs(out.at(r * inter + i) - want) <= tol(dt, std::fabs(want)) * 2, "silu_mul %g vs %g",
             out.at(r * inter + i), want);
    }
}

void test_attend(DType dt, int64_t window, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t S = 3, T = 40, n_heads = 6, n_kv = 2, hd = 20, B = 3, ld_q = n_heads * hd + 5;
  const int64_t ld_new = n_kv * hd;
  const std::vector<int64_t> slots = {2, 0, 2}, positions = {17, 39, 18};  // rows 0 and 2 share slot 2
  Buf kc(dt, S * n_kv * T * hd, rng), vc(dt, S * n_kv * T * hd, rng), q(dt, B * ld_q, rng),
      kn(dt, B * ld_new, rng), vn(dt, B * ld_new, rng), out(dt, B * n_heads * hd, rng);
  // The reference's cache: written the same way first.
  std::vector<float> K = kc.f, V = vc.f;
  auto at = [&](int64_t s, int64_t j, int64_t t, int64_t i) { return ((s * n_kv + j) * T + t) * hd + i; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n_kv; ++j)
      for (int64_t i = 0; i < hd; ++i) {
        K[at(slots[b], j, positions[b], i)] = kn.f[b * ld_new + j * hd + i];
        V[at(slots[b], j, positions[b], i)] = vn.f[b * ld_new + j * hd + i];
      }
  AttendArgs a;
  a.q = q.ptr();
  a.ld_q = ld_q;
  a.k_new = kn.ptr();
  a.v_new = vn.ptr();
  a.ld_new = ld_new;
  a.k_cache = kc.ptr();
  a.v_cache = vc.ptr();
  a.S = S;
  a.T = T;
  a.slots = slots.data();
  a.positions = positions.data();
  a.B = B;
  a.n_heads = n_heads;
  a.n_kv = n_kv;
  a.hd = hd;
  a.window = window;
  a.scale = 0.3f;
  a.out = out.ptr();
  a.dtype = dt;
  attend_decode(a);
  for (size_t i = 0; i < K.size(); ++i) EXPECT(kc.at(i) == K[i] && vc.at(i) == V[i], "cache write at %zu", i);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t j = h / (n_heads / n_kv), pos = positions[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      std::vector<double> p;
      double m = -1e300, total = 0;
      for (int64_t t = lo; t <= pos; ++t) {
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) d += static_cast<double>(q.f[b * ld_q + h * hd + i]) * K[at(slots[b], j, t, i)];
        p.push_back(d * 0.3);
        m = std::max(m, p.back());
      }
      for (auto& v : p) total += (v = std::exp(v - m));
      for (int64_t i = 0; i < hd; ++i) {
        double want = 0;
        for (int64_t t = lo; t <= pos; ++t) want += p[t - lo] / total * V[at(slots[b], j, t, i)];
        const float got = out.at((b * n_heads + h) * hd + i);
        EXPECT(std::fabs(got - want) <= tol(dt, std::fabs(want)) * 4, "attend dt=%d window=%lld b=%lld h=%lld %g vs %g",
               static_cast<int>(dt), static_cast<long long>(window), static_cast<long long>(b),
               static_cast<long long>(h), got, want);
      }
    }
  // Refusals: a position past the cache, a slot out of range, heads not a multiple of kv heads.
  auto refused = [&](AttendArgs bad) {
    try {
      attend_decode(bad);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  const std::vector<int64_t> far = {T, 0, 0}, bad_slot = {S, 0, 0};
  AttendArgs bad = a;
  bad.positions = far.data();
  EXPECT(refused(bad), "position T accepted");
  bad = a;
  bad.slots = bad_slot.data();
  EXPECT(refused(bad), "slot S accepted");
  bad = a;
  bad.n_kv = 4;
  EXPECT(refused(bad), "n_heads not a multiple of n_kv accepted");
}

}  // namespace

int main() {
  uint32_t seed = 1;
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (bool residual : {false, true})
      for (int64_t D : {1, 7, 64, 577}) test_rmsnorm(dt, residual, 3, D, seed++);
    test_rope(dt, seed++);
    test_silu_mul(dt, seed++);
    for (int64_t window : {0, 1, 5, 100}) test_attend(dt, window, seed++);
  }
  bool threw = false;
  try {
    rope_inplace(nullptr, 1, 4, 1, 3, nullptr, nullptr, DType::kF32);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw, "odd head_dim accepted by rope");
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("cpu_decode: all tests passed\n");
  return 0;
}
