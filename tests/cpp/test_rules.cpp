// Unit tests of the shared rules (csrc/maze/rules.h): RNG known values, the generator against a
// deliberately naive re-implementation of docs/maze_spec.md (explicit lists, std::deque BFS),
// generation invariants, and single-env stepping, observation, rendering and the oracle.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <set>
#include <stdexcept>
#include <vector>

#include "harness.h"
#include "maze/config.h"
#include "maze/rules.h"

using namespace ws;

namespace {

// ---- an independent, naive generator written straight from the spec text ----
struct NaiveRng {
  uint64_t key, counter = 0;
  static uint64_t mix(uint64_t z) {  // re-typed, not ws::mix64
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t u(uint64_t n) {  // counter counts 32-bit words; two per draw, low half first
    const uint64_t d = mix(key + (counter / 2 + 1) * 0x9E3779B97F4A7C15ull);
    const uint64_t word = counter % 2 == 0 ? (d & 0xFFFFFFFFull) : (d >> 32);
    ++counter;
    return (word * n) >> 32;
  }
};

std::vector<uint8_t> naive_generate(const Config& c, uint64_t ekey, int& srow, int& scol) {
  const int S = c.size, n = S - 2;
  const int64_t I = int64_t(n) * n;
  std::vector<uint8_t> g(size_t(S) * S, 1);
  NaiveRng rng{NaiveRng::mix(ekey ^ 0x47454E4552415445ull)};
  auto at = [&](int64_t i) -> uint8_t& { return g[size_t((1 + i / n) * S + (1 + i % n))]; };
  int64_t cur = int64_t(rng.u(uint64_t(I)));
  at(cur) = 0;
  const uint64_t L = uint64_t(c.walk_min_mult) * n +
                     rng.u(uint64_t(c.walk_max_mult) * n - uint64_t(c.walk_min_mult) * n + 1);
  if (n > 1) {
    for (uint64_t s = 0; s < L; ++s) {
      const int64_t r = cur / n, cc = cur % n;
      std::vector<int64_t> nb;
      if (r > 0) nb.push_back(cur - n);       // N
      if (cc < n - 1) nb.push_back(cur + 1);  // E
      if (r < n - 1) nb.push_back(cur + n);   // S
      if (cc > 0) nb.push_back(cur - 1);      // W
      cur = nb[rng.u(nb.size())];
      at(cur) = 0;
    }
  }
  int64_t M = 0;
  for (int64_t i = 0; i < I; ++i) M += at(i) == 1;
  const int64_t hi = int64_t(c.mold_fraction_max * double(I)) - 1;
  const int64_t lo = int64_t(c.mold_fraction_min * double(I)) + 1;
  if (M > hi) {
    const int64_t target = lo + int64_t(rng.u(uint64_t(hi - lo + 1)));
    int64_t need = M - target, remaining = M;
    for (int64_t i = 0; i < I; ++i) {
      if (at(i) != 1) continue;
      if (need == 0) break;
      if (int64_t(rng.u(uint64_t(remaining))) < need) {
        at(i) = 0;
        --need;
      }
      --remaining;
    }
    M = target;
  }
  const int64_t P = I - M;
  const int64_t G = std::min(std::max<int64_t>(1, int64_t(c.gold_ratio * double(M))), P);
  int64_t need = G, remaining = P;
  for (int64_t i = 0; i < I; ++i) {
    if (at(i) != 0) continue;
    if (need == 0) break;
    if (int64_t(rng.u(uint64_t(remaining))) < need) {
      at(i) = 2;
      --need;
    }
    --remaining;
  }
  // BFS with a real queue, N, S, E, W
  std::vector<char> seen(g.size(), 0);
  std::deque<int> q{(S / 2) * S + S / 2};
  seen[size_t(q.front())] = 1;
  srow = scol = -1;
  while (!q.empty()) {
    const int u = q.front();
    q.pop_front();
    if (g[size_t(u)] == 0) {
      srow = u / S;
      scol = u % S;
      break;
    }
    const int r = u / S, cc = u % S;
    const int dr[4] = {-1, 1, 0, 0}, dc[4] = {0, 0, 1, -1};
    for (int k = 0; k < 4; ++k) {
      const int nr = r + dr[k], nc = cc + dc[k];
      if (nr < 0 || nr >= S || nc < 0 || nc >= S || seen[size_t(nr * S + nc)]) continue;
      seen[size_t(nr * S + nc)] = 1;
      q.push_back(nr * S + nc);
    }
  }
  return g;
}

Config make(int size, uint64_t seed = 1) {
  Config c;
  c.size = size;
  c.seed = seed;
  return prepare(c);
}

}  // namespace

TEST(rng_known_values) {
  // mix64 is the SplitMix64 finaliser: draw(0, 0) = mix64(GOLDEN) is SplitMix64's first output for
  // seed 0, a published constant.
  CHECK(mix64(0) == 0);
  CHECK(mix64(1) == 0x5692161D100B05E5ull);
  CHECK(draw(0, 0) == 0xE220A8397B1DCDAFull);
  // Values computed by hand (a few lines of Python with & (2**64 - 1)) from the spec formulas.
  CHECK(episode_key(0, 0, 0) == 0x277919C150270E7Aull);
  const uint64_t k = episode_key(42, 7, 3);
  CHECK(k == 0xE806150371775FFDull);
  CHECK(gen_key(k) == 0x006AC2B5B853DECFull);
  CHECK(step_key_of(k) == 0x470A7EBD5A19B00Full);
  CHECK(draw(gen_key(k), 5) == 0xBCFA86EEC6B75F23ull);
  const uint32_t expect[8] = {2, 8, 2, 9, 5, 7, 4, 0};
  for (int c = 0; c < 8; ++c) CHECK_EQ(uniform(gen_key(k), c, 10), expect[c]);
  CHECK_EQ(uniform(step_key_of(k), 2, 24), 3u);
  CHECK(clone_key(step_key_of(k), 9) == 0xFF0E002C5DC89766ull);
  // The generator's word stream: word w is the low (w even) or high (w odd) half of draw w >> 1.
  CHECK(gen_word(0, 0) == 0x7B1DCDAFu);
  CHECK(gen_word(0, 1) == 0xE220A839u);
  CHECK(gen_word(gen_key(k), 10) == 0xC6B75F23u);
  CHECK(gen_word(gen_key(k), 11) == 0xBCFA86EEu);
  const uint32_t gen_expect[8] = {1, 2, 6, 8, 3, 2, 4, 9};
  for (int c = 0; c < 8; ++c) CHECK_EQ(gen_uniform(gen_key(k), c, 10), gen_expect[c]);
  // the sequential reader agrees from any start, odd ones included
  for (uint64_t start = 0; start < 6; ++start) {
    WordStream words(gen_key(k), start);
    for (uint64_t j = 0; j < 7; ++j) CHECK_EQ(words.next(), gen_word(gen_key(k), start + j));
    CHECK_EQ(words.index, start + 7);
  }
}

TEST(uniform_and_bernoulli_bounds) {
  const uint64_t key = 12345;
  for (uint64_t c = 0; c < 20000; ++c) {
    CHECK(uniform(key, c, 1) == 0);
    CHECK(uniform(key, c, 7) < 7);
    CHECK(uniform(key, c, 0xFFFFFFFFull) < 0xFFFFFFFFull);
    CHECK(!bernoulli(key, c, 0));
    CHECK(bernoulli(key, c, uint64_t{1} << 32));
  }
  // threshold = min(2^32, floor(p * 2^32))
  Config c = make(10);
  CHECK(c.wind_threshold == 429496729ull);  // floor(0.1 * 2^32)
  Config one;
  one.size = 10;
  one.wind_prob = 1.0;
  CHECK(prepare(one).wind_threshold == (uint64_t{1} << 32));
  one.wind_prob = 0.0;
  CHECK(prepare(one).wind_threshold == 0);
  // frequency of p = 0.1
  int hits = 0;
  const int N = 1000000;
  for (int i = 0; i < N; ++i) hits += bernoulli(999, uint64_t(i), c.wind_threshold);
  CHECK(std::fabs(hits / double(N) - 0.1) < 0.002);
}

TEST(config_validation) {
  Config c;
  c.size = 3;
  CHECK_THROWS(validate(c), std::invalid_argument, "Config.size=3 is out of bounds [4, 1000]");
  c = Config();
  c.wind_prob = 1.5;
  CHECK_THROWS(validate(c), std::invalid_argument, "wind_prob");
  c = Config();
  c.walk_max_mult = 2;
  CHECK_THROWS(validate(c), std::invalid_argument, "walk_max_mult=2 is out of bounds [5, 1000]");
  c = Config();
  c.mold_fraction_max = 0.05;
  CHECK_THROWS(validate(c), std::invalid_argument, "mold_fraction_max");
  c = Config();
  c.wind_prob = std::nan("");
  CHECK_THROWS(validate(c), std::invalid_argument, "wind_prob");
  c = Config();
  c.mold_fraction_min = 0.5;  // lo = 4803 > hi = 4801
  CHECK_THROWS(validate(c), std::invalid_argument, "is empty");
  c = Config();
  c.size = 4;  // interior 4: lo = 1, hi = 1, gold 1 -> 4 - 1 - 1 = 2 start cells: valid
  validate(c);
  Config d = prepare(Config());
  CHECK_EQ(d.interior, 9604);
  CHECK_EQ(d.mold_lo, 961);   // int(0.1 * 9604) + 1
  CHECK_EQ(d.mold_hi, 4801);  // int(0.5 * 9604) - 1
}

TEST(bfs_order_shape) {
  for (int S : {4, 5, 7, 100}) {
    const std::vector<int32_t> o = compute_bfs_order(S);
    CHECK_EQ(o.size(), size_t(S) * S);
    std::set<int32_t> all(o.begin(), o.end());
    CHECK_EQ(all.size(), size_t(S) * S);
    const int c = (S / 2) * S + S / 2;
    CHECK_EQ(o[0], c);
    CHECK_EQ(o[1], c - S);  // N
    CHECK_EQ(o[2], c + S);  // S
    CHECK_EQ(o[3], c + 1);  // E
    CHECK_EQ(o[4], c - 1);  // W
  }
}

TEST(generator_matches_naive_reference) {
  int compared = 0;
  for (int S : {4, 5, 6, 9, 17, 50, 100}) {
    for (uint64_t seed : {0ull, 1ull, 0xDEADBEEFull}) {
      for (int ep = 0; ep < 4; ++ep) {
        Config c = make(S, seed);
        if (S == 17) {  // some non-default rules
          c.walk_min_mult = 0;
          c.walk_max_mult = 1;
          c.gold_ratio = 0.5;
          c.mold_fraction_min = 0.0;
          c = prepare(c);
        }
        const uint64_t key = episode_key(seed, uint64_t(ep * 3), uint64_t(ep));
        std::vector<uint8_t> grid(size_t(S) * S, 0xAB);
        int32_t r = -1, col = -1;
        generate_maze(c, key, grid.data(), cached_bfs_order(S), r, col);
        int nr, nc;
        const std::vector<uint8_t> ref = naive_generate(c, key, nr, nc);
        CHECK(grid == ref);
        CHECK_EQ(r, nr);
        CHECK_EQ(col, nc);
        ++compared;
      }
    }
  }
  CHECK_EQ(compared, 84);
}

TEST(generation_invariants) {
  for (int S : {4, 8, 33, 100}) {
    const Config c = make(S, 7);
    const std::vector<int32_t> order = compute_bfs_order(S);
    int flipped_seen = 0;
    // At S = 4 (a 2x2 interior) a walk of >= 10 steps leaves a cell Mold only ~3% of the time, so
    // 30 episodes may show no flip at all (they do not with the word-stream generator): use more.
    const int episodes = S == 4 ? 300 : 30;
    for (int ep = 0; ep < episodes; ++ep) {
      std::vector<uint8_t> g(size_t(S) * S);
      int32_t r, col;
      generate_maze(c, episode_key(7, 0, uint64_t(ep)), g.data(), order.data(), r, col);
      for (int i = 0; i < S; ++i) {
        CHECK(g[size_t(i)] == MOLD);
        CHECK(g[size_t((S - 1) * S + i)] == MOLD);
        CHECK(g[size_t(i * S)] == MOLD);
        CHECK(g[size_t(i * S + S - 1)] == MOLD);
      }
      int64_t mold = 0, gold = 0, path = 0;
      for (int rr = 1; rr < S - 1; ++rr)
        for (int cc = 1; cc < S - 1; ++cc) {
          const uint8_t v = g[size_t(rr * S + cc)];
          CHECK(v <= GOLD);
          mold += v == MOLD;
          gold += v == GOLD;
          path += v == PATH;
        }
      CHECK(mold <= c.mold_hi);  // never more than hi (flipped down, or the walk left less)
      if (mold >= c.mold_lo) ++flipped_seen;
      const int64_t P = c.interior - mold;
      const int64_t G =
          std::min<int64_t>(std::max<int64_t>(1, int64_t(c.gold_ratio * double(mold))), P);
      CHECK_EQ(gold, G);
      CHECK_EQ(path + gold, P);
      CHECK(g[size_t(r * S + col)] == PATH);
      // nearest to the centre in BFS order: no Path cell comes earlier
      for (int32_t idx : order) {
        if (idx == r * S + col) break;
        CHECK(g[size_t(idx)] != PATH);
      }
    }
    CHECK(flipped_seen > 0);
  }
}

namespace {
// A one-env state over caller buffers.
struct One {
  int32_t S;
  std::vector<uint8_t> grid;
  int32_t row = 0, col = 0, t = 0, wind = -1;
  int64_t episode = 0, oe = 0, oep = 0;
  uint64_t key = 0;
  uint8_t done = 0;
  float reward = 0;
  int32_t entered = 0, pushed = 0, wout = 0;
  uint8_t dout = 0;
  explicit One(int32_t s) : S(s), grid(size_t(s) * s, PATH) {}
  StateView v() {
    StateView s;
    s.num_envs = 1;
    s.grid = grid.data();
    s.row = &row;
    s.col = &col;
    s.t = &t;
    s.wind_from = &wind;
    s.episode = &episode;
    s.step_key = &key;
    s.done = &done;
    s.origin_env = &oe;
    s.origin_episode = &oep;
    return s;
  }
  StepOut o() {
    StepOut x;
    x.reward = &reward;
    x.tile_entered = &entered;
    x.tile_pushed = &pushed;
    x.wind_from = &wout;
    x.done = &dout;
    return x;
  }
  uint8_t& at(int r, int c) { return grid[size_t(r * S + c)]; }
};
}  // namespace

TEST(step_rewards_melting_consumption) {
  Config c;
  c.size = 6;
  c.wind_prob = 0.0;
  c.episode_steps = 3;
  c = prepare(c);
  One e(6);
  e.row = 2;
  e.col = 2;
  e.at(2, 3) = GOLD;
  e.at(2, 4) = MOLD;
  step_one_env(c, e.v(), 0, EAST, e.o());
  CHECK_EQ(e.reward, -0.1f + 20.0f);
  CHECK_EQ(e.entered, int(GOLD));
  CHECK_EQ(e.at(2, 3), uint8_t(PATH));  // consumed
  CHECK_EQ(e.at(2, 2), uint8_t(MOLD));  // melted
  CHECK_EQ(e.pushed, -1);
  CHECK_EQ(e.wout, -1);
  CHECK_EQ(e.t, 1);
  CHECK_EQ(int(e.dout), 0);
  step_one_env(c, e.v(), 0, EAST, e.o());
  CHECK_EQ(e.reward, -0.1f + -10.0f);
  CHECK_EQ(e.entered, int(MOLD));
  CHECK_EQ(e.at(2, 4), uint8_t(MOLD));  // Mold stays Mold
  step_one_env(c, e.v(), 0, WEST, e.o());  // back onto the melted consumed Gold
  CHECK_EQ(e.entered, int(MOLD));
  CHECK_EQ(e.t, 3);
  CHECK_EQ(int(e.dout), 1);
  CHECK_EQ(int(e.done), 1);
  CHECK_EQ(step_error(c, e.v(), 0, EAST), int32_t(STEP_DONE));
  // melting off: the left tile stays
  c.melting = false;
  One f(6);
  f.row = 1;
  f.col = 1;
  step_one_env(c, f.v(), 0, SOUTH, f.o());
  CHECK_EQ(f.at(1, 1), uint8_t(PATH));
  CHECK_EQ(f.reward, -0.1f);
}

TEST(step_wind_push) {
  Config c;
  c.size = 10;
  c.wind_prob = 1.0;  // always a wind draw
  c.episode_steps = 50;
  c = prepare(c);
  int pushes = 0, blocked = 0;
  for (uint64_t k = 0; k < 200; ++k) {
    One e(10);
    e.key = mix64(k + 77);
    e.row = 0;  // top row: a push north is blocked
    e.col = 0;
    e.t = int32_t(k % 40);
    const uint64_t base = uint64_t(e.t) * 4;
    const int from = int(uniform(e.key, base + 1, 4));
    const int to = opposite(from);
    // move E to (0, 1), then the push toward `to`
    const int pr = 0 + dir_drow(to), pc = 1 + dir_dcol(to);
    const bool ok = pr >= 0 && pr < 10 && pc >= 0 && pc < 10;
    // a push back West re-enters the cell the move just left (melted to Mold)
    const bool back = pr == 0 && pc == 0;
    if (ok) e.at(pr, pc) = GOLD;
    step_one_env(c, e.v(), 0, EAST, e.o());
    if (ok) {
      ++pushes;
      CHECK_EQ(e.wout, from);
      CHECK_EQ(e.wind, from);
      CHECK_EQ(e.pushed, int(back ? MOLD : GOLD));
      CHECK_EQ(e.row, pr);
      CHECK_EQ(e.col, pc);
      CHECK_EQ(e.reward, back ? -0.1f + -10.0f : -0.1f + 20.0f);
      CHECK_EQ(e.at(0, 1), uint8_t(MOLD));  // the push's leave melts too
      CHECK_EQ(e.at(pr, pc), uint8_t(back ? MOLD : PATH));
    } else {
      ++blocked;
      CHECK_EQ(e.wout, -1);
      CHECK_EQ(e.pushed, -1);
      CHECK_EQ(e.row, 0);
      CHECK_EQ(e.col, 1);
      CHECK_EQ(e.reward, -0.1f);
    }
  }
  CHECK(pushes > 0 && blocked > 0);
}

TEST(wind_frequency) {
  Config c = make(100, 3);
  c.episode_steps = 15;
  std::vector<int32_t> order = compute_bfs_order(100);
  int64_t winds = 0, steps = 0;
  for (int ep = 0; ep < 4000; ++ep) {
    One e(100);
    e.episode = ep;
    reset_one_env(c, e.v(), 0, order.data());
    for (int s = 0; s < 15; ++s) {
      step_one_env(c, e.v(), 0, int(mix64(uint64_t(ep * 100 + s)) & 3), e.o());
      winds += e.wout >= 0;
      ++steps;
    }
  }
  const double f = double(winds) / double(steps);
  std::printf("  wind frequency %.4f over %lld steps\n", f, (long long)steps);
  CHECK(std::fabs(f - 0.1) < 0.006);
}

TEST(prompt_order_lehmer) {
  Config c = make(10);
  std::set<std::vector<int32_t>> perms;
  int found = 0;
  for (uint64_t k = 0; k < 2000 && found < 24; ++k) {
    int32_t o[4];
    CHECK_EQ(prompt_order(c, 5, 5, 0, k, o), 4);
    perms.insert(std::vector<int32_t>(o, o + 4));
    found = int(perms.size());
  }
  CHECK_EQ(perms.size(), size_t(24));
  // explicit decode: r = 23 -> first = 3 (W), then (23 % 6) / 2 = 2 of [N, E, S] = S, then
  // 23 % 2 = 1 of [N, E] = E, then N
  uint64_t key = 0;
  while (uniform(key, 2, 24) != 23) ++key;
  int32_t o[4];
  prompt_order(c, 5, 5, 0, key, o);
  CHECK(o[0] == WEST && o[1] == SOUTH && o[2] == EAST && o[3] == NORTH);
  // corner (0, 0): only E and S are listed, order kept
  prompt_order(c, 0, 0, 0, key, o);
  CHECK(o[0] == SOUTH && o[1] == EAST && o[2] == -1 && o[3] == -1);
  c.shuffle_directions = false;
  prompt_order(c, 9, 5, 0, key, o);
  CHECK(o[0] == NORTH && o[1] == EAST && o[2] == WEST && o[3] == -1);
}

TEST(render_fragments_and_bound) {
  Config c = make(10);
  const int nf = expected_num_fragments(10);
  // fragment f has length 1 + f % 3 and ids 1000 * f + j
  std::vector<int32_t> offsets(size_t(nf) + 1, 0), ids;
  for (int f = 0; f < nf; ++f) {
    for (int j = 0; j < 1 + f % 3; ++j) ids.push_back(1000 * f + j);
    offsets[size_t(f) + 1] = int32_t(ids.size());
  }
  TokenTable tt;
  tt.ids = ids.data();
  tt.offsets = offsets.data();
  tt.num_fragments = nf;
  tt.max_len = 40;
  tt.pad_id = -5;
  One e(10);
  e.row = 3;
  e.col = 0;  // W is not listed
  e.wind = 2;
  e.key = 99;
  e.t = 4;
  e.at(2, 0) = MOLD;
  e.at(3, 1) = GOLD;
  int32_t frags[MAX_TURN_FRAGMENTS];
  const int n = turn_fragments(c, e.v(), 0, frags);
  int32_t order[4];
  const int listed = prompt_order(c, 3, 0, 4, 99, order);
  CHECK_EQ(listed, 3);
  CHECK_EQ(n, 1 + 2 + 3 + 3 + 2);
  CHECK_EQ(frags[0], 8);
  CHECK_EQ(frags[1], 0 + 2);
  CHECK_EQ(frags[2], 5);
  CHECK_EQ(frags[3], 58 + 0);
  CHECK_EQ(frags[4], 58 + 10 + 3);
  CHECK_EQ(frags[5], 6);
  for (int j = 0; j < 3; ++j) {
    const int d = order[j];
    const int tile = e.at(3 + dir_drow(d), 0 + dir_dcol(d));
    CHECK_EQ(frags[6 + j], 10 + ((d * 3 + tile) * 2 + (j == 0)) * 2 + (j == 2));
  }
  CHECK_EQ(frags[9], 7);
  CHECK_EQ(frags[10], 9);
  std::vector<int32_t> out(60, 12345);
  const int len = render_one_env_tokens(c, e.v(), 0, tt, out.data());
  int expect = 0;
  for (int j = 0; j < n; ++j) expect += 1 + frags[j] % 3;
  CHECK_EQ(len, expect);
  CHECK(len <= tt.max_len);
  int k = 0;
  for (int j = 0; j < n; ++j)
    for (int q = 0; q < 1 + frags[j] % 3; ++q) CHECK_EQ(out[size_t(k++)], 1000 * frags[j] + q);
  for (; k < 40; ++k) CHECK_EQ(out[size_t(k)], -5);
  for (; k < 60; ++k) CHECK_EQ(out[size_t(k)], 12345);  // nothing past max_len
  tt.max_len = len - 1;  // too small: nothing written
  std::vector<int32_t> out2(60, 777);
  CHECK_EQ(render_one_env_tokens(c, e.v(), 0, tt, out2.data()), len);
  for (int32_t v : out2) CHECK_EQ(v, 777);
}

TEST(oracle_against_brute_force) {
  // Compare with a plain BFS per neighbour: dist = 1 + min over open neighbours of their
  // distance to Gold; optimal = neighbours achieving it.
  const int S = 12;
  Config c = make(S);
  std::vector<int32_t> dist_s(size_t(S) * S, -1), queue(size_t(S) * S);
  std::vector<uint8_t> mask(size_t(S) * S);
  int with_gold = 0, without = 0;
  for (uint64_t trial = 0; trial < 3000; ++trial) {
    One e(S);
    for (auto& v : e.grid) {
      const uint64_t z = mix64(trial * 1000003 + uint64_t(&v - e.grid.data()));
      v = (z % 100) < 45 ? MOLD : ((z % 100) < 47 ? GOLD : PATH);
    }
    e.row = int32_t(mix64(trial) % S);
    e.col = int32_t(mix64(trial + 5) % S);
    if (e.at(e.row, e.col) == GOLD) e.at(e.row, e.col) = PATH;
    auto gold_dist = [&](int r0, int c0) {  // BFS from (r0, c0) through non-Mold to Gold
      if (e.at(r0, c0) == MOLD) return -1;
      std::vector<int> d(size_t(S) * S, -1);
      std::deque<int> q{r0 * S + c0};
      d[size_t(r0 * S + c0)] = 0;
      while (!q.empty()) {
        const int u = q.front();
        q.pop_front();
        if (e.grid[size_t(u)] == GOLD) return d[size_t(u)];
        for (int k = 0; k < 4; ++k) {
          const int r = u / S + dir_drow(k), cc = u % S + dir_dcol(k);
          if (r < 0 || r >= S || cc < 0 || cc >= S || e.at(r, cc) == MOLD) continue;
          if (d[size_t(r * S + cc)] >= 0) continue;
          d[size_t(r * S + cc)] = d[size_t(u)] + 1;
          q.push_back(r * S + cc);
        }
      }
      return -1;
    };
    int best = -1;
    int nd[4];
    for (int k = 0; k < 4; ++k) {
      const int r = e.row + dir_drow(k), cc = e.col + dir_dcol(k);
      nd[k] = (r < 0 || r >= S || cc < 0 || cc >= S) ? -1 : gold_dist(r, cc);
      if (nd[k] >= 0 && (best < 0 || nd[k] < best)) best = nd[k];
    }
    int32_t dist = -2;
    uint8_t opt[4];
    oracle_one_env(c, e.v(), 0, &dist, opt, dist_s.data(), queue.data(), mask.data());
    CHECK_EQ(dist, best < 0 ? -1 : best + 1);
    for (int k = 0; k < 4; ++k) {
      const int r = e.row + dir_drow(k), cc = e.col + dir_dcol(k);
      const bool valid = !(r < 0 || r >= S || cc < 0 || cc >= S);
      bool want;
      if (best >= 0) {
        want = nd[k] == best;
      } else {
        bool any_open = false;
        for (int q = 0; q < 4; ++q) {
          const int r2 = e.row + dir_drow(q), c2 = e.col + dir_dcol(q);
          if (r2 >= 0 && r2 < S && c2 >= 0 && c2 < S && e.at(r2, c2) != MOLD) any_open = true;
        }
        want = valid && (any_open ? e.at(r, cc) != MOLD : true);
      }
      CHECK_EQ(int(opt[k]), int(want));
    }
    (best >= 0 ? with_gold : without)++;
    for (int32_t v : dist_s) CHECK_EQ(v, -1);  // scratch invariant restored
  }
  CHECK(with_gold > 100 && without > 100);
}

int main() { return harness::run_all(); }
