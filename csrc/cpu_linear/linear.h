// Small-M CPU linear: y[M, O] = x[M, I] @ W[O, I]^T (+ bias[O]) for the decode step's few rows.
//
// Pure C++17 on raw pointers (no Python, no torch). W is row-major exactly as PyTorch stores a
// Linear's weight, read in place (no copy, no packing). At batch 1 a decode step is a stream of
// every weight once, so the kernels are built to read W at memory bandwidth: a few W rows at a
// time against all M rows of x (register blocks, x converted once per call into an fp32 scratch),
// rows of W split between the calling thread and a small persistent pool (linear.cpp).
//
// dtypes: W fp32 with x fp32; W bf16 (raw uint16 storage) with x bf16 or fp32. Products are
// accumulated in fp32; y has x's dtype, bf16 results rounded to nearest even (as torch rounds).
// The bias, optional, is fp32 or bf16 and is added in fp32 before that rounding.
//
// Instruction sets: an AVX2+FMA kernel chosen at run time (function target attributes; the
// library itself is built for baseline x86-64) and a portable kernel everywhere else.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ws::cpu_linear {

enum class DType : int32_t { kF32 = 0, kBF16 = 1 };

// The DType of an integer code as the Python modules pass it (their FLOAT32 / BFLOAT16).
inline DType dtype_from_code(int code) {
  if (code == static_cast<int>(DType::kF32)) return DType::kF32;
  if (code == static_cast<int>(DType::kBF16)) return DType::kBF16;
  throw std::invalid_argument("dtype code must be 0 (float32) or 1 (bfloat16), not " + std::to_string(code));
}

enum class Isa : int32_t {
  kAuto = -1,     // the best this CPU runs
  kPortable = 0,  // plain C++ (auto-vectorised by the compiler for the baseline target)
  kAvx2 = 1,      // AVX2 + FMA
};

struct Args {
  const void* x = nullptr;  // [M, I]: row m at x + m * ldx elements, elements contiguous
  int64_t ldx = 0;          // elements between rows of x (>= 0; 0 repeats one row)
  DType x_dtype = DType::kF32;
  const void* w = nullptr;  // [O, I] row-major, contiguous
  DType w_dtype = DType::kF32;
  const void* bias = nullptr;  // [O] or nullptr
  DType bias_dtype = DType::kF32;
  void* y = nullptr;  // [M, O]: row m at y + m * ldy elements; dtype x_dtype
  int64_t ldy = 0;    // elements between rows of y (>= O)
  int64_t M = 0, I = 0, O = 0;
};

// Computes y. threads: how many threads may work on it, the caller included (<= 0: the value of
// set_default_threads). isa: kAuto, or a specific kernel for tests (throws std::invalid_argument
// if this CPU lacks it). Throws std::invalid_argument on bad arguments (negative sizes, null
// pointers where data is needed, W fp32 with x bf16, ldy < O). Safe to call from several threads
// at once: one call at a time uses the pool, the others run on their own thread.
void linear(const Args& args, int threads = 0, Isa isa = Isa::kAuto);

// Whether this CPU runs the instruction set (kAuto and kPortable: always).
bool isa_supported(Isa isa);
// The instruction set kAuto resolves to on this CPU.
Isa best_isa();
const char* isa_name(Isa isa);

// The thread count used when a call passes threads <= 0 (initially the hardware's count).
void set_default_threads(int threads);
int default_threads();
// Most threads a call uses: the CPUs this process may run on (sched_getaffinity), at least 1.
int max_threads();

// How long a pool worker spins for the next call before sleeping on a condition variable.
void set_spin_us(int microseconds);
int spin_us();

// Bytes of W below which a call runs on the caller alone (waking a worker costs more).
void set_min_parallel_bytes(int64_t bytes);
int64_t min_parallel_bytes();

// Rounds an fp32 value to bf16 (nearest even; NaN -> quiet NaN 0x7FC0, as c10::BFloat16).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace ws::cpu_linear
