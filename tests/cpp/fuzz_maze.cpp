// libFuzzer harness for the maze core's public C++ API (csrc/maze: config.h, cpu_backend.h,
// rules.h). Built only with -DWELFARE_BUILD_FUZZ=ON (Clang); run it with scripts/fuzz.sh.
//
// Each input is decoded with FuzzedDataProvider into:
//   1. a Config, every field (derived ones included) drawn from: its default, an in-range value,
//      a boundary/special value (bound +- 1 ulp, NaN, +-inf, INT_MIN/MAX, ...) or raw bits.
//      prepare()/validate() must throw std::invalid_argument exactly when an independent
//      re-statement of the bounds (docs/maze_spec.md, config.py) says the config is invalid, and a
//      prepared config must carry correct derived fields (stale derived inputs are ignored).
//   2. for a valid config (size folded to <= 24, num_envs <= 8; rarely 16 or 1025 envs on a grid
//      <= 8 so the calls that split only at larger batches run threaded too): a batch of state buffers
//      (tests/cpp/batch.h, initially the 0xEE/-7 garbage the tests use) and up to MAX_OPS
//      operations: reset (all / masked with raw mask bytes), step (valid, out-of-range and
//      off-grid actions), clone (good and bad ranges, independent or not), observe, render tokens
//      (synthetic token tables; max_len exact, too small, 0 or random; corrupt tables), oracle,
//      config changes, calls with an invalid config, calls with null pointers / negative
//      num_envs, and corruption of any state byte (positions off the grid, t outside
//      [0, episode_steps], done not 0/1, tiles > 2, extreme episode indices and keys).
// Every call is made twice, on the batch with num_threads = 1 or 2 and on a shadow copy with the
// other count; both must agree exactly (results and error messages). Every result is compared
// with a reference written here from the spec (generation uses rules.h's portable generator with
// an independently computed BFS order, so the CPU backend's SIMD sampler is checked against it);
// every rejected call must throw std::invalid_argument and leave all buffers byte-identical.
// A crash, a sanitizer report, any other exception or a failed FUZZ_CHECK aborts the run.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "batch.h"
#include "maze/config.h"
#include "maze/cpu_backend.h"
#include "maze/rules.h"

using namespace ws;

// The last message call() caught, printed with a failed check.
static std::string g_last_error;

#define FUZZ_CHECK(cond)                                                                     \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed (last error: '%s')\n", __FILE__,     \
                   __LINE__, #cond, g_last_error.c_str());                                   \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

