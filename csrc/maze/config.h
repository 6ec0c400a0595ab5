// Host-side validation of ws::Config and its derived values (docs/maze_spec.md, config.py).
#pragma once

#include <cstdint>
#include <vector>

#include "rules.h"

namespace ws {

// Bounds, identical to welfare_server/maze/config.py so both sides refuse the same configs.
constexpr int32_t MIN_SIZE = 4;
constexpr int32_t MAX_SIZE = 1000;
constexpr int32_t MAX_EPISODE_STEPS = 4096;
constexpr int32_t MAX_WALK_MULT = 1000;
constexpr double MAX_ABS_REWARD = 1.0e6;

// Throws std::invalid_argument naming the field and its bound.
void validate(const Config& cfg);
// Validates and returns a copy with the derived fields filled in.
Config prepare(const Config& cfg);

// A Config validated and derived once, then read-only, so its derived values can never go stale
// behind a changed field. The batch calls of both backends take one: the binding builds it once
// per MazeBatch and every call reads it as it is (at B=1 a call is a few hundred nanoseconds, so
// validating and deriving per call was a visible share). A plain Config converts implicitly,
// prepared on the spot: convenient for tests, per call for callers that pass one each time.
class PreparedConfig {
 public:
  PreparedConfig(const Config& cfg) : cfg_(prepare(cfg)) {}  // NOLINT: implicit on purpose
  const Config& get() const { return cfg_; }

 private:
  Config cfg_;
};

// BFS visiting order of a size x size grid from (size/2, size/2), neighbours pushed N, S, E, W
// (spec "Generation" step 7).
std::vector<int32_t> compute_bfs_order(int32_t size);
// The same, computed once per size and kept for the life of the process (pointer stays valid).
const int32_t* cached_bfs_order(int32_t size);

}  // namespace ws
