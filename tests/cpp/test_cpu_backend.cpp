// Batch-level tests of the CPU backend (csrc/maze/cpu_backend.cpp): reset provenance, validation
// that leaves state untouched, same-step autoreset, clone keys, thread-count independence,
// rendering bounds and the oracle over a batch.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <stdexcept>
#include <vector>

#include "batch.h"
#include "harness.h"
#include "maze/config.h"
#include "maze/cpu_backend.h"
#include "maze/cpu_sampler.h"
#include "maze_cuda/cuda_backend.h"

using namespace ws;

namespace {
Config cfg(int size, uint64_t seed = 5) {
  Config c;
  c.size = size;
  c.seed = seed;
  return c;
}
std::vector<int32_t> valid_actions(Batch& b, uint64_t salt) {
  std::vector<int32_t> a(size_t(b.B));
  for (int64_t i = 0; i < b.B; ++i) {
    for (uint64_t k = 0;; ++k) {
      const int d = int(mix64(salt * 7919 + uint64_t(i) * 31 + k) & 3);
      const int r = b.row[size_t(i)] + dir_drow(d), c = b.col[size_t(i)] + dir_dcol(d);
      if (r >= 0 && r < b.S && c >= 0 && c < b.S) {
        a[size_t(i)] = d;
        break;
      }
    }
  }
  return a;
}
}  // namespace

TEST(reset_sets_provenance_and_matches_generator) {
  Batch b(9, 20);
  for (int64_t i = 0; i < 9; ++i) b.episode[size_t(i)] = 100 + i;
  const Config c = cfg(20);
  cpu_reset(c, b.view(), nullptr, 3);
  const Config p = prepare(c);
  for (int64_t i = 0; i < 9; ++i) {
    const uint64_t key = episode_key(5, uint64_t(i), uint64_t(100 + i));
    std::vector<uint8_t> g(400);
    int32_t r, col;
    generate_maze(p, key, g.data(), cached_bfs_order(20), r, col);
    CHECK(std::memcmp(g.data(), b.env_grid(i), 400) == 0);
    CHECK_EQ(b.row[size_t(i)], r);
    CHECK_EQ(b.col[size_t(i)], col);
    CHECK_EQ(b.t[size_t(i)], 0);
    CHECK_EQ(b.wind_from[size_t(i)], -1);
    CHECK_EQ(int(b.done[size_t(i)]), 0);
    CHECK(b.step_key[size_t(i)] == step_key_of(key));
    CHECK_EQ(b.origin_env[size_t(i)], i);
    CHECK_EQ(b.origin_episode[size_t(i)], 100 + i);
  }
  // masked reset touches only masked envs
  Batch before = b;
  std::vector<uint8_t> mask(9, 0);
  mask[4] = 1;
  b.episode[4] = 7;
  cpu_reset(c, b.view(), mask.data(), 2);
  for (int64_t i = 0; i < 9; ++i) {
    if (i == 4) continue;
    CHECK(std::memcmp(before.env_grid(i), b.env_grid(i), 400) == 0);
    CHECK_EQ(b.origin_episode[size_t(i)], before.origin_episode[size_t(i)]);
  }
  CHECK_EQ(b.origin_episode[4], 7);
}

// The SIMD routines (those this CPU runs; the others are reported as skipped) against rules.h's
// portable ones, bit for bit: grid, start cell, Mold count and word counter.
std::vector<CpuRoutine> simd_routines() {
  std::vector<CpuRoutine> out;
  const std::vector<CpuRoutine> all = cpu_supported_routines();
  CHECK(!all.empty() && std::string(all.front().name) == "portable");
  for (const char* name : {"avx2", "avx512"}) {
    bool found = false;
    for (const CpuRoutine& r : all)
      if (std::string(r.name) == name) {
        out.push_back(r);
        found = true;
      }
    std::printf("  %s routine: %s\n", name, found ? "tested" : "skipped (this CPU lacks it)");
  }
  std::printf("  routine in use: %s\n", cpu_sampler_name());
  return out;
}

