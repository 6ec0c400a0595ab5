// Thin pybind11 layer over the maze core (csrc/maze) and the CUDA backend (csrc/maze_cuda).
// Tensors cross as raw data pointers (Python ints) so this module links no PyTorch; the Python
// side (welfare_server/maze/batch.py) owns allocation, dtypes, devices and shapes. Every batch call
// releases the GIL. std::invalid_argument surfaces as ValueError, std::runtime_error as
// RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "maze/config.h"
#include "maze/cpu_backend.h"
#include "maze/rules.h"
#include "maze_cuda/cuda_backend.h"

namespace py = pybind11;
using ws::Config;
using ws::StateView;
using ws::StepOut;
using ws::TokenTable;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using release = py::call_guard<py::gil_scoped_release>;

}  // namespace

PYBIND11_MODULE(_maze_core, m) {
  m.doc() = "welfare_server maze core (C++ CPU backend + optional CUDA backend); see "
            "docs/maze_spec.md";

  py::class_<Config>(m, "Config", "Maze rules (mirrors MazeConfig) plus the seed.")
      .def(py::init([](int32_t size, int32_t episode_steps, double wind_prob, bool melting,
                       float step_reward, float mold_reward, float gold_reward,
                       int32_t walk_min_mult, int32_t walk_max_mult, double mold_fraction_min,
                       double mold_fraction_max, double gold_ratio, bool shuffle_directions,
                       bool autoreset, uint64_t seed) {
             Config c;
             c.size = size;
             c.episode_steps = episode_steps;
             c.wind_prob = wind_prob;
             c.melting = melting;
             c.step_reward = step_reward;
             c.mold_reward = mold_reward;
             c.gold_reward = gold_reward;
             c.walk_min_mult = walk_min_mult;
             c.walk_max_mult = walk_max_mult;
             c.mold_fraction_min = mold_fraction_min;
             c.mold_fraction_max = mold_fraction_max;
             c.gold_ratio = gold_ratio;
             c.shuffle_directions = shuffle_directions;
             c.autoreset = autoreset;
             c.seed = seed;
             return c;
           }),
           py::kw_only(), py::arg("size") = 100, py::arg("episode_steps") = 15,
           py::arg("wind_prob") = 0.1, py::arg("melting") = true, py::arg("step_reward") = -0.1f,
           py::arg("mold_reward") = -10.0f, py::arg("gold_reward") = 20.0f,
           py::arg("walk_min_mult") = 5, py::arg("walk_max_mult") = 15,
           py::arg("mold_fraction_min") = 0.10, py::arg("mold_fraction_max") = 0.50,
           py::arg("gold_ratio") = 0.2, py::arg("shuffle_directions") = true,
           py::arg("autoreset") = false, py::arg("seed") = 0)
      .def_readwrite("size", &Config::size)
      .def_readwrite("episode_steps", &Config::episode_steps)
      .def_readwrite("wind_prob", &Config::wind_prob)
      .def_readwrite("melting", &Config::melting)
      .def_readwrite("step_reward", &Config::step_reward)
      .def_readwrite("mold_reward", &Config::mold_reward)
      .def_readwrite("gold_reward", &Config::gold_reward)
      .def_readwrite("walk_min_mult", &Config::walk_min_mult)
      .def_readwrite("walk_max_mult", &Config::walk_max_mult)
      .def_readwrite("mold_fraction_min", &Config::mold_fraction_min)
      .def_readwrite("mold_fraction_max", &Config::mold_fraction_max)
      .def_readwrite("gold_ratio", &Config::gold_ratio)
      .def_readwrite("shuffle_directions", &Config::shuffle_directions)
      .def_readwrite("autoreset", &Config::autoreset)
      .def_readwrite("seed", &Config::seed)
      .def("validate", [](const Config& c) { ws::validate(c); },
           "Raise ValueError naming the first field out of bounds.")
      // Derived values, computed from the current fields on each access (validates first).
      .def_property_readonly("interior_cells", [](const Config& c) { return ws::prepare(c).interior; })
      .def_property_readonly("mold_count_lo", [](const Config& c) { return ws::prepare(c).mold_lo; })
      .def_property_readonly("mold_count_hi", [](const Config& c) { return ws::prepare(c).mold_hi; })
      .def_property_readonly("wind_threshold",
                             [](const Config& c) { return ws::prepare(c).wind_threshold; })
      .def("__repr__", [](const Config& c) {
        return "Config(size=" + std::to_string(c.size) + ", episode_steps=" +
               std::to_string(c.episode_steps) + ", seed=" + std::to_string(c.seed) + ", ...)";
      });

  py::class_<StateView>(m, "StateView", "Data pointers of the batch state buffers.")
      .def(py::init([](int64_t num_envs, uintptr_t grid, uintptr_t row, uintptr_t col, uintptr_t t,
                       uintptr_t wind_from, uintptr_t episode, uintptr_t step_key, uintptr_t done,
                       uintptr_t origin_env, uintptr_t origin_episode) {
             StateView s;
             s.num_envs = num_envs;
             s.grid = ptr<uint8_t>(grid);
             s.row = ptr<int32_t>(row);
             s.col = ptr<int32_t>(col);
             s.t = ptr<int32_t>(t);
             s.wind_from = ptr<int32_t>(wind_from);
             s.episode = ptr<int64_t>(episode);
             s.step_key = ptr<uint64_t>(step_key);
             s.done = ptr<uint8_t>(done);
             s.origin_env = ptr<int64_t>(origin_env);
             s.origin_episode = ptr<int64_t>(origin_episode);
             return s;
           }),
           py::arg("num_envs"), py::arg("grid"), py::arg("row"), py::arg("col"), py::arg("t"),
           py::arg("wind_from"), py::arg("episode"), py::arg("step_key"), py::arg("done"),
           py::arg("origin_env"), py::arg("origin_episode"))
      .def_readonly("num_envs", &StateView::num_envs);

  py::class_<StepOut>(m, "StepOut", "Data pointers of a step's outputs: f32, i32, i32, i32, u8 [B].")
      .def(py::init([](uintptr_t reward, uintptr_t tile_entered, uintptr_t tile_pushed,
                       uintptr_t wind_from, uintptr_t done) {
             StepOut o;
             o.reward = ptr<float>(reward);
             o.tile_entered = ptr<int32_t>(tile_entered);
             o.tile_pushed = ptr<int32_t>(tile_pushed);
             o.wind_from = ptr<int32_t>(wind_from);
             o.done = ptr<uint8_t>(done);
             return o;
           }),
           py::arg("reward"), py::arg("tile_entered"), py::arg("tile_pushed"),
           py::arg("wind_from"), py::arg("done"));

  py::class_<TokenTable>(m, "TokenTable", "Token fragment table: int32 ids + int32 offsets.")
      .def(py::init([](uintptr_t ids, uintptr_t offsets, int32_t num_fragments, int32_t max_len,
                       int32_t pad_id) {
             TokenTable t;
             t.ids = ptr<const int32_t>(ids);
             t.offsets = ptr<const int32_t>(offsets);
             t.num_fragments = num_fragments;
             t.max_len = max_len;
             t.pad_id = pad_id;
             return t;
           }),
           py::arg("ids_ptr"), py::arg("offsets_ptr"), py::arg("num_fragments"),
           py::arg("max_len"), py::arg("pad_id"))
      .def_readonly("num_fragments", &TokenTable::num_fragments)
      .def_readonly("max_len", &TokenTable::max_len)
      .def_readonly("pad_id", &TokenTable::pad_id);

  // ---- CPU backend ----
  m.def("cpu_reset",
        [](const Config& c, const StateView& s, uintptr_t mask, int num_threads) {
          ws::cpu_reset(c, s, ptr<const uint8_t>(mask), num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("mask_ptr"), py::arg("num_threads") = 0, release());
  m.def("cpu_step",
        [](const Config& c, const StateView& s, uintptr_t actions, const StepOut& o,
           int num_threads) { ws::cpu_step(c, s, ptr<const int32_t>(actions), o, num_threads); },
        py::arg("cfg"), py::arg("state"), py::arg("actions_ptr"), py::arg("out"),
        py::arg("num_threads") = 0, release());
  m.def("cpu_clone", &ws::cpu_clone, py::arg("cfg"), py::arg("state"), py::arg("src"),
        py::arg("dst_begin"), py::arg("dst_end"), py::arg("independent") = true, release());
  m.def("cpu_observe",
        [](const Config& c, const StateView& s, uintptr_t neighbours, uintptr_t order,
           int num_threads) {
          ws::cpu_observe(c, s, ptr<int32_t>(neighbours), ptr<int32_t>(order), num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("neighbours_ptr"), py::arg("order_ptr"),
        py::arg("num_threads") = 0, release());
  m.def("cpu_render_tokens",
        [](const Config& c, const StateView& s, const TokenTable& tt, uintptr_t out_ids,
           uintptr_t lengths, int num_threads) {
          ws::cpu_render_tokens(c, s, tt, ptr<int32_t>(out_ids), ptr<int32_t>(lengths),
                                num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("table"), py::arg("out_ids_ptr"),
        py::arg("lengths_ptr"), py::arg("num_threads") = 0, release());
  m.def("cpu_oracle",
        [](const Config& c, const StateView& s, uintptr_t dist, uintptr_t optimal,
           int num_threads) {
          ws::cpu_oracle(c, s, ptr<int32_t>(dist), ptr<uint8_t>(optimal), num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("dist_ptr"), py::arg("optimal_ptr"),
        py::arg("num_threads") = 0, release());

  // ---- CUDA backend (device pointers; stream is a cudaStream_t as int, 0 = default) ----
  m.def("cuda_compiled", &ws::cuda_compiled,
        "True when this build contains the CUDA backend.");
  m.def("cuda_reset",
        [](const Config& c, const StateView& s, uintptr_t mask, uintptr_t stream) {
          ws::cuda_reset(c, s, ptr<const uint8_t>(mask), stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("mask_ptr"), py::arg("stream") = 0, release());
  m.def("cuda_step",
        [](const Config& c, const StateView& s, uintptr_t actions, const StepOut& o,
           uintptr_t stream) { ws::cuda_step(c, s, ptr<const int32_t>(actions), o, stream); },
        py::arg("cfg"), py::arg("state"), py::arg("actions_ptr"), py::arg("out"),
        py::arg("stream") = 0, release());
  m.def("cuda_clone", &ws::cuda_clone, py::arg("cfg"), py::arg("state"), py::arg("src"),
        py::arg("dst_begin"), py::arg("dst_end"), py::arg("independent") = true,
        py::arg("stream") = 0, release());
  m.def("cuda_observe",
        [](const Config& c, const StateView& s, uintptr_t neighbours, uintptr_t order,
           uintptr_t stream) {
          ws::cuda_observe(c, s, ptr<int32_t>(neighbours), ptr<int32_t>(order), stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("neighbours_ptr"), py::arg("order_ptr"),
        py::arg("stream") = 0, release());
  m.def("cuda_render_tokens",
        [](const Config& c, const StateView& s, const TokenTable& tt, uintptr_t out_ids,
           uintptr_t lengths, uintptr_t stream) {
          ws::cuda_render_tokens(c, s, tt, ptr<int32_t>(out_ids), ptr<int32_t>(lengths), stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("table"), py::arg("out_ids_ptr"),
        py::arg("lengths_ptr"), py::arg("stream") = 0, release());
  m.def("cuda_oracle_scratch_bytes", &ws::cuda_oracle_scratch_bytes, py::arg("cfg"),
        py::arg("envs"),
        "Bytes of device scratch cuda_oracle needs to process `envs` envs at once.");
  m.def("cuda_oracle",
        [](const Config& c, const StateView& s, uintptr_t dist, uintptr_t optimal,
           uintptr_t scratch, size_t scratch_bytes, uintptr_t stream) {
          ws::cuda_oracle(c, s, ptr<int32_t>(dist), ptr<uint8_t>(optimal), ptr<void>(scratch),
                          scratch_bytes, stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("dist_ptr"), py::arg("optimal_ptr"),
        py::arg("scratch_ptr"), py::arg("scratch_bytes"), py::arg("stream") = 0, release(),
        "Envs are processed in chunks of as many as fit in scratch (>= "
        "cuda_oracle_scratch_bytes(cfg, 1) bytes), all ordered on `stream`.");

  // ---- helpers (RNG and tables, for tests and the Python side) ----
  m.def("bfs_order",
        [](int32_t size) {
          if (size < 1 || size > ws::MAX_SIZE)
            throw std::invalid_argument("bfs_order: size=" + std::to_string(size) +
                                        " is out of bounds [1, " + std::to_string(ws::MAX_SIZE) + "]");
          return ws::compute_bfs_order(size);
        },
        py::arg("size"));
  m.def("mix64", &ws::mix64, py::arg("z"));
  m.def("episode_key", &ws::episode_key, py::arg("seed"), py::arg("env"), py::arg("episode"));
  m.def("gen_key", &ws::gen_key, py::arg("key"));
  m.def("step_key", &ws::step_key_of, py::arg("key"));
  m.def("clone_key", &ws::clone_key, py::arg("src_step_key"), py::arg("dst"));
  m.def("draw", &ws::draw, py::arg("key"), py::arg("counter"));
  m.def("uniform",
        [](uint64_t key, uint64_t counter, uint64_t n) {
          if (n == 0 || n >= (uint64_t{1} << 32))
            throw std::invalid_argument("uniform: n must be in [1, 2^32)");
          return ws::uniform(key, counter, n);
        },
        py::arg("key"), py::arg("counter"), py::arg("n"));
  m.attr("NUM_FIXED_FRAGMENTS") = static_cast<int>(ws::FRAG_XNUM);
}
