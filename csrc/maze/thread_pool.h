// A small persistent thread pool for the CPU backend: spawning std::threads per call costs tens of
// microseconds, more than a whole batched step at B=1024, so workers are kept and reused.
#pragma once

#include <cstdint>
#include <functional>

namespace ws {

// Resolves a num_threads argument: 0 means hardware_concurrency (at least 1).
int resolve_threads(int num_threads);

// Runs fn(begin, end) over [0, n) split into contiguous chunks, on up to `threads` threads (the
// caller runs one chunk). Runs inline when threads <= 1 or n < 2 * min_per_thread, so small
// batches pay no synchronisation. Rethrows the first exception a chunk threw. Safe to call from
// several threads at once (submissions are serialised) and after fork() (the child rebuilds).
void parallel_for(int64_t n, int threads, int64_t min_per_thread,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace ws