TEST(cpu_routine_is_the_widest_supported) {
  const std::vector<CpuRoutine> all = cpu_supported_routines();
  const char* off = std::getenv("WS_NO_SIMD");
  const bool forced = off != nullptr && off[0] != '\0' && off[0] != '0';
  CHECK(std::string(cpu_sampler_name()) == (forced ? "portable" : all.back().name));
  CHECK(cpu_routine().sample == (forced ? all.front() : all.back()).sample);
}

TEST(cpu_sampler_matches_shared_sampler) {
  // Whole mazes, including rows longer than one 64-cell word and with a short tail (size 130:
  // n = 128; size 67: n = 65), and random non-default rules.
  const std::vector<CpuRoutine> routines = simd_routines();
  uint64_t state = 0xC0FFEE;
  auto next = [&] { return state = mix64(state + GOLDEN); };
  int compared = 0;
  for (const CpuRoutine& routine : routines) {
    for (int S : {4, 5, 9, 17, 66, 67, 100, 130}) {
      for (int ep = 0; ep < 12; ++ep) {
        Config c = cfg(S, next() % 1000);
        if (S == 9) c.gold_ratio = 1.0 / 3.0;
        if (ep % 3 == 1) {  // other rules, kept valid
          c.walk_min_mult = int32_t(next() % 4);
          c.walk_max_mult = c.walk_min_mult + int32_t(next() % 20);
          c.mold_fraction_min = double(next() % 30) / 100.0;
          c.mold_fraction_max = std::min(0.9, c.mold_fraction_min + 0.2 + double(next() % 40) / 100.0);
          c.gold_ratio = double(next() % 50) / 100.0;
          try {
            prepare(c);
          } catch (const std::invalid_argument&) {
            c = cfg(S, c.seed);
          }
        }
        const Config p = prepare(c);
        std::vector<uint8_t> a(size_t(S) * S), b(size_t(S) * S, 0xEE);
        int32_t ra, ca, rb, cb;
        const uint64_t key = episode_key(p.seed, uint64_t(ep), next());
        generate_maze(p, key, a.data(), cached_bfs_order(S), ra, ca);
        generate_maze(p, key, b.data(), cached_bfs_order(S), rb, cb, CpuSampler(routine));
        CHECK(a == b);
        CHECK(ra == rb && ca == cb);
        ++compared;
      }
    }
  }
  CHECK_EQ(compared, int(routines.size()) * 8 * 12);
}

TEST(cpu_sampler_matches_shared_sampler_directly) {
  // The sampler alone on random grids: odd and even starting words (the SIMD paths load their
  // words from an even one), need from 1 to remaining (the last selected candidate ends the
  // sample), densities from empty to full, rows of one partial word, of exactly 64 cells and of
  // more than one word (the AVX-512 routine batches 8 non-empty masks across rows: S = 200 has 4
  // masks per row), the grid's last row ending inside a block.
  const std::vector<CpuRoutine> routines = simd_routines();
  uint64_t state = 0x1234567;
  auto next = [&] { return state = mix64(state + GOLDEN); };
  int compared = 0;
  for (const CpuRoutine& routine : routines) {
    for (int S : {4, 7, 20, 66, 67, 100, 131, 200}) {
      const int n = S - 2;
      for (int trial = 0; trial < 16; ++trial) {
        std::vector<uint8_t> a(size_t(S) * S, MOLD);
        const uint64_t density = trial < 2 ? 100 * trial : next() % 101;  // percent Path
        int64_t paths = 0;
        for (int r = 1; r <= n; ++r)
          for (int c = 1; c <= n; ++c) {
            const bool path = next() % 100 < density;
            a[size_t(r * S + c)] = path ? PATH : MOLD;
            paths += path;
          }
        const uint8_t from = trial % 2 ? PATH : MOLD, to = trial % 2 ? GOLD : PATH;
        const int64_t remaining = from == PATH ? paths : int64_t(n) * n - paths;
        if (remaining == 0) continue;
        const int64_t needs[4] = {1, remaining, 1 + int64_t(next() % uint64_t(remaining)),
                                  remaining > 1 ? remaining - 1 : 1};
        for (int64_t need : needs) {
          const uint64_t key = next(), start = next() % 5000;
          std::vector<uint8_t> b = a, c = a;
          uint64_t cb = start, cc = start;
          selection_sample(b.data(), S, n, from, to, need, remaining, key, cb);
          const CpuSampler simd(routine);
          simd(c.data(), S, n, from, to, need, remaining, key, cc);
          CHECK(b == c);
          CHECK_EQ(cb, cc);
          int64_t turned = 0;
          for (size_t j = 0; j < b.size(); ++j) turned += a[j] != b[j];
          CHECK_EQ(turned, need);
          ++compared;
        }
      }
    }
  }
  CHECK(compared > 400 * int(routines.size()));
}

