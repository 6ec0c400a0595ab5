// Thin pybind11 layer over the maze core (csrc/maze) and the CUDA backend (csrc/maze_cuda).
// Tensors cross as raw data pointers (Python ints) so this module links no PyTorch; the Python
// side (welfare_server/maze/batch.py) owns allocation, dtypes, devices and shapes. Every batch call
// releases the GIL. std::invalid_argument surfaces as ValueError, std::runtime_error as
// RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "maze/config.h"
#include "maze/cpu_backend.h"
#include "maze/cpu_sampler.h"
#include "maze/rules.h"
#include "maze_cuda/cuda_backend.h"

namespace py = pybind11;
using ws::Config;
using ws::ObserveOut;
using ws::PreparedConfig;
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

  // The rule fields come from WS_CONFIG_FIELDS (rules.h): every one must be given by name (no
  // defaults here: MazeConfig holds them), plus the seed. The object is validated and derived
  // once, here, and read-only after: batch calls read it as it is.
  py::class_<PreparedConfig>(m, "Config",
                             "Maze rules (every MazeConfig rule field, by name) plus the seed; "
                             "validated on construction, read-only.")
      .def(py::init([](const py::kwargs& fields) {
             Config c;
             size_t used = 0;
             auto take = [&](const char* name, auto& member) {
               using T = std::remove_reference_t<decltype(member)>;
               if (!fields.contains(name))
                 throw std::invalid_argument(std::string("Config.") + name +
                                             " is missing: every field is required (MazeConfig "
                                             "holds the defaults)");
               try {
                 member = py::cast<T>(fields[name]);
               } catch (const py::cast_error&) {
                 throw std::invalid_argument(
                     std::string("Config.") + name + "=" +
                     py::str(py::repr(fields[name])).cast<std::string>() + " is not " +
                     (std::is_same<T, bool>::value            ? "a bool"
                      : std::is_floating_point<T>::value      ? "a number"
                                                              : "an integer in range"));
               }
               ++used;
             };
#define WS_TAKE(type, name, value) take(#name, c.name);
             WS_CONFIG_FIELDS(WS_TAKE)
#undef WS_TAKE
             take("seed", c.seed);
             if (used != fields.size()) {
               for (const auto& item : fields) {
                 const std::string key = py::str(item.first);
                 bool known = key == "seed";
#define WS_KNOWN(type, name, value) known = known || key == #name;
                 WS_CONFIG_FIELDS(WS_KNOWN)
#undef WS_KNOWN
                 if (!known)
                   throw std::invalid_argument("Config has no field '" + key + "'");
               }
             }
             return PreparedConfig(c);  // validates: std::invalid_argument naming the field
           }))
