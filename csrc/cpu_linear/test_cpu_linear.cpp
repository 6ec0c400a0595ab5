// C++ test of the small-M linear (ctest: cpu_linear; also run under scripts/sanitize.sh): every
// kernel this CPU runs against a double-precision reference on odd shapes, M = 1..9, with and
// without bias, fp32 / bf16 weights and activations, NaN-prefilled outputs, row strides, the pool
// (1..4 threads, several callers at once), and refused arguments. Kernels the CPU lacks are
// reported as skipped.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu_linear/linear.h"
#include "cpu_linear/expect.h"

using namespace ws::cpu_linear;

namespace {

struct Case {
  int64_t M, I, O;
  DType w, x, b;
  bool bias;
  int64_t ldx_pad;
  int threads;
};

float to_f(uint16_t h) { return bf16_to_float(h); }

// Runs one case with the given ISA; returns false on mismatch (after reporting it).
bool run_case(const Case& c, Isa isa, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const int64_t ldx = c.I + c.ldx_pad;
  std::vector<float> wf(c.O * c.I), xf(c.M * ldx, 0.f), bf(c.O);
  for (auto& v : wf) v = nd(rng);
  for (auto& v : xf) v = nd(rng);
  for (auto& v : bf) v = nd(rng);
  // Storage in the case's dtypes; the reference reads back exactly what was stored.
  std::vector<uint16_t> wh(wf.size()), xh(xf.size()), bh(bf.size());
  auto round_trip = [](std::vector<float>& f, std::vector<uint16_t>& h) {
    for (size_t i = 0; i < f.size(); ++i) {
      h[i] = float_to_bf16(f[i]);
      f[i] = to_f(h[i]);
    }
  };
  if (c.w == DType::kBF16) round_trip(wf, wh);
  if (c.x == DType::kBF16) round_trip(xf, xh);
  if (c.b == DType::kBF16) round_trip(bf, bh);
  const int64_t ldy = c.O + 3;
  std::vector<float> yf(c.M * ldy, NAN);
  std::vector<uint16_t> yh(c.M * ldy, 0x7FC0);

  Args a;
  a.x = c.x == DType::kF32 ? static_cast<const void*>(xf.data()) : xh.data();
  a.ldx = ldx;
  a.x_dtype = c.x;
  a.w = c.w == DType::kF32 ? static_cast<const void*>(wf.data()) : wh.data();
  a.w_dtype = c.w;
  a.bias = !c.bias ? nullptr : c.b == DType::kF32 ? static_cast<const void*>(bf.data()) : bh.data();
  a.bias_dtype = c.b;
  a.y = c.x == DType::kF32 ? static_cast<void*>(yf.data()) : yh.data();
  a.ldy = ldy;
  a.M = c.M;
  a.I = c.I;
  a.O = c.O;
  linear(a, c.threads, isa);

  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t o = 0; o < ldy; ++o) {
      if (o >= c.O) {  // padding past O stays untouched
        const bool untouched = c.x == DType::kF32 ? std::isnan(yf[m * ldy + o]) : yh[m * ldy + o] == 0x7FC0;
        if (!untouched) {
          EXPECT(false, "%s wrote past O at m=%ld o=%ld", isa_name(isa), long(m), long(o));
          return false;
        }
        continue;
      }
      double ref = c.bias ? bf[o] : 0.0, mag = std::fabs(ref);
      for (int64_t i = 0; i < c.I; ++i) {
        const double p = double(xf[m * ldx + i]) * wf[o * c.I + i];
        ref += p;
        mag += std::fabs(p);
      }
      const double got = c.x == DType::kF32 ? yf[m * ldy + o] : to_f(yh[m * ldy + o]);
      // fp32 accumulation: error within a few ulps of the sum of |terms|; bf16 output adds a
      // rounding of 2^-9 relative.
      double tol = 1e-6 * mag + 1e-30;
      if (c.x == DType::kBF16) tol += std::fabs(ref) * (1.0 / 256);
      if (!(std::fabs(got - ref) <= tol)) {
        EXPECT(false, "%s M=%ld I=%ld O=%ld w=%d x=%d bias=%d threads=%d: y[%ld,%ld]=%.9g ref %.9g tol %.3g",
               isa_name(isa), long(c.M), long(c.I), long(c.O), int(c.w), int(c.x), int(c.bias), c.threads,
               long(m), long(o), got, ref, tol);
        return false;
      }
    }
  }
  return true;
}

void test_shapes(Isa isa) {
  const int64_t Is[] = {1, 7, 8, 15, 16, 17, 83, 577};
  const int64_t Os[] = {1, 7, 83, 577};
  const DType combos[][2] = {{DType::kF32, DType::kF32}, {DType::kBF16, DType::kF32}, {DType::kBF16, DType::kBF16}};
  uint32_t seed = 1;
  int n = 0;
  for (auto& wx : combos)
    for (int64_t I : Is)
      for (int64_t O : Os)
        for (int64_t M = 1; M <= 9; ++M)
          for (int bias = 0; bias < 2; ++bias) {
            Case c{M, I, O, wx[0], wx[1], bias ? wx[0] : DType::kF32, bias != 0, (M + I) % 3, 1};
            run_case(c, isa, seed++);
            ++n;
          }
  std::printf("%s: %d shape cases\n", isa_name(isa), n);
}

