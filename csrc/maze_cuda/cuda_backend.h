// CUDA backend: the same rules (csrc/maze/rules.h) over a batch in device memory, one thread per
// env (a warp per env for token rendering). Declared without CUDA types so the binding and the
// no-CUDA stub (cuda_stub.cpp) share this header. `stream` is a cudaStream_t as an integer
// (0 = the legacy default stream). All pointers are device pointers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../maze/config.h"
#include "../maze/rules.h"

namespace ws {

// True when this build contains the CUDA backend (otherwise every cuda_* throws runtime_error).
bool cuda_compiled();

// advance: as cpu_reset's.
void cuda_reset(const PreparedConfig& cfg, const StateView& s, const uint8_t* mask,
                uintptr_t stream, bool advance = false);
// Runs a validation kernel (first bad env via atomicMin), copies that one value back (a stream
// sync) and throws std::invalid_argument before the mutation kernel if any env is bad.
void cuda_step(const PreparedConfig& cfg, const StateView& s, const int32_t* actions,
               const StepOut& out, uintptr_t stream);
void cuda_clone(const PreparedConfig& cfg, const StateView& s, int64_t src, int64_t dst_begin,
                int64_t dst_end, bool independent, uintptr_t stream);
// See ObserveOut (rules.h): neighbours and order are required, the other outputs optional.
void cuda_observe(const PreparedConfig& cfg, const StateView& s, const ObserveOut& out,
                  uintptr_t stream);
void cuda_observe(const PreparedConfig& cfg, const StateView& s, int32_t* neighbours, int32_t* order,
                  uintptr_t stream);
// Syncs the stream once to learn whether some turn exceeded max_len or some env's state is corrupt
// (then throws; such rows are left unwritten). The table's ids/offsets are device pointers and are not checked for sanity.
void cuda_render_tokens(const PreparedConfig& cfg, const StateView& s, const TokenTable& tt,
                        int32_t* out_ids, int32_t* lengths, uintptr_t stream);
// Device scratch the oracle needs for `envs` envs processed at once (a BFS per env needs
// dist/queue/mask of size*size cells: 9 bytes per cell).
size_t cuda_oracle_scratch_bytes(const PreparedConfig& cfg, int64_t envs);
// The caller passes a scratch buffer of scratch_bytes (>= cuda_oracle_scratch_bytes(cfg, 1));
// envs are processed in chunks of as many as fit, all ordered on `stream`.
void cuda_oracle(const PreparedConfig& cfg, const StateView& s, int32_t* dist, uint8_t* optimal,
                 void* scratch, size_t scratch_bytes, uintptr_t stream);

}  // namespace ws
