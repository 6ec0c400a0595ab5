// CPU backend: the rules of rules.h over a batch, multithreaded over envs. Every function takes a
// prepared (validated) config and checks all its other inputs before it changes any state.
#pragma once

#include <cstdint>

#include "config.h"
#include "rules.h"

namespace ws {

// mask: uint8 [B] or nullptr for all envs. Resets each masked env to episode index s.episode[i],
// first advanced by one when `advance` (what MazeBatch.reset() does: one call, no tensor op).
void cpu_reset(const PreparedConfig& cfg, const StateView& s, const uint8_t* mask,
               int num_threads, bool advance = false);
// actions: int32 [B]. Throws std::invalid_argument (first offending env) before any mutation.
void cpu_step(const PreparedConfig& cfg, const StateView& s, const int32_t* actions,
              const StepOut& out, int num_threads);
void cpu_clone(const PreparedConfig& cfg, const StateView& s, int64_t src, int64_t dst_begin,
               int64_t dst_end, bool independent);
// See ObserveOut (rules.h): neighbours and order are required, the other outputs optional.
void cpu_observe(const PreparedConfig& cfg, const StateView& s, const ObserveOut& out,
                 int num_threads);
// neighbours, order: int32 [B, 4].
void cpu_observe(const PreparedConfig& cfg, const StateView& s, int32_t* neighbours, int32_t* order,
                 int num_threads);
// out_ids: int32 [B, tt.max_len]; lengths: int32 [B]. Throws if a turn exceeds max_len or an env's
// state is corrupt (that env's row is left unwritten; nothing is read or written out of bounds).
void cpu_render_tokens(const PreparedConfig& cfg, const StateView& s, const TokenTable& tt,
                       int32_t* out_ids, int32_t* lengths, int num_threads);
// dist: int32 [B]; optimal: uint8 [B, 4].
void cpu_oracle(const PreparedConfig& cfg, const StateView& s, int32_t* dist, uint8_t* optimal,
                int num_threads);

}  // namespace ws