TEST(cpu_walk_matches_shared_walk) {
  // The walk alone: random interior starts (border rows and columns included), lengths from 0 to
  // several chunks of hashed words, odd and even starting words, grids partly carved already.
  const std::vector<CpuRoutine> routines = simd_routines();
  uint64_t state = 0xABCDEF;
  auto next = [&] { return state = mix64(state + GOLDEN); };
  int compared = 0;
  for (const CpuRoutine& routine : routines) {
    for (int S : {4, 5, 6, 33, 100, 131}) {
      const int n = S - 2;
      for (int trial = 0; trial < 10; ++trial) {
        std::vector<uint8_t> a(size_t(S) * S, MOLD);
        int64_t mold = int64_t(n) * n;
        for (int r = 1; r <= n; ++r)  // some Path already (the walk's own start, in practice)
          for (int c = 1; c <= n; ++c)
            if (next() % 100 < trial * 3) {
              a[size_t(r * S + c)] = PATH;
              --mold;
            }
        std::vector<uint8_t> b = a;
        const int32_t r0 = 1 + int32_t(next() % uint64_t(n)), c0 = 1 + int32_t(next() % uint64_t(n));
        const uint64_t L = trial == 0 ? 0 : next() % 3000, g = next(), counter = next() % 100;
        int32_t ra = r0, ca = c0, rb = r0, cb = c0;
        int64_t ma = mold, mb = -1;
        random_walk(g, counter, L, n, S, a.data(), ra, ca, ma);
        CpuSampler(routine).walk(g, counter, L, n, S, b.data(), rb, cb, mb);
        CHECK(a == b);
        CHECK(ra == rb && ca == cb);
        CHECK_EQ(ma, mb);
        ++compared;
      }
    }
  }
  CHECK_EQ(compared, int(routines.size()) * 6 * 10);
}

TEST(prepared_config_is_validated_once_and_observe_writes_its_optional_outputs) {
  CHECK_THROWS(PreparedConfig(cfg(3)), std::invalid_argument, "Config.size=3");
  Config c = cfg(12);
  c.wind_prob = 1.0;
  const PreparedConfig p(c);
  CHECK_EQ(p.get().interior, int64_t(100));
  CHECK(p.get().wind_threshold == (uint64_t{1} << 32));
  Batch b(5, 12);
  cpu_reset(p, b.view(), nullptr, 1);
  std::vector<int32_t> a = valid_actions(b, 3);
  cpu_step(p, b.view(), a.data(), b.out(), 1);
  std::vector<int32_t> nb(20, -9), order(20, -9), pos(10, -9), t(5, -9), wind(5, -9);
  std::vector<uint8_t> valid(20, 7);
  ObserveOut out;
  out.neighbours = nb.data();
  out.order = order.data();
  out.valid = valid.data();
  out.position = pos.data();
  out.step_index = t.data();
  out.wind_from = wind.data();
  cpu_observe(p, b.view(), out, 2);
  std::vector<int32_t> nb2(20), order2(20);
  cpu_observe(p, b.view(), nb2.data(), order2.data(), 1);  // the required outputs alone
  CHECK(nb == nb2 && order == order2);
  for (int i = 0; i < 5; ++i) {
    for (int d = 0; d < 4; ++d) CHECK_EQ(int(valid[size_t(4 * i + d)]), int(nb[size_t(4 * i + d)] >= 0));
    CHECK_EQ(pos[size_t(2 * i)], b.col[size_t(i)]);
    CHECK_EQ(pos[size_t(2 * i + 1)], b.row[size_t(i)]);
    CHECK_EQ(t[size_t(i)], 1);
    CHECK_EQ(wind[size_t(i)], b.wind_from[size_t(i)]);
  }
}

