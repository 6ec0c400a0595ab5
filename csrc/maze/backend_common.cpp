#include "backend_common.h"

#include <stdexcept>

namespace ws {

void check_state(const StateView& s) {
  if (s.num_envs < 0) throw std::invalid_argument("StateView.num_envs must be >= 0");
  if (s.num_envs == 0) return;
  const void* ptrs[] = {s.grid, s.row, s.col, s.t, s.wind_from, s.episode, s.step_key, s.done,
                        s.origin_env, s.origin_episode};
  const char* names[] = {"grid", "row", "col", "t", "wind_from", "episode", "step_key", "done",
                         "origin_env", "origin_episode"};
  for (int k = 0; k < 10; ++k)
    if (ptrs[k] == nullptr)
      throw std::invalid_argument(std::string("StateView.") + names[k] + " is a null pointer");
}

void check_step_out(const StepOut& o, int64_t num_envs) {
  if (num_envs == 0) return;  // nothing is written: empty buffers may have null data, as elsewhere
  if (!o.reward || !o.tile_entered || !o.tile_pushed || !o.wind_from || !o.done)
    throw std::invalid_argument("StepOut has a null pointer");
}

void check_token_table(const Config& cfg, const TokenTable& tt) {
  if (tt.num_fragments != expected_num_fragments(cfg.size))
    throw std::invalid_argument("TokenTable.num_fragments=" + std::to_string(tt.num_fragments) +
                                " but a size-" + std::to_string(cfg.size) + " maze needs 58 + 2 * " +
                                std::to_string(cfg.size) + " = " +
                                std::to_string(expected_num_fragments(cfg.size)));
  if (tt.max_len < 0) throw std::invalid_argument("TokenTable.max_len must be >= 0");
  if (!tt.ids || !tt.offsets) throw std::invalid_argument("TokenTable has a null pointer");
}

void check_clone_range(const StateView& s, int64_t src, int64_t dst_begin, int64_t dst_end) {
  const int64_t B = s.num_envs;
  if (src < 0 || src >= B)
    throw std::invalid_argument("clone: src=" + std::to_string(src) + " is outside [0, " +
                                std::to_string(B) + ")");
  if (dst_begin < 0 || dst_begin > dst_end || dst_end > B)
    throw std::invalid_argument("clone: destination range [" + std::to_string(dst_begin) + ", " +
                                std::to_string(dst_end) + ") must satisfy 0 <= dst_begin <= "
                                "dst_end <= num_envs=" + std::to_string(B));
  if (src >= dst_begin && src < dst_end)
    throw std::invalid_argument("clone: src=" + std::to_string(src) +
                                " lies inside the destination range [" +
                                std::to_string(dst_begin) + ", " + std::to_string(dst_end) + ")");
}

std::string step_error_message(const Config& cfg, int32_t code, int64_t env, int32_t action,
                               int32_t row, int32_t col, int32_t t) {
  static const char* letters[4] = {"N", "E", "S", "W"};
  const std::string head = "actions[" + std::to_string(env) + "]=" + std::to_string(action);
  switch (code) {
    case STEP_BAD_ACTION:
      return head + " is not a direction (0=N, 1=E, 2=S, 3=W)";
    case STEP_LEAVES_GRID: {
      const std::string letter = std::string(" (") + letters[action] + ")";
      std::string where;
      if (action == NORTH) where = "row " + std::to_string(row);
      else if (action == SOUTH) where = "row " + std::to_string(row) + " (last row)";
      else if (action == EAST) where = "col " + std::to_string(col) + " (last col)";
      else where = "col " + std::to_string(col);
      return head + letter + " would leave the grid from " + where;
    }
    case STEP_DONE:
      return "env " + std::to_string(env) + " is done (t=" + std::to_string(t) +
             " == episode_steps=" + std::to_string(cfg.episode_steps) +
             "); reset it before stepping (autoreset=" + (cfg.autoreset ? "True" : "False") + ")";
    case STEP_BAD_STATE:
      return "env " + std::to_string(env) + " has a corrupt state (row=" + std::to_string(row) +
             ", col=" + std::to_string(col) + ", t=" + std::to_string(t) + ", size=" +
             std::to_string(cfg.size) + ", episode_steps=" + std::to_string(cfg.episode_steps) +
             ")";
    default:
      return head + ": unknown step error " + std::to_string(code);
  }
}

std::string render_error_message(int64_t env, int32_t length, int32_t max_len) {
  if (length == RENDER_BAD_STATE)
    return "render_tokens: env " + std::to_string(env) +
           " has a corrupt state (position off the grid or a neighbour's tile is not 0, 1 or 2)";
  return "render_tokens: env " + std::to_string(env) + "'s turn is " + std::to_string(length) +
         " tokens, more than TokenTable.max_len=" + std::to_string(max_len);
}

}  // namespace ws
