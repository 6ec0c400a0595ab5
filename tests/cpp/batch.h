// Owns the buffers of a StateView (what the Python side does with torch tensors), for tests and
// the benchmark.
#pragma once

#include <cstdint>
#include <vector>

#include "maze/rules.h"

struct Batch {
  int64_t B;
  int32_t S;
  std::vector<uint8_t> grid, done;
  std::vector<int32_t> row, col, t, wind_from;
  std::vector<int64_t> episode, origin_env, origin_episode;
  std::vector<uint64_t> step_key;
  std::vector<float> reward;
  std::vector<int32_t> tile_entered, tile_pushed, out_wind;
  std::vector<uint8_t> out_done;

  Batch(int64_t b, int32_t s)
      : B(b), S(s), grid(static_cast<size_t>(b) * s * s, 0xEE), done(b, 0xEE), row(b, -7),
        col(b, -7), t(b, -7), wind_from(b, -7), episode(b, 0), origin_env(b, -7),
        origin_episode(b, -7), step_key(b, 0), reward(b), tile_entered(b), tile_pushed(b),
        out_wind(b), out_done(b) {}

  ws::StateView view() {
    ws::StateView v;
    v.num_envs = B;
    v.grid = grid.data();
    v.row = row.data();
    v.col = col.data();
    v.t = t.data();
    v.wind_from = wind_from.data();
    v.episode = episode.data();
    v.step_key = step_key.data();
    v.done = done.data();
    v.origin_env = origin_env.data();
    v.origin_episode = origin_episode.data();
    return v;
  }
  ws::StepOut out() {
    ws::StepOut o;
    o.reward = reward.data();
    o.tile_entered = tile_entered.data();
    o.tile_pushed = tile_pushed.data();
    o.wind_from = out_wind.data();
    o.done = out_done.data();
    return o;
  }
  uint8_t* env_grid(int64_t i) { return grid.data() + i * S * S; }
  bool same_state(const Batch& o) const {
    return grid == o.grid && done == o.done && row == o.row && col == o.col && t == o.t &&
           wind_from == o.wind_from && episode == o.episode && step_key == o.step_key &&
           origin_env == o.origin_env && origin_episode == o.origin_episode;
  }
};