TEST(step_validation_leaves_state_unchanged) {
  Batch b(8, 6);
  const Config c = cfg(6);
  cpu_reset(c, b.view(), nullptr, 1);
  std::vector<int32_t> a = valid_actions(b, 1);
  // env 5 at row 0 stepping N
  b.row[5] = 0;
  a[5] = NORTH;
  Batch snap = b;
  CHECK_THROWS(cpu_step(c, b.view(), a.data(), b.out(), 2), std::invalid_argument,
               "actions[5]=0 (N) would leave the grid from row 0");
  CHECK(b.same_state(snap));
  a = valid_actions(b, 2);
  a[3] = 4;
  a[6] = -1;
  CHECK_THROWS(cpu_step(c, b.view(), a.data(), b.out(), 2), std::invalid_argument,
               "actions[3]=4 is not a direction");
  CHECK(b.same_state(snap));
  a = valid_actions(b, 3);
  b.done[2] = 1;
  snap = b;
  CHECK_THROWS(cpu_step(c, b.view(), a.data(), b.out(), 2), std::invalid_argument, "env 2 is done");
  CHECK(b.same_state(snap));
  Config bad = c;
  bad.size = 2;
  CHECK_THROWS(cpu_step(bad, b.view(), a.data(), b.out(), 2), std::invalid_argument, "Config.size");
  CHECK(b.same_state(snap));
}

TEST(episode_runs_to_done_then_refuses) {
  Batch b(4, 10);
  Config c = cfg(10);
  c.episode_steps = 5;
  cpu_reset(c, b.view(), nullptr, 1);
  for (int s = 0; s < 5; ++s) {
    std::vector<int32_t> a = valid_actions(b, uint64_t(s));
    cpu_step(c, b.view(), a.data(), b.out(), 1);
    for (int64_t i = 0; i < 4; ++i) {
      CHECK_EQ(int(b.out_done[size_t(i)]), int(s == 4));
      CHECK_EQ(b.t[size_t(i)], s + 1);
      CHECK(b.reward[size_t(i)] <= -0.1f + 20.0f * 2);
    }
  }
  std::vector<int32_t> a = valid_actions(b, 9);
  CHECK_THROWS(cpu_step(c, b.view(), a.data(), b.out(), 1), std::invalid_argument,
               "autoreset=False");
}