namespace {

using FDP = FuzzedDataProvider;

constexpr int32_t MAX_RUN_SIZE = 24;
constexpr int64_t MAX_RUN_ENVS = 8;
constexpr int MAX_OPS = 48;
constexpr int32_t I32_MIN = std::numeric_limits<int32_t>::min();
constexpr int32_t I32_MAX = std::numeric_limits<int32_t>::max();
constexpr int64_t I64_MIN = std::numeric_limits<int64_t>::min();
constexpr int64_t I64_MAX = std::numeric_limits<int64_t>::max();
const int DR[4] = {-1, 0, 1, 0};  // N, E, S, W
const int DC[4] = {0, 1, 0, -1};

// ---- decoding -----------------------------------------------------------------------------------
template <typename T, size_t N>
T pick(FDP& p, const T (&v)[N]) {
  return v[p.ConsumeIntegralInRange<size_t>(0, N - 1)];
}

// Mode 0 (also what an exhausted input gives) is the default, so short inputs stay valid.
int32_t sat32(int64_t v) { return int32_t(v < I32_MIN ? I32_MIN : (v > I32_MAX ? I32_MAX : v)); }

// lo > hi is allowed (walk_max_mult's range starts at a fuzzed walk_min_mult).
int32_t fuzz_i32(FDP& p, int32_t def, int32_t lo, int32_t hi) {
  switch (p.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return def;
    case 1: return lo <= hi ? p.ConsumeIntegralInRange<int32_t>(lo, hi) : lo;
    case 2: {
      const int32_t v[] = {sat32(int64_t(lo) - 1), lo, hi, sat32(int64_t(hi) + 1), 0, -1, I32_MIN,
                           I32_MAX};
      return pick(p, v);
    }
    default: return p.ConsumeIntegral<int32_t>();
  }
}

double fuzz_f64(FDP& p, double def, double lo, double hi) {
  const double inf = std::numeric_limits<double>::infinity();
  switch (p.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return def;
    case 1: return lo + (hi - lo) * p.ConsumeProbability<double>();
    case 2: {
      const double v[] = {lo, hi, std::nextafter(lo, -inf), std::nextafter(hi, inf),
                          std::numeric_limits<double>::quiet_NaN(), inf, -inf, -0.0,
                          std::numeric_limits<double>::denorm_min(), 1e308, -1e308, 0.5};
      return pick(p, v);
    }
    default: {
      const uint64_t bits = p.ConsumeIntegral<uint64_t>();
      double d;
      std::memcpy(&d, &bits, sizeof d);
      return d;
    }
  }
}

float fuzz_f32(FDP& p, float def, float lo, float hi) {
  const float inf = std::numeric_limits<float>::infinity();
  switch (p.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return def;
    case 1: return lo + (hi - lo) * p.ConsumeProbability<float>();
    case 2: {
      const float v[] = {lo, hi, std::nextafter(lo, -inf), std::nextafter(hi, inf),
                         std::numeric_limits<float>::quiet_NaN(), inf, -inf, -0.0f,
                         std::numeric_limits<float>::denorm_min(), 3e38f};
      return pick(p, v);
    }
    default: {
      const uint32_t bits = p.ConsumeIntegral<uint32_t>();
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
  }
}

Config decode_config(FDP& p) {
  Config c;
  c.size = fuzz_i32(p, 10, MIN_SIZE, MAX_RUN_SIZE);
  c.episode_steps = fuzz_i32(p, 15, 1, 20);
  c.wind_prob = fuzz_f64(p, 0.1, 0.0, 1.0);
  c.melting = p.ConsumeBool() ? false : true;
  c.step_reward = fuzz_f32(p, -0.1f, -1e6f, 1e6f);
  c.mold_reward = fuzz_f32(p, -10.0f, -1e6f, 1e6f);
  c.gold_reward = fuzz_f32(p, 20.0f, -1e6f, 1e6f);
  c.walk_min_mult = fuzz_i32(p, 5, 0, 30);
  c.walk_max_mult = fuzz_i32(p, 15, c.walk_min_mult, 60);
  c.mold_fraction_min = fuzz_f64(p, 0.10, 0.0, 1.0);
  c.mold_fraction_max = fuzz_f64(p, 0.50, c.mold_fraction_min, 1.0);
  c.gold_ratio = fuzz_f64(p, 0.2, 0.0, 1.0);
  c.shuffle_directions = p.ConsumeBool() ? false : true;
  c.autoreset = p.ConsumeBool();
  c.seed = p.ConsumeIntegral<uint64_t>();
  // Derived fields are the core's to fill in: stale or absurd caller values must not matter.
  if (p.ConsumeBool()) {
    c.n = p.ConsumeIntegral<int32_t>();
    c.interior = p.ConsumeIntegral<int64_t>();
    c.mold_lo = p.ConsumeIntegral<int64_t>();
    c.mold_hi = p.ConsumeIntegral<int64_t>();
    c.wind_threshold = p.ConsumeIntegral<uint64_t>();
  }
  return c;
}

// ---- config reference (docs/maze_spec.md, welfare_server/maze/config.py) -----------------------
bool in_f(double v, double lo, double hi) { return std::isfinite(v) && v >= lo && v <= hi; }

bool expect_valid(const Config& c) {
  if (c.size < 4 || c.size > 1000) return false;
  if (c.episode_steps < 1 || c.episode_steps > 4096) return false;
  if (!in_f(c.wind_prob, 0, 1)) return false;
  if (!in_f(c.step_reward, -1e6, 1e6) || !in_f(c.mold_reward, -1e6, 1e6) ||
      !in_f(c.gold_reward, -1e6, 1e6))
    return false;
  if (c.walk_min_mult < 0 || c.walk_min_mult > 1000) return false;
  if (c.walk_max_mult < c.walk_min_mult || c.walk_max_mult > 1000) return false;
  if (!in_f(c.mold_fraction_min, 0, 1) || !in_f(c.mold_fraction_max, c.mold_fraction_min, 1))
    return false;
  if (!in_f(c.gold_ratio, 0, 1)) return false;
  const int64_t n = c.size - 2, I = n * n;
  const int64_t lo = int64_t(c.mold_fraction_min * double(I)) + 1;
  const int64_t hi = int64_t(c.mold_fraction_max * double(I)) - 1;
  if (lo > hi) return false;
  int64_t g = int64_t(c.gold_ratio * double(hi));
  if (g < 1) g = 1;
  return I - hi - g >= 1;
}

void check_prepared(const Config& c, const Config& p) {
  FUZZ_CHECK(p.size == c.size && p.episode_steps == c.episode_steps);
  FUZZ_CHECK(std::memcmp(&p.wind_prob, &c.wind_prob, sizeof(double)) == 0);
  FUZZ_CHECK(p.melting == c.melting && p.shuffle_directions == c.shuffle_directions &&
             p.autoreset == c.autoreset && p.seed == c.seed);
  FUZZ_CHECK(p.walk_min_mult == c.walk_min_mult && p.walk_max_mult == c.walk_max_mult);
  const int64_t n = c.size - 2, I = n * n;
  FUZZ_CHECK(p.n == n && p.interior == I);
  FUZZ_CHECK(p.mold_lo == int64_t(c.mold_fraction_min * double(I)) + 1);
  FUZZ_CHECK(p.mold_hi == int64_t(c.mold_fraction_max * double(I)) - 1);
  FUZZ_CHECK(p.mold_lo >= 1 && p.mold_lo <= p.mold_hi && p.mold_hi < I);
  const uint64_t two32 = uint64_t{1} << 32;
  const uint64_t want = c.wind_prob >= 1.0 ? two32 : uint64_t(c.wind_prob * 4294967296.0);
  FUZZ_CHECK(p.wind_threshold == want && p.wind_threshold <= two32);
}

// ---- batch helpers ------------------------------------------------------------------------------
bool on_grid(int64_t S, int64_t r, int64_t c) { return r >= 0 && r < S && c >= 0 && c < S; }

bool same_all(const Batch& a, const Batch& b) {
  // bitwise (memcmp, but an empty vector's data() may be null)
  bool rewards = a.reward.size() == b.reward.size();
  for (size_t j = 0; rewards && j < a.reward.size(); ++j)
    rewards = std::memcmp(&a.reward[j], &b.reward[j], sizeof(float)) == 0;
  return a.same_state(b) && rewards &&
         a.tile_entered == b.tile_entered && a.tile_pushed == b.tile_pushed &&
         a.out_wind == b.out_wind && a.out_done == b.out_done;
}

// Calls f; returns "" if it returned, the message if it threw std::invalid_argument. Anything
// else propagates (an uncaught exception is a crash for libFuzzer).
template <typename F>
std::string call(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    g_last_error = m;
    return m.empty() ? std::string("<empty message>") : m;
  }
  return std::string();
}

// Spec "Generation" step 7: BFS from the centre, neighbours pushed N, S, E, W.
std::vector<int32_t> ref_bfs_order(int32_t S) {
  std::vector<int32_t> order;
  std::vector<uint8_t> seen(size_t(S) * S, 0);
  const int32_t centre = (S / 2) * S + S / 2;
  order.push_back(centre);
  seen[size_t(centre)] = 1;
  const int dr[4] = {-1, 1, 0, 0}, dc[4] = {0, 0, 1, -1};
  for (size_t h = 0; h < order.size(); ++h) {
    const int32_t r = order[h] / S, c = order[h] % S;
    for (int k = 0; k < 4; ++k) {
      const int32_t nr = r + dr[k], nc = c + dc[k];
      if (!on_grid(S, nr, nc) || seen[size_t(nr * S + nc)]) continue;
      seen[size_t(nr * S + nc)] = 1;
      order.push_back(nr * S + nc);
    }
  }
  return order;
}

struct Ctx {
  Config cfg;  // what the API is given (possibly with stale derived fields)
  Config P;    // prepared, for the references
  int32_t S = 0;
  int64_t B = 0;
  int max_ops = MAX_OPS;
  std::vector<int32_t> bfs;
};

// Maze invariants (spec "Generation"): border Mold, Mold count <= hi, Gold count as step 6
// says, start = first Path cell in BFS order.
void check_maze(const Ctx& x, const uint8_t* g, int32_t r, int32_t c) {
  const int32_t S = x.S;
  int64_t mold = 0, gold = 0;
  for (int32_t i = 0; i < S; ++i)
    for (int32_t j = 0; j < S; ++j) {
      const uint8_t t = g[i * S + j];
      FUZZ_CHECK(t <= GOLD);
      if (i == 0 || j == 0 || i == S - 1 || j == S - 1) {
        FUZZ_CHECK(t == MOLD);
      } else {
        mold += t == MOLD;
        gold += t == GOLD;
      }
    }
  const int64_t I = x.P.interior;
  FUZZ_CHECK(mold <= x.P.mold_hi);
  int64_t G = int64_t(x.P.gold_ratio * double(mold));
  if (G < 1) G = 1;
  if (G > I - mold) G = I - mold;
  FUZZ_CHECK(gold == G);
  FUZZ_CHECK(I - mold - gold >= 1);
  int32_t first = -1;
  for (int32_t idx : x.bfs)
    if (g[idx] == PATH) {
      first = idx;
      break;
    }
  FUZZ_CHECK(first == r * S + c);
}

void ref_reset_env(const Ctx& x, Batch& b, int64_t i) {
  const uint64_t key = episode_key(x.P.seed, uint64_t(i), uint64_t(b.episode[size_t(i)]));
  int32_t r = -1, c = -1;
  generate_maze(x.P, key, b.env_grid(i), x.bfs.data(), r, c);  // portable sampler
  check_maze(x, b.env_grid(i), r, c);
  b.row[size_t(i)] = r;
  b.col[size_t(i)] = c;
  b.t[size_t(i)] = 0;
  b.wind_from[size_t(i)] = -1;
  b.done[size_t(i)] = 0;
  b.step_key[size_t(i)] = step_key_of(key);
  b.origin_env[size_t(i)] = i;
  b.origin_episode[size_t(i)] = b.episode[size_t(i)];
}

bool ref_step_ok(const Ctx& x, const Batch& b, int64_t i, int32_t a) {
  const size_t k = size_t(i);
  const int64_t r = b.row[k], c = b.col[k], t = b.t[k];
  if (!on_grid(x.S, r, c)) return false;
  if (t < 0 || t >= x.P.episode_steps) return false;
  if (b.done[k] != 0) return false;
  if (a < 0 || a > 3) return false;
  return on_grid(x.S, r + DR[a], c + DC[a]);
}

void ref_step_env(const Ctx& x, Batch& b, int64_t i, int32_t a) {
  const Config& P = x.P;
  const size_t k = size_t(i);
  const int32_t S = x.S;
  uint8_t* g = b.env_grid(i);
  int32_t row = b.row[k], col = b.col[k];
  const int32_t t = b.t[k];
  const uint64_t key = b.step_key[k];
  float reward = P.step_reward;
  auto enter = [&](int32_t r, int32_t c) {
    if (P.melting) g[row * S + col] = MOLD;
    const int32_t tile = g[r * S + c];
    if (tile == MOLD) {
      reward += P.mold_reward;
    } else if (tile == GOLD) {
      reward += P.gold_reward;
      g[r * S + c] = PATH;
    }
    row = r;
    col = c;
    return tile;
  };
  const int32_t entered = enter(row + DR[a], col + DC[a]);
  int32_t pushed = -1, wind = -1;
  const uint64_t base = uint64_t(t) * 4;
  if (bernoulli(key, base, P.wind_threshold)) {
    const int32_t from = int32_t(uniform(key, base + 1, 4));
    const int to = (from + 2) % 4;
    if (on_grid(S, int64_t(row) + DR[to], int64_t(col) + DC[to])) {
      pushed = enter(row + DR[to], col + DC[to]);
      wind = from;
    }
  }
  const uint8_t done = (t + 1) == P.episode_steps;
  b.row[k] = row;
  b.col[k] = col;
  b.t[k] = t + 1;
  b.wind_from[k] = wind;
  b.done[k] = done;
  b.reward[k] = reward;
  b.tile_entered[k] = entered;
  b.tile_pushed[k] = pushed;
  b.out_wind[k] = wind;
  b.out_done[k] = done;
  if (P.autoreset && done) {
    b.episode[k] = int64_t(uint64_t(b.episode[k]) + 1);  // int64 tensor arithmetic wraps
    ref_reset_env(x, b, i);
  }
}

// Spec "Episode": the prompt order (Lehmer code of uniform(step_key, 4t+2, 24)).
int ref_prompt_order(const Ctx& x, int32_t row, int32_t col, int32_t t, uint64_t key,
                     int32_t order[4]) {
  int32_t perm[4] = {0, 1, 2, 3};
  if (x.P.shuffle_directions) {
    const uint32_t r = uniform(key, uint64_t(t) * 4 + 2, 24);
    std::vector<int32_t> rest = {0, 1, 2, 3};
    const uint32_t picks[3] = {r / 6, (r % 6) / 2, r % 2};
    for (int j = 0; j < 3; ++j) {
      perm[j] = rest[picks[j]];
      rest.erase(rest.begin() + picks[j]);
    }
    perm[3] = rest[0];
  }
  int n = 0;
  for (int d : perm)
    if (on_grid(x.S, int64_t(row) + DR[d], int64_t(col) + DC[d])) order[n++] = d;
  for (int j = n; j < 4; ++j) order[j] = -1;
  return n;
}

// Spec "Prompt text" fragments (layout: rules.h Fragment); returns -1 for a corrupt state.
int ref_fragments(const Ctx& x, const Batch& b, int64_t i, std::vector<int32_t>& fr) {
  const size_t k = size_t(i);
  const int32_t S = x.S, row = b.row[k], col = b.col[k], wind = b.wind_from[k];
  fr.clear();
  if (!on_grid(S, row, col)) return -1;
  fr.push_back(8);
  if (wind >= 0 && wind < 4) {
    fr.push_back(wind);
    fr.push_back(5);
  } else {
    fr.push_back(4);
  }
  fr.push_back(58 + col);
  fr.push_back(58 + S + row);
  fr.push_back(6);
  int32_t order[4];
  const int n = ref_prompt_order(x, row, col, b.t[k], b.step_key[k], order);
  const uint8_t* g = b.grid.data() + i * S * S;
  for (int j = 0; j < n; ++j) {
    const int d = order[j];
    const int tile = g[(row + DR[d]) * S + col + DC[d]];
    if (tile > 2) return -1;
    fr.push_back(10 + ((d * 3 + tile) * 2 + (j == 0)) * 2 + (j == n - 1));
  }
  fr.push_back(7);
  fr.push_back(9);
  return int(fr.size());
}

// Oracle reference: multi-source BFS from every Gold except the agent's cell, through non-Mold
// cells, never through the agent's cell (a shortest path from it never returns to it).
void ref_oracle(const Ctx& x, const Batch& b, int64_t i, int32_t& dist, uint8_t opt[4]) {
  const int32_t S = x.S, row = b.row[size_t(i)], col = b.col[size_t(i)];
  for (int d = 0; d < 4; ++d) opt[d] = 0;
  dist = -1;
  if (!on_grid(S, row, col)) return;
  const uint8_t* g = b.grid.data() + i * S * S;
  const int32_t start = row * S + col;
  std::vector<int32_t> dd(size_t(S) * S, -1), q;
  for (int32_t v = 0; v < S * S; ++v)
    if (v != start && g[v] == GOLD) {
      dd[size_t(v)] = 0;
      q.push_back(v);
    }
  for (size_t h = 0; h < q.size(); ++h) {
    const int32_t u = q[h], ur = u / S, uc = u % S;
    for (int d = 0; d < 4; ++d) {
      const int32_t r = ur + DR[d], c = uc + DC[d];
      if (!on_grid(S, r, c)) continue;
      const int32_t v = r * S + c;
      if (v == start || g[v] == MOLD || dd[size_t(v)] >= 0) continue;
      dd[size_t(v)] = dd[size_t(u)] + 1;
      q.push_back(v);
    }
  }
  for (int d = 0; d < 4; ++d) {
    const int32_t r = row + DR[d], c = col + DC[d];
    if (!on_grid(S, r, c) || g[r * S + c] == MOLD || dd[size_t(r * S + c)] < 0) continue;
    const int32_t cand = 1 + dd[size_t(r * S + c)];
    if (dist < 0 || cand < dist) dist = cand;
  }
  bool any_open = false;
  for (int d = 0; d < 4; ++d) {
    const int32_t r = row + DR[d], c = col + DC[d];
    if (on_grid(S, r, c) && g[r * S + c] != MOLD) any_open = true;
  }
  for (int d = 0; d < 4; ++d) {
    const int32_t r = row + DR[d], c = col + DC[d];
    if (!on_grid(S, r, c)) continue;
    const bool open = g[r * S + c] != MOLD;
    if (dist >= 0)
      opt[d] = open && dd[size_t(r * S + c)] >= 0 && 1 + dd[size_t(r * S + c)] == dist;
    else
      opt[d] = any_open ? open : 1;
  }
}

// A heap array of exactly n elements (n may be 0: new[] still gives a unique non-null pointer),
// so ASan sees any write past the end.
template <typename T>
struct Buf {
  size_t n;
  std::unique_ptr<T[]> p;
  Buf(size_t n_, T fill) : n(n_), p(new T[n_]) {
    for (size_t j = 0; j < n; ++j) p[j] = fill;
  }
  T* data() { return p.get(); }
  T& operator[](size_t j) { return p[j]; }
  bool operator==(const Buf& o) const {
    return n == o.n && std::memcmp(p.get(), o.p.get(), n * sizeof(T)) == 0;
  }
};

int threads_of(FDP& p) { return p.ConsumeBool() ? 2 : 1; }

// ---- operations ---------------------------------------------------------------------------------
struct Run {
  FDP& p;
  Ctx x;
  Batch b, shadow;  // shadow gets every call with the other thread count
  Run(FDP& p_, const Ctx& x_) : p(p_), x(x_), b(x_.B, x_.S), shadow(x_.B, x_.S) {}

