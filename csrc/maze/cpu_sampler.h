// The CPU backend's selection sampler: the same Algorithm S as rules.h's selection_sample, deciding
// 16 candidates per step from vectors of draws (AVX-512DQ has a 64-bit multiply) when the CPU has
// it, chosen once at run time; otherwise the portable routine.
#pragma once

#include <cstdint>

#include "rules.h"

namespace ws {

using SampleFn = void (*)(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                          int64_t need, int64_t remaining, uint64_t key, uint64_t& counter);

// The routine this CPU runs (set once; WS_NO_SIMD=1 in the environment forces the portable one).
SampleFn cpu_sample_fn();
// Name of the routine in use ("avx512" or "portable"), for benchmarks and reports.
const char* cpu_sampler_name();

struct CpuSampler {
  SampleFn fn = cpu_sample_fn();
  void operator()(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
                  int64_t remaining, uint64_t key, uint64_t& counter) const {
    fn(grid, size, n, from, to, need, remaining, key, counter);
  }
};

}  // namespace ws
