// Host-side checks and error messages shared by the CPU and CUDA backends, so both refuse the
// same calls with the same words.
#pragma once

#include <cstdint>
#include <string>

#include "rules.h"

namespace ws {

// Throws std::invalid_argument if a required state pointer is null or num_envs < 0.
void check_state(const StateView& s);
// Output pointers of a step of num_envs envs (none are needed when num_envs == 0).
void check_step_out(const StepOut& o, int64_t num_envs);
// Fragment count must be 58 + 2 * size; max_len >= 0.
void check_token_table(const Config& cfg, const TokenTable& tt);
// src in [0, B), 0 <= dst_begin <= dst_end <= B, src outside [dst_begin, dst_end).
void check_clone_range(const StateView& s, int64_t src, int64_t dst_begin, int64_t dst_end);

// The message of a rejected step: names the env, the value and the rule.
std::string step_error_message(const Config& cfg, int32_t code, int64_t env, int32_t action,
                               int32_t row, int32_t col, int32_t t);
// length: the too-long turn's length, or RENDER_BAD_STATE.
std::string render_error_message(int64_t env, int32_t length, int32_t max_len);

}  // namespace ws
