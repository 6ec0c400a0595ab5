// The CPU backend's generator routines: the same selection sampling (Algorithm S) and random walk
// as rules.h's selection_sample / random_walk, in SIMD versions chosen once at run time by what the
// CPU has (AVX-512: 16 candidates per step from 64-bit vector multiplies; AVX2: 8-cell groups with
// the words hashed ahead in vectors), otherwise the portable ones. Every routine gives bitwise the
// grid, start cell, Mold count and word counter of the portable one (tests/cpp compare them).
#pragma once

#include <cstdint>
#include <vector>

#include "rules.h"

namespace ws {

using SampleFn = void (*)(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                          int64_t need, int64_t remaining, uint64_t key, uint64_t& counter);
using WalkFn = void (*)(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S,
                        uint8_t* grid, int32_t& r, int32_t& c, int64_t& mold);

// One generator routine: a name ("avx512", "avx2", "portable"), its sampler and its walk.
struct CpuRoutine {
  const char* name;
  SampleFn sample;
  WalkFn walk;
};

// The routine this CPU runs (chosen once: the fastest the CPU supports; WS_NO_SIMD=1 in the
// environment forces the portable one).
const CpuRoutine& cpu_routine();
// Its name, for benchmarks and reports.
const char* cpu_sampler_name();
// Every routine this CPU can run, portable first (what the tests compare against each other).
std::vector<CpuRoutine> cpu_supported_routines();

// The generator policy (rules.h, DefaultSampler) of a CpuRoutine.
struct CpuSampler {
  const CpuRoutine* routine = &cpu_routine();
  CpuSampler() = default;
  explicit CpuSampler(const CpuRoutine& r) : routine(&r) {}
  void operator()(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to, int64_t need,
                  int64_t remaining, uint64_t key, uint64_t& counter) const {
    routine->sample(grid, size, n, from, to, need, remaining, key, counter);
  }
  void walk(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S, uint8_t* grid,
            int32_t& r, int32_t& c, int64_t& mold) const {
    routine->walk(g, counter, L, n, S, grid, r, c, mold);
  }
};

}  // namespace ws