#define WS_READ(type, name, value) \
  .def_property_readonly(#name, [](const PreparedConfig& p) { return p.get().name; })
      WS_CONFIG_FIELDS(WS_READ)
#undef WS_READ
      .def_property_readonly("seed", [](const PreparedConfig& p) { return p.get().seed; })
      .def_property_readonly("interior_cells", [](const PreparedConfig& p) { return p.get().interior; })
      .def_property_readonly("mold_count_lo", [](const PreparedConfig& p) { return p.get().mold_lo; })
      .def_property_readonly("mold_count_hi", [](const PreparedConfig& p) { return p.get().mold_hi; })
      .def_property_readonly("wind_threshold",
                             [](const PreparedConfig& p) { return p.get().wind_threshold; })
      .def("__repr__", [](const PreparedConfig& p) {
        return "Config(size=" + std::to_string(p.get().size) + ", episode_steps=" +
               std::to_string(p.get().episode_steps) + ", seed=" + std::to_string(p.get().seed) +
               ", ...)";
      });
  {
    py::list names;
#define WS_NAME(type, name, value) names.append(#name);
    WS_CONFIG_FIELDS(WS_NAME)
#undef WS_NAME
    names.append("seed");
    m.attr("CONFIG_FIELDS") = py::tuple(names);
  }

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

  py::class_<ObserveOut>(m, "ObserveOut",
                         "Data pointers of observe()'s outputs: neighbours, order i32 [B, 4]; "
                         "valid u8 [B, 4], position i32 [B, 2], step_index, wind_from i32 [B] "
                         "(0 = not written).")
      .def(py::init([](uintptr_t neighbours, uintptr_t order, uintptr_t valid, uintptr_t position,
                       uintptr_t step_index, uintptr_t wind_from) {
             ObserveOut o;
             o.neighbours = ptr<int32_t>(neighbours);
             o.order = ptr<int32_t>(order);
             o.valid = ptr<uint8_t>(valid);
             o.position = ptr<int32_t>(position);
             o.step_index = ptr<int32_t>(step_index);
             o.wind_from = ptr<int32_t>(wind_from);
             return o;
           }),
           py::arg("neighbours"), py::arg("order"), py::arg("valid") = 0, py::arg("position") = 0,
           py::arg("step_index") = 0, py::arg("wind_from") = 0);

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
        [](const PreparedConfig& c, const StateView& s, uintptr_t mask, int num_threads,
           bool advance) { ws::cpu_reset(c, s, ptr<const uint8_t>(mask), num_threads, advance); },
        py::arg("cfg"), py::arg("state"), py::arg("mask_ptr"), py::arg("num_threads") = 0,
        py::arg("advance") = false, release(),
        "Reset the masked envs (mask_ptr 0: all) to episode index + 1 if advance, else to it.");
  m.def("cpu_step",
        [](const PreparedConfig& c, const StateView& s, uintptr_t actions, const StepOut& o,
           int num_threads) { ws::cpu_step(c, s, ptr<const int32_t>(actions), o, num_threads); },
        py::arg("cfg"), py::arg("state"), py::arg("actions_ptr"), py::arg("out"),
        py::arg("num_threads") = 0, release());
  m.def("cpu_clone",
        [](const PreparedConfig& c, const StateView& s, int64_t src, int64_t dst_begin,
           int64_t dst_end, bool independent) {
          ws::cpu_clone(c, s, src, dst_begin, dst_end, independent);
        }, py::arg("cfg"), py::arg("state"), py::arg("src"),
        py::arg("dst_begin"), py::arg("dst_end"), py::arg("independent") = true, release());
  m.def("cpu_observe",
        [](const PreparedConfig& c, const StateView& s, const ObserveOut& o, int num_threads) {
          ws::cpu_observe(c, s, o, num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("out"), py::arg("num_threads") = 0, release());
  m.def("cpu_render_tokens",
        [](const PreparedConfig& c, const StateView& s, const TokenTable& tt, uintptr_t out_ids,
           uintptr_t lengths, int num_threads) {
          ws::cpu_render_tokens(c, s, tt, ptr<int32_t>(out_ids), ptr<int32_t>(lengths),
                                num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("table"), py::arg("out_ids_ptr"),
        py::arg("lengths_ptr"), py::arg("num_threads") = 0, release());
  m.def("cpu_oracle",
        [](const PreparedConfig& c, const StateView& s, uintptr_t dist, uintptr_t optimal,
           int num_threads) {
          ws::cpu_oracle(c, s, ptr<int32_t>(dist), ptr<uint8_t>(optimal), num_threads);
        },
        py::arg("cfg"), py::arg("state"), py::arg("dist_ptr"), py::arg("optimal_ptr"),
        py::arg("num_threads") = 0, release());

  // ---- CUDA backend (device pointers; stream is a cudaStream_t as int, 0 = default) ----
  m.def("cuda_compiled", &ws::cuda_compiled,
        "True when this build contains the CUDA backend.");
  m.def("cuda_reset",
        [](const PreparedConfig& c, const StateView& s, uintptr_t mask, uintptr_t stream,
           bool advance) { ws::cuda_reset(c, s, ptr<const uint8_t>(mask), stream, advance); },
        py::arg("cfg"), py::arg("state"), py::arg("mask_ptr"), py::arg("stream") = 0,
        py::arg("advance") = false, release());
  m.def("cuda_step",
        [](const PreparedConfig& c, const StateView& s, uintptr_t actions, const StepOut& o,
           uintptr_t stream) { ws::cuda_step(c, s, ptr<const int32_t>(actions), o, stream); },
        py::arg("cfg"), py::arg("state"), py::arg("actions_ptr"), py::arg("out"),
        py::arg("stream") = 0, release());
  m.def("cuda_clone",
        [](const PreparedConfig& c, const StateView& s, int64_t src, int64_t dst_begin,
           int64_t dst_end, bool independent, uintptr_t stream) {
          ws::cuda_clone(c, s, src, dst_begin, dst_end, independent, stream);
        }, py::arg("cfg"), py::arg("state"), py::arg("src"),
        py::arg("dst_begin"), py::arg("dst_end"), py::arg("independent") = true,
        py::arg("stream") = 0, release());
  m.def("cuda_observe",
        [](const PreparedConfig& c, const StateView& s, const ObserveOut& o, uintptr_t stream) {
          ws::cuda_observe(c, s, o, stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("out"), py::arg("stream") = 0, release());
  m.def("cuda_render_tokens",
        [](const PreparedConfig& c, const StateView& s, const TokenTable& tt, uintptr_t out_ids,
           uintptr_t lengths, uintptr_t stream) {
          ws::cuda_render_tokens(c, s, tt, ptr<int32_t>(out_ids), ptr<int32_t>(lengths), stream);
        },
        py::arg("cfg"), py::arg("state"), py::arg("table"), py::arg("out_ids_ptr"),
        py::arg("lengths_ptr"), py::arg("stream") = 0, release());
  m.def("cuda_oracle_scratch_bytes",
        [](const PreparedConfig& c, int64_t envs) { return ws::cuda_oracle_scratch_bytes(c, envs); },
        py::arg("cfg"),
        py::arg("envs"),
        "Bytes of device scratch cuda_oracle needs to process `envs` envs at once.");
  m.def("cuda_oracle",
        [](const PreparedConfig& c, const StateView& s, uintptr_t dist, uintptr_t optimal,
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
  m.def("cpu_sampler_name", &ws::cpu_sampler_name,
        "The maze generator routine this CPU runs: 'avx512', 'avx2' or 'portable' (WS_NO_SIMD=1 "
        "in the environment, read once, forces 'portable').");
  m.def("cpu_supported_routines",
        [] {
          std::vector<std::string> names;
          for (const auto& r : ws::cpu_supported_routines()) names.push_back(r.name);
          return names;
        },
        "Every generator routine this CPU can run, portable first.");
}