void test_threads(Isa isa) {
  // Enough rows for many chunks; min_parallel_bytes 0 so small ones go through the pool too.
  // 70 rows of x: three tiles (32 + 32 + 6), each its own pass of the pool.
  const int64_t saved = min_parallel_bytes();
  set_min_parallel_bytes(0);
  uint32_t seed = 1000;
  for (int threads = 1; threads <= 4; ++threads)
    for (int64_t O : {int64_t{9}, int64_t{577}, int64_t{3000}})
      for (int64_t M : {int64_t{1}, int64_t{5}, int64_t{70}})
        for (DType w : {DType::kF32, DType::kBF16}) {
          if (M * O > 70 * 577) continue;  // the double reference would dominate the test's time
          Case c{M, 577, O, w, DType::kF32, DType::kF32, true, 1, threads};
          run_case(c, isa, seed++);
        }
  // Several callers at once: one holds the pool, the others run on their own threads.
  std::vector<std::thread> callers;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      bool all = true;
      for (int rep = 0; rep < 10; ++rep) {
        Case c{1 + (rep + t) % 5, 300, 1000, t % 2 ? DType::kBF16 : DType::kF32, DType::kF32, DType::kBF16,
               true, 1, 2};
        all = run_case(c, isa, 5000 + 100 * t + rep) && all;
      }
      ok[t] = all;
    });
  for (auto& th : callers) th.join();
  for (int t = 0; t < 4; ++t) EXPECT(ok[t], "%s: concurrent caller %d", isa_name(isa), t);
  // Workers asleep (spin 0) must still be woken for every call.
  const int spin = spin_us();
  set_spin_us(0);
  for (int rep = 0; rep < 50; ++rep) {
    Case c{2, 64, 1000, DType::kF32, DType::kF32, DType::kF32, false, 0, 2};
    run_case(c, isa, 9000 + rep);
    if (rep % 10 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  set_spin_us(spin);
  set_min_parallel_bytes(saved);
}

void test_refusals() {
  float x[4] = {}, w[4] = {}, y[4] = {};
  uint16_t h[4] = {};
  auto refused = [](const Args& a) {
    try {
      linear(a, 1, Isa::kAuto);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  Args a;
  a.x = x; a.w = w; a.y = y; a.M = 1; a.I = 2; a.O = 2; a.ldx = 2; a.ldy = 2;
  Args b = a; b.M = -1;
  EXPECT(refused(b), "negative M accepted");
  b = a; b.ldy = 1;
  EXPECT(refused(b), "ldy < O accepted");
  b = a; b.x = h; b.x_dtype = DType::kBF16;
  EXPECT(refused(b), "fp32 W with bf16 x accepted");
  b = a; b.x = nullptr;
  EXPECT(refused(b), "null x accepted");
  b = a; b.x_dtype = static_cast<DType>(7);
  EXPECT(refused(b), "bad dtype accepted");
  // I = 0: y = bias (or 0), like F.linear.
  float bias[2] = {1.5f, -2.f};
  b = a; b.I = 0; b.bias = bias; b.x = nullptr; b.w = nullptr;
  y[0] = y[1] = NAN;
  linear(b, 1, Isa::kAuto);
  EXPECT(y[0] == 1.5f && y[1] == -2.f, "I=0 with bias: %g %g", y[0], y[1]);
}

void test_rounding() {
  // Round to nearest even, as c10::BFloat16.
  EXPECT(float_to_bf16(1.0f) == 0x3F80, "1.0");
  float f;
  uint32_t u = 0x3F808000;  // exactly halfway between 0x3F80 and 0x3F81: even is 0x3F80
  __builtin_memcpy(&f, &u, 4);
  EXPECT(float_to_bf16(f) == 0x3F80, "tie to even down");
  u = 0x3F818000;  // halfway between 0x3F81 and 0x3F82: even is 0x3F82
  __builtin_memcpy(&f, &u, 4);
  EXPECT(float_to_bf16(f) == 0x3F82, "tie to even up");
  EXPECT(float_to_bf16(NAN) == 0x7FC0, "nan");
  EXPECT(float_to_bf16(INFINITY) == 0x7F80, "inf");
}

}  // namespace

int main() {
  test_rounding();
  test_refusals();
  for (Isa isa : {Isa::kPortable, Isa::kAvx2}) {
    if (!isa_supported(isa)) {
      std::printf("SKIP %s: this CPU lacks it\n", isa_name(isa));
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    test_shapes(isa);
    const auto t1 = std::chrono::steady_clock::now();
    test_threads(isa);
    const auto t2 = std::chrono::steady_clock::now();
    std::printf("%s: shapes %.2f s, threads %.2f s\n", isa_name(isa), std::chrono::duration<double>(t1 - t0).count(),
                std::chrono::duration<double>(t2 - t1).count());
  }
  std::printf("best isa %s, max threads %d\n", isa_name(best_isa()), max_threads());
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