TEST(same_step_autoreset) {
  Batch b(6, 12), ref(6, 12);
  Config c = cfg(12);
  c.episode_steps = 3;
  Config ca = c;
  ca.autoreset = true;
  cpu_reset(c, b.view(), nullptr, 1);
  cpu_reset(c, ref.view(), nullptr, 1);
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> a = valid_actions(b, uint64_t(s) + 40);
    cpu_step(ca, b.view(), a.data(), b.out(), 2);
    cpu_step(c, ref.view(), a.data(), ref.out(), 1);
    // the returned values belong to the finished episode
    CHECK(b.reward == ref.reward);
    CHECK(b.tile_entered == ref.tile_entered);
    CHECK(b.tile_pushed == ref.tile_pushed);
    CHECK(b.out_wind == ref.out_wind);
    CHECK(b.out_done == ref.out_done);
  }
  for (int64_t i = 0; i < 6; ++i) {
    CHECK_EQ(int(b.out_done[size_t(i)]), 1);
    CHECK_EQ(int(b.done[size_t(i)]), 0);
    CHECK_EQ(b.t[size_t(i)], 0);
    CHECK_EQ(b.episode[size_t(i)], 1);
    CHECK_EQ(b.origin_episode[size_t(i)], 1);
    CHECK_EQ(b.wind_from[size_t(i)], -1);
  }
  Batch fresh(6, 12);
  for (auto& e : fresh.episode) e = 1;
  cpu_reset(c, fresh.view(), nullptr, 1);
  CHECK(fresh.grid == b.grid);
  CHECK(fresh.step_key == b.step_key);
  CHECK(fresh.row == b.row && fresh.col == b.col);
}

TEST(clone_keys_and_ranges) {
  Batch b(6, 8);
  const Config c = cfg(8);
  cpu_reset(c, b.view(), nullptr, 1);
  std::vector<int32_t> a = valid_actions(b, 3);
  cpu_step(c, b.view(), a.data(), b.out(), 1);
  cpu_clone(c, b.view(), 1, 3, 6, true);
  for (int64_t d = 3; d < 6; ++d) {
    CHECK(std::memcmp(b.env_grid(1), b.env_grid(d), 64) == 0);
    CHECK_EQ(b.row[size_t(d)], b.row[1]);
    CHECK_EQ(b.t[size_t(d)], 1);
    CHECK_EQ(b.origin_env[size_t(d)], 1);
    CHECK_EQ(b.origin_episode[size_t(d)], b.origin_episode[1]);
    CHECK(b.step_key[size_t(d)] == mix64(b.step_key[1] ^ mix64(0x434C4F4E45000000ull + uint64_t(d))));
  }
  cpu_clone(c, b.view(), 0, 2, 3, false);
  CHECK(b.step_key[2] == b.step_key[0]);
  CHECK_THROWS(cpu_clone(c, b.view(), 6, 0, 1, true), std::invalid_argument, "src=6");
  CHECK_THROWS(cpu_clone(c, b.view(), 0, 3, 7, true), std::invalid_argument, "destination range");
  CHECK_THROWS(cpu_clone(c, b.view(), 4, 3, 6, true), std::invalid_argument, "inside");
  cpu_clone(c, b.view(), 0, 3, 3, true);  // empty range is fine
}

TEST(thread_count_does_not_change_results) {
  for (bool autoreset : {false, true}) {
    Config c = cfg(15, 11);
    c.autoreset = autoreset;
    c.episode_steps = 4;
    Batch one(5000, 15), many(5000, 15);
    cpu_reset(c, one.view(), nullptr, 1);
    cpu_reset(c, many.view(), nullptr, 4);
    CHECK(one.same_state(many));
    for (int s = 0; s < (autoreset ? 9 : 4); ++s) {
      std::vector<int32_t> a = valid_actions(one, uint64_t(s));
      cpu_step(c, one.view(), a.data(), one.out(), 1);
      cpu_step(c, many.view(), a.data(), many.out(), 4);
      CHECK(one.same_state(many));
      CHECK(one.reward == many.reward && one.out_wind == many.out_wind);
    }
    std::vector<int32_t> n1(5000 * 4), o1(5000 * 4), n2(5000 * 4), o2(5000 * 4);
    cpu_observe(c, one.view(), n1.data(), o1.data(), 1);
    cpu_observe(c, many.view(), n2.data(), o2.data(), 4);
    CHECK(n1 == n2 && o1 == o2);
    std::vector<int32_t> d1(5000), d2(5000);
    std::vector<uint8_t> p1(5000 * 4), p2(5000 * 4);
    cpu_oracle(c, one.view(), d1.data(), p1.data(), 1);
    cpu_oracle(c, many.view(), d2.data(), p2.data(), 3);
    CHECK(d1 == d2 && p1 == p2);
  }
}