  void expect_same_pair(const std::string& e1, const std::string& e2) {
    FUZZ_CHECK(e1 == e2);
    FUZZ_CHECK(same_all(b, shadow));
  }

  void op_reset() {
    const int th = threads_of(p);
    std::vector<uint8_t> mask;
    const bool masked = p.ConsumeBool();
    if (masked) {
      mask.resize(size_t(x.B) + 1);  // +1: never a null data() for B == 0
      for (int64_t i = 0; i < x.B; ++i) mask[size_t(i)] = p.ConsumeIntegral<uint8_t>();
    }
    const uint8_t* m = masked ? mask.data() : nullptr;
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_reset(x.cfg, b.view(), m, th); });
    const std::string e2 = call([&] { cpu_reset(x.cfg, shadow.view(), m, 3 - th); });
    expect_same_pair(e1, e2);
    FUZZ_CHECK(e1.empty());
    Batch ref = snap;
    for (int64_t i = 0; i < x.B; ++i)
      if (!m || m[i]) ref_reset_env(x, ref, i);
    FUZZ_CHECK(same_all(b, ref));
  }

  void op_step() {
    const int th = threads_of(p);
    std::vector<int32_t> actions(size_t(x.B) + 1, 0);
    for (int64_t i = 0; i < x.B; ++i) {
      const size_t k = size_t(i);
      int32_t a = 0;
      switch (p.ConsumeIntegralInRange<int>(0, 5)) {
        case 3: a = p.ConsumeIntegralInRange<int32_t>(0, 3); break;
        case 4: {
          const int32_t v[] = {-1, 4, 5, 255, 256, I32_MIN, I32_MAX};
          a = pick(p, v);
          break;
        }
        case 5: a = p.ConsumeIntegral<int32_t>(); break;
        default: {  // a valid direction when the position allows one
          std::vector<int32_t> ok;
          for (int d = 0; d < 4; ++d)
            if (on_grid(x.S, int64_t(b.row[k]) + DR[d], int64_t(b.col[k]) + DC[d])) ok.push_back(d);
          if (!ok.empty()) a = ok[p.ConsumeIntegralInRange<size_t>(0, ok.size() - 1)];
        }
      }
      actions[k] = a;
    }
    int64_t first_bad = -1;
    for (int64_t i = 0; i < x.B && first_bad < 0; ++i)
      if (!ref_step_ok(x, b, i, actions[size_t(i)])) first_bad = i;
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_step(x.cfg, b.view(), actions.data(), b.out(), th); });
    const std::string e2 =
        call([&] { cpu_step(x.cfg, shadow.view(), actions.data(), shadow.out(), 3 - th); });
    expect_same_pair(e1, e2);
    if (x.B == 0) {
      // No envs: nothing to do, even with the empty output vectors' null data().
      FUZZ_CHECK(e1.empty());
      FUZZ_CHECK(same_all(b, snap));
      return;
    }
    if (first_bad >= 0) {
      FUZZ_CHECK(!e1.empty());
      FUZZ_CHECK(same_all(b, snap));  // a refused step changes nothing, outputs included
      const std::string i = std::to_string(first_bad);
      FUZZ_CHECK(e1.find("actions[" + i + "]") != std::string::npos ||
                 e1.find("env " + i + " ") != std::string::npos);
      return;
    }
    FUZZ_CHECK(e1.empty());
    Batch ref = snap;
    for (int64_t i = 0; i < x.B; ++i) ref_step_env(x, ref, i, actions[size_t(i)]);
    FUZZ_CHECK(same_all(b, ref));
  }

  int64_t fuzz_index() {
    switch (p.ConsumeIntegralInRange<int>(0, 3)) {
      case 3: {
        const int64_t v[] = {-1, I64_MIN, I64_MAX, x.B, x.B + 1, int64_t(I32_MAX) + 1};
        return pick(p, v);
      }
      case 2: return p.ConsumeIntegral<int64_t>();
      default: return p.ConsumeIntegralInRange<int64_t>(0, x.B);
    }
  }

  void op_clone() {
    const int64_t src = fuzz_index(), lo = fuzz_index(), hi = fuzz_index();
    const bool independent = p.ConsumeBool();
    const bool bad = src < 0 || src >= x.B || lo < 0 || lo > hi || hi > x.B || (src >= lo && src < hi);
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_clone(x.cfg, b.view(), src, lo, hi, independent); });
    const std::string e2 = call([&] { cpu_clone(x.cfg, shadow.view(), src, lo, hi, independent); });
    expect_same_pair(e1, e2);
    if (bad) {
      FUZZ_CHECK(!e1.empty());
      FUZZ_CHECK(same_all(b, snap));
      return;
    }
    FUZZ_CHECK(e1.empty());
    Batch ref = snap;
    const size_t s = size_t(src), S2 = size_t(x.S) * x.S;
    for (int64_t d = lo; d < hi; ++d) {
      const size_t k = size_t(d);
      std::memcpy(ref.env_grid(d), ref.env_grid(int64_t(s)), S2);
      ref.row[k] = ref.row[s];
      ref.col[k] = ref.col[s];
      ref.t[k] = ref.t[s];
      ref.wind_from[k] = ref.wind_from[s];
      ref.done[k] = ref.done[s];
      ref.episode[k] = ref.episode[s];
      ref.origin_env[k] = ref.origin_env[s];
      ref.origin_episode[k] = ref.origin_episode[s];
      ref.step_key[k] = independent
                            ? mix64(ref.step_key[s] ^ mix64(0x434C4F4E45000000ull + uint64_t(d)))
                            : ref.step_key[s];
    }
    FUZZ_CHECK(same_all(b, ref));
  }

  void op_observe() {
    const int th = threads_of(p);
    const size_t n = size_t(x.B) * 4;
    Buf<int32_t> nb1(n, 77), or1(n, 77), nb2(n, 77), or2(n, 77);
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_observe(x.cfg, b.view(), nb1.data(), or1.data(), th); });
    const std::string e2 =
        call([&] { cpu_observe(x.cfg, shadow.view(), nb2.data(), or2.data(), 3 - th); });
    expect_same_pair(e1, e2);
    FUZZ_CHECK(e1.empty());
    FUZZ_CHECK(same_all(b, snap));
    FUZZ_CHECK(nb1 == nb2 && or1 == or2);
    for (int64_t i = 0; i < x.B; ++i) {
      const size_t k = size_t(i);
      const int32_t row = b.row[k], col = b.col[k];
      int32_t order[4];
      if (on_grid(x.S, row, col)) {
        for (int d = 0; d < 4; ++d) {
          const int32_t r = row + DR[d], c = col + DC[d];
          FUZZ_CHECK(nb1[k * 4 + d] == (on_grid(x.S, r, c) ? int32_t(b.grid[k * x.S * x.S + r * x.S + c]) : -1));
        }
        ref_prompt_order(x, row, col, b.t[k], b.step_key[k], order);
      } else {  // a corrupt position lists nothing
        for (int d = 0; d < 4; ++d) {
          FUZZ_CHECK(nb1[k * 4 + d] == -1);
          order[d] = -1;
        }
      }
      for (int d = 0; d < 4; ++d) FUZZ_CHECK(or1[k * 4 + d] == order[d]);
    }
  }

  void op_oracle() {
    const int th = threads_of(p);
    const size_t n = size_t(x.B);
    Buf<int32_t> d1(n, 77), d2(n, 77);
    Buf<uint8_t> o1(n * 4, 77), o2(n * 4, 77);
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_oracle(x.cfg, b.view(), d1.data(), o1.data(), th); });
    const std::string e2 =
        call([&] { cpu_oracle(x.cfg, shadow.view(), d2.data(), o2.data(), 3 - th); });
    expect_same_pair(e1, e2);
    FUZZ_CHECK(e1.empty());
    FUZZ_CHECK(same_all(b, snap));
    FUZZ_CHECK(d1 == d2 && o1 == o2);
    for (int64_t i = 0; i < x.B; ++i) {
      int32_t dist;
      uint8_t opt[4];
      ref_oracle(x, b, i, dist, opt);
      FUZZ_CHECK(d1[size_t(i)] == dist);
      for (int d = 0; d < 4; ++d) FUZZ_CHECK(o1[size_t(i) * 4 + d] == opt[d]);
    }
  }

  void op_render() {
    const int th = threads_of(p);
    const int32_t nf = 58 + 2 * x.S;
    FUZZ_CHECK(expected_num_fragments(x.S) == nf);
    // fragment f is len(f) tokens f * 8 + j
    std::vector<int32_t> lens(size_t(nf), 1);
    const int lmode = p.ConsumeIntegralInRange<int>(0, 2);
    const int ka = p.ConsumeIntegralInRange<int>(0, 7), kb = p.ConsumeIntegralInRange<int>(0, 7);
    for (int32_t f = 0; f < nf; ++f) {
      if (lmode == 1) lens[size_t(f)] = (f * ka + kb) % 5;  // zero-length fragments included
      if (lmode == 2) lens[size_t(f)] = p.ConsumeIntegralInRange<int32_t>(0, 7);
    }
    std::vector<int32_t> offsets(size_t(nf) + 1, 0), ids;
    for (int32_t f = 0; f < nf; ++f) {
      for (int32_t j = 0; j < lens[size_t(f)]; ++j) ids.push_back(f * 8 + j);
      offsets[size_t(f) + 1] = int32_t(ids.size());
    }
    ids.push_back(-12345);  // never empty: data() is not null
    // reference renders
    std::vector<std::vector<int32_t>> want(size_t(x.B));
    std::vector<int32_t> want_len(size_t(x.B));
    int32_t longest = 0;
    for (int64_t i = 0; i < x.B; ++i) {
      std::vector<int32_t> fr;
      if (ref_fragments(x, b, i, fr) < 0) {
        want_len[size_t(i)] = RENDER_BAD_STATE;
        continue;
      }
      for (int32_t f : fr)
        for (int32_t j = 0; j < lens[size_t(f)]; ++j) want[size_t(i)].push_back(f * 8 + j);
      want_len[size_t(i)] = int32_t(want[size_t(i)].size());
      if (want_len[size_t(i)] > longest) longest = want_len[size_t(i)];
    }
    int32_t max_len;
    switch (p.ConsumeIntegralInRange<int>(0, 4)) {
      case 1: max_len = longest > 0 ? longest - 1 : 0; break;
      case 2: max_len = p.ConsumeIntegralInRange<int32_t>(0, 64); break;
      case 3: max_len = 0; break;
      case 4: max_len = longest + p.ConsumeIntegralInRange<int32_t>(1, 20); break;
      default: max_len = longest;
    }
    const int32_t pad = p.ConsumeBool() ? p.ConsumeIntegral<int32_t>() : -1;
    TokenTable tt{ids.data(), offsets.data(), nf, max_len, pad};
    bool table_bad = true;
    switch (p.ConsumeIntegralInRange<int>(0, 15)) {
      case 1: tt.num_fragments = nf + (p.ConsumeBool() ? 1 : -1); break;
      case 2: tt.max_len = p.ConsumeIntegralInRange<int32_t>(I32_MIN, -1); break;
      case 3: offsets[0] = p.ConsumeIntegralInRange<int32_t>(I32_MIN, -1); break;
      case 4: {  // a decreasing step somewhere
        const size_t f = p.ConsumeIntegralInRange<size_t>(0, size_t(nf) - 1);
        offsets[f + 1] = offsets[f] - p.ConsumeIntegralInRange<int32_t>(1, 1000);
        break;
      }
      case 5: tt.ids = nullptr; break;
      case 6: tt.offsets = nullptr; break;
      default: table_bad = false;
    }
    const size_t n = size_t(x.B) * size_t(max_len > 0 ? max_len : 0);
    const int32_t canary = 0x5A5A5A5A;
    Buf<int32_t> out1(n, canary), out2(n, canary), len1(size_t(x.B), canary), len2(size_t(x.B), canary);
    const Batch snap = b;
    const std::string e1 = call([&] { cpu_render_tokens(x.cfg, b.view(), tt, out1.data(), len1.data(), th); });
    const std::string e2 = call(
        [&] { cpu_render_tokens(x.cfg, shadow.view(), tt, out2.data(), len2.data(), 3 - th); });
    expect_same_pair(e1, e2);
    FUZZ_CHECK(same_all(b, snap));
    FUZZ_CHECK(out1 == out2 && len1 == len2);
    if (table_bad) {
      FUZZ_CHECK(!e1.empty());
      for (size_t j = 0; j < n; ++j) FUZZ_CHECK(out1[j] == canary);
      for (int64_t i = 0; i < x.B; ++i) FUZZ_CHECK(len1[size_t(i)] == canary);
      return;
    }
    int64_t first_bad = -1;
    for (int64_t i = 0; i < x.B; ++i) {
      const size_t k = size_t(i);
      const int32_t L = want_len[k];
      FUZZ_CHECK(len1[k] == L);
      const bool fits = L >= 0 && L <= max_len;
      if (!fits && first_bad < 0) first_bad = i;
      for (int32_t j = 0; j < max_len; ++j) {
        const int32_t got = out1[k * size_t(max_len) + size_t(j)];
        if (!fits)
          FUZZ_CHECK(got == canary);
        else
          FUZZ_CHECK(got == (j < L ? want[k][size_t(j)] : pad));
      }
    }
    if (first_bad < 0) {
      FUZZ_CHECK(e1.empty());
    } else {
      FUZZ_CHECK(e1.find("env " + std::to_string(first_bad) + (want_len[size_t(first_bad)] < 0 ? " " : "'s")) != std::string::npos);
    }
  }

  // Corrupts one field of one env (same bytes in the shadow).
  void op_corrupt() {
    if (x.B == 0) return;
    const int64_t i = p.ConsumeIntegralInRange<int64_t>(0, x.B - 1);
    const size_t k = size_t(i);
    const int32_t S = x.S, E = x.P.episode_steps;
    auto pos = [&]() -> int32_t {
      const int32_t v[] = {-1, S, S + 1, -S, I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1, 0, S - 1};
      switch (p.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: return pick(p, v);
        case 1: return p.ConsumeIntegral<int32_t>();
        default: return p.ConsumeIntegralInRange<int32_t>(0, S - 1);
      }
    };
    switch (p.ConsumeIntegralInRange<int>(0, 10)) {
      case 0: b.row[k] = pos(); break;
      case 1: b.col[k] = pos(); break;
      case 2: {
        const int32_t v[] = {-1, E, E + 1, E - 1, 0, I32_MIN, I32_MAX};
        b.t[k] = p.ConsumeBool() ? pick(p, v) : p.ConsumeIntegral<int32_t>();
        break;
      }
      case 3: b.done[k] = p.ConsumeIntegral<uint8_t>(); break;
      case 4: {
        const size_t c = p.ConsumeIntegralInRange<size_t>(0, size_t(S) * S - 1);
        b.env_grid(i)[c] = p.ConsumeIntegral<uint8_t>();
        break;
      }
      case 5: {
        const int32_t v[] = {-1, 0, 1, 2, 3, 4, I32_MIN, I32_MAX};
        b.wind_from[k] = p.ConsumeBool() ? pick(p, v) : p.ConsumeIntegral<int32_t>();
        break;
      }
      case 6: {
        const int64_t v[] = {I64_MAX, I64_MIN, -1, 0, I64_MAX - 1};
        b.episode[k] = p.ConsumeBool() ? pick(p, v) : p.ConsumeIntegral<int64_t>();
        break;
      }
      case 7: b.step_key[k] = p.ConsumeIntegral<uint64_t>(); break;
      case 8: b.origin_env[k] = p.ConsumeIntegral<int64_t>(); break;
      case 9: b.origin_episode[k] = p.ConsumeIntegral<int64_t>(); break;
      default: {  // a whole row of raw tile bytes around the agent
        const int32_t r = on_grid(S, b.row[k], 0) ? b.row[k] : 0;
        for (int32_t c = 0; c < S; ++c) b.env_grid(i)[r * S + c] = p.ConsumeIntegral<uint8_t>();
      }
    }
    shadow = b;
  }

  // A different valid config for the same size (mid-episode changes: t may now exceed
  // episode_steps, which the core must refuse as a corrupt state).
  void op_reconfig() {
    Config c = x.cfg;
    c.episode_steps = fuzz_i32(p, c.episode_steps, 1, 20);
    c.autoreset = p.ConsumeBool();
    c.melting = !p.ConsumeBool();
    c.shuffle_directions = !p.ConsumeBool();
    c.wind_prob = fuzz_f64(p, c.wind_prob, 0.0, 1.0);
    c.seed = p.ConsumeBool() ? p.ConsumeIntegral<uint64_t>() : c.seed;
    if (!expect_valid(c)) return;
    x.cfg = c;
    x.P = prepare(c);
  }

  // Runs one of the batch calls with the given config/view/outputs; returns the error.
  std::string any_call(int which, const Config& c, const StateView& v, Batch& bb, bool null_out) {
    const size_t n = size_t(x.B > 0 ? x.B : 0);
    std::vector<int32_t> actions(n + 1, 0), i32a(n * 4 + 1, 0), i32b(n * 4 + 1, 0);
    std::vector<uint8_t> u8(n * 4 + 1, 0);
    for (size_t k = 0; k < n; ++k)
      for (int d = 0; d < 4; ++d)
        if (on_grid(x.S, int64_t(bb.row[k]) + DR[d], int64_t(bb.col[k]) + DC[d])) actions[k] = d;
    StepOut o = bb.out();
    std::vector<int32_t> ids(1, 0), offsets(size_t(58 + 2 * x.S) + 1, 0);
    TokenTable tt{ids.data(), offsets.data(), 58 + 2 * x.S, 4, -1};
    switch (which) {
      case 0: return call([&] { cpu_reset(c, v, nullptr, 1); });
      case 1:
        if (null_out) o.tile_pushed = nullptr;
        return call([&] { cpu_step(c, v, null_out && x.B % 2 ? nullptr : actions.data(), o, 2); });
      case 2: return call([&] { cpu_clone(c, v, 0, 1, x.B, true); });
      case 3: return call([&] { cpu_observe(c, v, i32a.data(), null_out ? nullptr : i32b.data(), 2); });
      case 4:
        return call([&] {
          cpu_render_tokens(c, v, tt, null_out ? nullptr : i32a.data(), i32b.data(), 1);
        });
      default: return call([&] { cpu_oracle(c, v, null_out ? nullptr : i32a.data(), u8.data(), 2); });
    }
  }

  void op_bad_config() {
    Config c = x.cfg;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    switch (p.ConsumeIntegralInRange<int>(0, 10)) {
      case 0: { const int32_t v[] = {3, 1001, 0, -1, I32_MIN}; c.size = pick(p, v); break; }
      case 1: { const int32_t v[] = {0, 4097, -5, I32_MIN}; c.episode_steps = pick(p, v); break; }
      case 2: { const double v[] = {nan, -0.5, 1.5, HUGE_VAL, -0.0001}; c.wind_prob = pick(p, v); break; }
      case 3: { const float v[] = {float(nan), 2e6f, -HUGE_VALF}; c.step_reward = pick(p, v); break; }
      case 4: { const float v[] = {float(nan), -1.0000001e6f, HUGE_VALF}; c.mold_reward = pick(p, v); break; }
      case 5: { const float v[] = {float(nan), 1.0000001e6f, -HUGE_VALF}; c.gold_reward = pick(p, v); break; }
      case 6: { const int32_t v[] = {-1, 1001, I32_MAX}; c.walk_min_mult = pick(p, v); break; }
      case 7: c.walk_max_mult = p.ConsumeBool() ? c.walk_min_mult - 1 : 1001; break;
      case 8: { const double v[] = {nan, -0.1, 1.1}; c.mold_fraction_min = pick(p, v); break; }
      case 9: c.mold_fraction_max = p.ConsumeBool() ? nan : c.mold_fraction_min - 0.01; break;
      default: { const double v[] = {nan, -1.0, 2.0, 1.0, 0.99}; c.gold_ratio = pick(p, v); break; }
    }
    if (expect_valid(c)) return;
    const int which = p.ConsumeIntegralInRange<int>(0, 5);
    const Batch snap = b;
    const std::string e = any_call(which, c, b.view(), b, false);
    FUZZ_CHECK(e.find("Config.") != std::string::npos);
    FUZZ_CHECK(same_all(b, snap));
  }

  // Null state pointers, negative num_envs, null outputs: refused before anything is touched.
  void op_bad_view() {
    StateView v = b.view();
    bool null_out = false;
    switch (p.ConsumeIntegralInRange<int>(0, 2)) {
      case 0: v.num_envs = p.ConsumeBool() ? -1 : p.ConsumeIntegralInRange<int64_t>(I64_MIN, -1); break;
      case 1: {
        if (x.B == 0) return;
        void** fields[] = {reinterpret_cast<void**>(&v.grid), reinterpret_cast<void**>(&v.row),
                           reinterpret_cast<void**>(&v.col), reinterpret_cast<void**>(&v.t),
                           reinterpret_cast<void**>(&v.wind_from), reinterpret_cast<void**>(&v.episode),
                           reinterpret_cast<void**>(&v.step_key), reinterpret_cast<void**>(&v.done),
                           reinterpret_cast<void**>(&v.origin_env), reinterpret_cast<void**>(&v.origin_episode)};
        *pick(p, fields) = nullptr;
        break;
      }
      default:
        if (x.B == 0) return;
        null_out = true;
    }
    int which = p.ConsumeIntegralInRange<int>(0, 5);
    if (null_out && (which == 0 || which == 2)) which = 1;  // reset/clone have no outputs
    const Batch snap = b;
    const std::string e = any_call(which, x.cfg, v, b, null_out);
    FUZZ_CHECK(!e.empty());
    FUZZ_CHECK(same_all(b, snap));
  }

  void go() {
    if (!p.ConsumeBool()) {  // usually start from a reset batch (an exhausted input does)
      cpu_reset(x.cfg, b.view(), nullptr, 2);
      cpu_reset(x.cfg, shadow.view(), nullptr, 1);
      FUZZ_CHECK(same_all(b, shadow));
      for (int64_t i = 0; i < x.B; ++i) check_maze(x, b.env_grid(i), b.row[size_t(i)], b.col[size_t(i)]);
    }
    for (int op = 0; op < x.max_ops && p.remaining_bytes() > 0; ++op) {
      switch (p.ConsumeIntegralInRange<int>(0, 15)) {
        case 0: op_reset(); break;
        case 1: case 2: case 3: case 4: op_step(); break;
        case 5: op_clone(); break;
        case 6: op_observe(); break;
        case 7: op_render(); break;
        case 8: op_oracle(); break;
        case 9: case 10: case 11: op_corrupt(); break;
        case 12: op_reconfig(); break;
        case 13: op_bad_config(); break;
        case 14: op_bad_view(); break;
        default:  // observe + render + oracle of the same state, as the server does per turn
          op_observe();
          op_render();
          op_oracle();
      }
      FUZZ_CHECK(same_all(b, shadow));
    }
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FDP p(data, size);
  const Config c = decode_config(p);
  const bool valid = expect_valid(c);
  Config prepared;
  const std::string e1 = call([&] { prepared = prepare(c); });
  const std::string e2 = call([&] { validate(c); });
  FUZZ_CHECK(e1.empty() == valid);
  FUZZ_CHECK(e1 == e2);
  if (!valid) {
    FUZZ_CHECK(e1.find("Config.") == 0);
    return 0;
  }
  check_prepared(c, prepared);
  // The simulation part runs on a small grid and batch so an input takes milliseconds. Rarely a
  // larger batch (16: the oracle splits over 2 threads; 1025: render does too) on a grid of at
  // most 8 with few operations, so the threaded paths of the cheap calls run as well.
  const int bsel = p.ConsumeIntegralInRange<int>(0, int(MAX_RUN_ENVS) + 2);
  const int64_t B = bsel <= MAX_RUN_ENVS ? bsel : (bsel == MAX_RUN_ENVS + 1 ? 16 : 1025);
  const int32_t max_size = B > MAX_RUN_ENVS ? 8 : MAX_RUN_SIZE;
  Config rc = c;
  if (rc.size > max_size) rc.size = MIN_SIZE + rc.size % (max_size - MIN_SIZE + 1);
  if (!expect_valid(rc)) return 0;
  Ctx x;
  x.cfg = rc;
  x.P = prepare(rc);
  x.S = rc.size;
  x.B = B;
  x.max_ops = B > 16 ? 6 : MAX_OPS;
  x.bfs = ref_bfs_order(x.S);
  FUZZ_CHECK(compute_bfs_order(x.S) == x.bfs);
  FUZZ_CHECK(std::memcmp(cached_bfs_order(x.S), x.bfs.data(), x.bfs.size() * sizeof(int32_t)) == 0);
  Run run(p, x);
  run.go();
  return 0;
}
