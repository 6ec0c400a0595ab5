#include "config.h"

#include <cmath>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace ws {
namespace {

template <typename T>
std::string str(T v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

void check_int(const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    throw std::invalid_argument(std::string("Config.") + name + "=" + str(v) +
                                " is out of bounds [" + str(lo) + ", " + str(hi) + "]");
}

void check_float(const char* name, double v, double lo, double hi) {
  if (!std::isfinite(v) || v < lo || v > hi)
    throw std::invalid_argument(std::string("Config.") + name + "=" + str(v) +
                                " is out of bounds [" + str(lo) + ", " + str(hi) + "]");
}

// int(fraction * interior) as Python computes it: double product, truncation toward zero.
int64_t trunc_product(double fraction, int64_t count) {
  return static_cast<int64_t>(fraction * static_cast<double>(count));
}

}  // namespace

// One pass both validates and derives (validate() is prepare() without its result), so the
// bounds that are checked are the ones that are used.
Config prepare(const Config& cfg) {
  check_int("size", cfg.size, MIN_SIZE, MAX_SIZE);
  check_int("episode_steps", cfg.episode_steps, 1, MAX_EPISODE_STEPS);
  check_float("wind_prob", cfg.wind_prob, 0.0, 1.0);
  check_float("step_reward", cfg.step_reward, -MAX_ABS_REWARD, MAX_ABS_REWARD);
  check_float("mold_reward", cfg.mold_reward, -MAX_ABS_REWARD, MAX_ABS_REWARD);
  check_float("gold_reward", cfg.gold_reward, -MAX_ABS_REWARD, MAX_ABS_REWARD);
  check_int("walk_min_mult", cfg.walk_min_mult, 0, MAX_WALK_MULT);
  check_int("walk_max_mult", cfg.walk_max_mult, cfg.walk_min_mult, MAX_WALK_MULT);
  check_float("mold_fraction_min", cfg.mold_fraction_min, 0.0, 1.0);
  check_float("mold_fraction_max", cfg.mold_fraction_max, cfg.mold_fraction_min, 1.0);
  check_float("gold_ratio", cfg.gold_ratio, 0.0, 1.0);
  Config c = cfg;
  c.n = c.size - 2;
  c.interior = static_cast<int64_t>(c.n) * c.n;
  c.mold_lo = trunc_product(c.mold_fraction_min, c.interior) + 1;
  c.mold_hi = trunc_product(c.mold_fraction_max, c.interior) - 1;
  if (c.mold_lo > c.mold_hi)
    throw std::invalid_argument("Config.mold_fraction_min/max: the Mold count range [" +
                                str(c.mold_lo) + ", " + str(c.mold_hi) + "] of a " + str(c.size) +
                                "x" + str(c.size) + " grid is empty; widen the fractions or enlarge size");
  int64_t gold_at_hi = trunc_product(c.gold_ratio, c.mold_hi);
  if (gold_at_hi < 1) gold_at_hi = 1;
  if (c.interior - c.mold_hi - gold_at_hi < 1)
    throw std::invalid_argument("Config.gold_ratio=" + str(c.gold_ratio) + ": with up to " +
                                str(c.mold_hi) +
                                " interior Mold cells the Gold tiles could cover every Path cell, "
                                "leaving no start cell; lower gold_ratio or mold_fraction_max");
  // p * 2^32 is exact in double (a power-of-two scale), so floor() is the spec's floor.
  const double scaled = std::floor(c.wind_prob * 4294967296.0);
  c.wind_threshold = scaled >= 4294967296.0 ? (uint64_t{1} << 32) : static_cast<uint64_t>(scaled);
  return c;
}

void validate(const Config& cfg) { (void)prepare(cfg); }

std::vector<int32_t> compute_bfs_order(int32_t size) {
  const int32_t cells = size * size;
  std::vector<int32_t> order(static_cast<size_t>(cells));
  std::vector<uint8_t> seen(static_cast<size_t>(cells), 0);
  int32_t head = 0, tail = 0;
  const int32_t centre = (size / 2) * size + size / 2;
  order[tail++] = centre;
  seen[centre] = 1;
  // N, S, E, W as DESIGN.md says (not the N, E, S, W order used everywhere else).
  static const int32_t dr[4] = {-1, 1, 0, 0};
  static const int32_t dc[4] = {0, 0, 1, -1};
  while (head < tail) {
    const int32_t u = order[head++];
    const int32_t r = u / size, c = u % size;
    for (int k = 0; k < 4; ++k) {
      const int32_t nr = r + dr[k], nc = c + dc[k];
      if (nr < 0 || nr >= size || nc < 0 || nc >= size) continue;
      const int32_t v = nr * size + nc;
      if (seen[v]) continue;
      seen[v] = 1;
      order[tail++] = v;
    }
  }
  return order;
}

const int32_t* cached_bfs_order(int32_t size) {
  static std::mutex mu;
  static std::unordered_map<int32_t, std::unique_ptr<std::vector<int32_t>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[size];
  if (!slot) slot = std::make_unique<std::vector<int32_t>>(compute_bfs_order(size));
  return slot->data();
}

}  // namespace ws