TEST(observe_and_oracle_consistency) {
  Batch b(64, 30);
  const Config c = cfg(30, 2);
  cpu_reset(c, b.view(), nullptr, 2);
  std::vector<int32_t> nb(64 * 4), order(64 * 4), dist(64);
  std::vector<uint8_t> opt(64 * 4);
  cpu_observe(c, b.view(), nb.data(), order.data(), 2);
  cpu_oracle(c, b.view(), dist.data(), opt.data(), 2);
  for (int64_t i = 0; i < 64; ++i) {
    int listed = 0;
    for (int k = 0; k < 4; ++k) listed += order[size_t(i * 4 + k)] >= 0;
    int valid = 0;
    for (int d = 0; d < 4; ++d) valid += nb[size_t(i * 4 + d)] >= 0;
    CHECK_EQ(listed, valid);
    CHECK(dist[size_t(i)] != 0);
    int picks = 0;
    for (int d = 0; d < 4; ++d) {
      if (opt[size_t(i * 4 + d)]) {
        ++picks;
        CHECK(nb[size_t(i * 4 + d)] >= 0);
        if (dist[size_t(i)] > 0) CHECK(nb[size_t(i * 4 + d)] != MOLD);
        if (dist[size_t(i)] == 1) CHECK(nb[size_t(i * 4 + d)] == GOLD);
      }
    }
    CHECK(picks >= 1);
  }
}

// A token table whose fragment f is len(f) copies of the id f: renders are easy to check.
template <typename Len>
void fake_fragment_table(int nf, Len len, std::vector<int32_t>& ids, std::vector<int32_t>& offsets) {
  ids.clear();
  offsets.assign(size_t(nf) + 1, 0);
  for (int f = 0; f < nf; ++f) {
    for (int j = 0; j < len(f); ++j) ids.push_back(f);
    offsets[size_t(f) + 1] = int32_t(ids.size());
  }
}

TEST(render_batch_bounds) {
  const int S = 25;
  Batch b(100, S);
  const Config c = cfg(S, 4);
  cpu_reset(c, b.view(), nullptr, 2);
  const int nf = expected_num_fragments(S);
  std::vector<int32_t> offsets, ids;
  fake_fragment_table(nf, [](int f) { return 1 + (f * 7) % 5; }, ids, offsets);
  // an upper bound: prefix + wind + head + x + y + close + 4 clauses + tail + suffix
  const int32_t longest = 13 * 5;
  TokenTable tt{ids.data(), offsets.data(), nf, longest, -1};
  std::vector<int32_t> out(size_t(100) * longest + 16, 4242), lengths(100);
  cpu_render_tokens(c, b.view(), tt, out.data(), lengths.data(), 2);
  for (int64_t i = 0; i < 100; ++i) {
    CHECK(lengths[size_t(i)] > 0 && lengths[size_t(i)] <= longest);
    CHECK_EQ(out[size_t(i * longest)], 8);  // TURN_PREFIX first
    for (int k = lengths[size_t(i)]; k < longest; ++k) CHECK_EQ(out[size_t(i * longest + k)], -1);
  }
  for (size_t k = size_t(100) * longest; k < out.size(); ++k) CHECK_EQ(out[k], 4242);
  TokenTable small{ids.data(), offsets.data(), nf, 5, -1};
  std::vector<int32_t> out2(100 * 5 + 8, 4242);
  CHECK_THROWS(cpu_render_tokens(c, b.view(), small, out2.data(), lengths.data(), 2),
               std::invalid_argument, "render_tokens: env 0's turn");
  for (size_t k = 0; k < out2.size(); ++k) CHECK_EQ(out2[k], 4242);
  TokenTable wrong{ids.data(), offsets.data(), nf - 1, longest, -1};
  CHECK_THROWS(cpu_render_tokens(c, b.view(), wrong, out.data(), lengths.data(), 2),
               std::invalid_argument, "num_fragments");
}

// A corrupt state buffer (the Python side exposes the state tensors) must be reported, not index
// the token table or the oracle's scratch out of bounds (ASan in scripts/sanitize.sh sees both).
TEST(render_and_oracle_refuse_corrupt_state) {
  const int S = 12;
  Batch b(8, S);
  const Config c = cfg(S, 9);
  cpu_reset(c, b.view(), nullptr, 2);
  const int nf = expected_num_fragments(S);
  std::vector<int32_t> offsets, ids;
  fake_fragment_table(nf, [](int) { return 1; }, ids, offsets);
  const int32_t max_len = 16;
  TokenTable tt{ids.data(), offsets.data(), nf, max_len, -1};
  std::vector<int32_t> out(size_t(8) * max_len, 4242), lengths(8, 77), dist(8, 77);
  std::vector<uint8_t> opt(8 * 4, 77);
  cpu_render_tokens(c, b.view(), tt, out.data(), lengths.data(), 2);  // a sane batch renders
  // env 5: column far off the grid (FRAG_XNUM + col would read past offsets; the oracle's BFS
  // would write dist/mask at row * S + col)
  b.col[5] = 5000;
  std::fill(out.begin(), out.end(), 4242);
  CHECK_THROWS(cpu_render_tokens(c, b.view(), tt, out.data(), lengths.data(), 2),
               std::invalid_argument, "env 5 has a corrupt state");
  for (int k = 0; k < max_len; ++k) CHECK_EQ(out[size_t(5 * max_len + k)], 4242);
  cpu_oracle(c, b.view(), dist.data(), opt.data(), 1);
  CHECK_EQ(dist[5], -1);
  for (int d = 0; d < 4; ++d) CHECK_EQ(int(opt[size_t(5 * 4 + d)]), 0);
  // the per-thread scratch stayed clean: the same call on a sane batch still gives real answers
  b.col[5] = b.col[4];
  b.row[5] = b.row[4];
  std::memcpy(b.env_grid(5), b.env_grid(4), size_t(S) * S);
  cpu_oracle(c, b.view(), dist.data(), opt.data(), 1);
  CHECK_EQ(dist[5], dist[4]);
  for (int d = 0; d < 4; ++d) CHECK_EQ(opt[size_t(5 * 4 + d)], opt[size_t(4 * 4 + d)]);
  // env 2: a neighbour's tile byte is not a tile code (the clause index would leave the table)
  const int32_t r = b.row[2], col = b.col[2];
  b.env_grid(2)[(r + 1 < S ? r + 1 : r - 1) * S + col] = 0xEE;
  CHECK_THROWS(cpu_render_tokens(c, b.view(), tt, out.data(), lengths.data(), 2),
               std::invalid_argument, "env 2 has a corrupt state");
  CHECK_EQ(lengths[2], RENDER_BAD_STATE);
}

// Found by tests/cpp/fuzz_maze.cpp: observe_one_env computed row/col +- 1 before checking the
// position, a signed overflow at INT32_MIN/MAX (UBSan in scripts/sanitize.sh). An off-grid position
// now lists no neighbour and no direction, like the oracle; other envs are unaffected.
TEST(observe_refuses_corrupt_position) {
  const int S = 8;
  Batch b(4, S);
  const Config c = cfg(S, 6);
  cpu_reset(c, b.view(), nullptr, 1);
  std::vector<int32_t> nb0(16), or0(16);
  cpu_observe(c, b.view(), nb0.data(), or0.data(), 1);
  b.row[0] = std::numeric_limits<int32_t>::min();
  b.col[1] = std::numeric_limits<int32_t>::max();
  b.row[2] = -1;  // a neighbour (south) would be on the grid: still nothing is listed
  for (int threads : {1, 2}) {
    std::vector<int32_t> nb(16, 77), order(16, 77);
    cpu_observe(c, b.view(), nb.data(), order.data(), threads);
    for (int64_t i = 0; i < 3; ++i)
      for (int d = 0; d < 4; ++d) {
        CHECK_EQ(nb[size_t(i * 4 + d)], -1);
        CHECK_EQ(order[size_t(i * 4 + d)], -1);
      }
    for (int d = 0; d < 4; ++d) {
      CHECK_EQ(nb[size_t(12 + d)], nb0[size_t(12 + d)]);
      CHECK_EQ(order[size_t(12 + d)], or0[size_t(12 + d)]);
    }
  }
}

// Found by tests/cpp/fuzz_maze.cpp: same-step autoreset did `episode += 1` on an int64, UB at
// INT64_MAX (a state tensor the Python side can set). It now wraps like the tensor, and the new
// maze is episode_key(seed, env, 2^63), i.e. the same as Python's episode + 1 modulo 2^64.
TEST(autoreset_wraps_episode_index) {
  const int S = 9;
  Batch b(2, S);
  Config c = cfg(S, 12);
  c.episode_steps = 1;
  c.autoreset = true;
  cpu_reset(c, b.view(), nullptr, 1);
  b.episode[0] = std::numeric_limits<int64_t>::max();
  b.episode[1] = -1;
  std::vector<int32_t> a = valid_actions(b, 5);
  cpu_step(c, b.view(), a.data(), b.out(), 2);
  CHECK_EQ(b.episode[0], std::numeric_limits<int64_t>::min());
  CHECK_EQ(b.origin_episode[0], std::numeric_limits<int64_t>::min());
  CHECK_EQ(b.episode[1], 0);
  const Config p = prepare(c);
  for (int64_t i = 0; i < 2; ++i) {
    CHECK_EQ(int(b.out_done[size_t(i)]), 1);
    CHECK_EQ(b.t[size_t(i)], 0);
    const uint64_t key = episode_key(12, uint64_t(i), uint64_t(b.episode[size_t(i)]));
    std::vector<uint8_t> g(size_t(S) * S);
    int32_t r, col;
    generate_maze(p, key, g.data(), cached_bfs_order(S), r, col);
    CHECK(std::memcmp(g.data(), b.env_grid(i), g.size()) == 0);
    CHECK(b.step_key[size_t(i)] == step_key_of(key));
  }
  CHECK(episode_key(12, 0, uint64_t(1) << 63) ==
        episode_key(12, 0, uint64_t(std::numeric_limits<int64_t>::min())));
}

TEST(reset_advance_moves_the_masked_envs_to_their_next_episode) {
  const int S = 9;
  Batch b(3, S), fresh(3, S);
  const PreparedConfig p(cfg(S, 4));
  b.episode = {std::numeric_limits<int64_t>::max(), 5, 7};
  fresh.episode = b.episode;
  std::vector<uint8_t> mask = {1, 0, 1};
  cpu_reset(p, b.view(), mask.data(), 2, true);
  CHECK_EQ(b.episode[0], std::numeric_limits<int64_t>::min());  // wraps like the int64 tensor
  CHECK_EQ(b.episode[1], 5);
  CHECK_EQ(b.episode[2], 8);
  fresh.episode = {std::numeric_limits<int64_t>::min(), 5, 8};
  cpu_reset(p, fresh.view(), mask.data(), 1);  // the same as advancing first, then resetting
  for (int64_t i : {0, 2}) {
    CHECK(std::memcmp(b.env_grid(i), fresh.env_grid(i), size_t(S) * S) == 0);
    CHECK_EQ(b.origin_episode[size_t(i)], fresh.episode[size_t(i)]);
  }
  CHECK_EQ(b.t[1], -7);  // unmasked: untouched
}

TEST(cuda_stub_or_backend_links) {
  if (!cuda_compiled()) {
    Batch b(1, 6);
    CHECK_THROWS(cuda_reset(cfg(6), b.view(), nullptr, 0), std::runtime_error,
                 "built without the CUDA backend");
  }
}

int main() { return harness::run_all(); }
