// welfare_server._cpu_linear: a thin pybind11 face of the small-M CPU linear (linear.h).
// Tensors cross as raw host addresses (ints); the Python caller (welfare_server/model/cpu_linear.py)
// owns the tensors, checks their devices, dtypes, shapes and strides, and keeps them alive across
// the call. Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_linear/linear.h"

namespace py = pybind11;
using namespace ws::cpu_linear;

namespace {

Isa parse_isa(const std::string& name) {
  if (name == "auto") return Isa::kAuto;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "portable") return Isa::kPortable;
  throw std::invalid_argument("cpu_linear: isa must be 'auto', 'avx2' or 'portable', not '" + name + "'");
}

const void* ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

// One weight (and bias), bound once; each call passes only what changes: x, y and M.
class Weight {
 public:
  Weight(uintptr_t w, int w_dtype, int64_t O, int64_t I, uintptr_t bias, int bias_dtype) {
    base_.w = ptr(w);
    base_.w_dtype = dtype_from_code(w_dtype);
    base_.O = O;
    base_.I = I;
    base_.bias = ptr(bias);
    base_.bias_dtype = dtype_from_code(bias_dtype);
    if (O < 0 || I < 0) throw std::invalid_argument("cpu_linear: negative size");
  }
  // y rows are contiguous (ldy = O).
  void run(uintptr_t x, int64_t ldx, int x_dtype, uintptr_t y, int64_t M, int threads) const {
    Args a = base_;
    a.x = ptr(x);
    a.ldx = ldx;
    a.x_dtype = dtype_from_code(x_dtype);
    a.y = reinterpret_cast<void*>(y);
    a.ldy = a.O;
    a.M = M;
    linear(a, threads, Isa::kAuto);
  }

 private:
  Args base_;
};

}  // namespace

PYBIND11_MODULE(_cpu_linear, m) {
  m.doc() = "Small-M CPU linear y = x @ W.T + b on raw host pointers (AVX2+FMA or portable)";
  m.attr("FLOAT32") = static_cast<int>(DType::kF32);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBF16);
  m.def(
      "linear",
      [](uintptr_t x, int64_t ldx, int x_dtype, uintptr_t w, int w_dtype, uintptr_t bias, int bias_dtype,
         uintptr_t y, int64_t ldy, int64_t M, int64_t I, int64_t O, int threads, const std::string& isa) {
        Args a;
        a.x = ptr(x);
        a.ldx = ldx;
        a.x_dtype = dtype_from_code(x_dtype);
        a.w = ptr(w);
        a.w_dtype = dtype_from_code(w_dtype);
        a.bias = ptr(bias);
        a.bias_dtype = dtype_from_code(bias_dtype);
        a.y = reinterpret_cast<void*>(y);
        a.ldy = ldy;
        a.M = M;
        a.I = I;
        a.O = O;
        const Isa which = parse_isa(isa);
        py::gil_scoped_release release;
        linear(a, threads, which);
      },
      py::arg("x"), py::arg("ldx"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("bias"),
      py::arg("bias_dtype"), py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("I"), py::arg("O"),
      py::arg("threads") = 0, py::arg("isa") = "auto",
      "y[m*ldy + o] = sum_i x[m*ldx + i] * w[o*I + i] (+ bias[o]) for m < M, o < O; addresses as ints, "
      "dtypes as codes (FLOAT32, BFLOAT16), y in x's dtype; threads <= 0: default_threads()");
  py::class_<Weight>(m, "Weight", "A weight [O, I] (and bias [O] or address 0) bound once for repeated calls")
      .def(py::init<uintptr_t, int, int64_t, int64_t, uintptr_t, int>(), py::arg("w"), py::arg("w_dtype"),
           py::arg("O"), py::arg("I"), py::arg("bias"), py::arg("bias_dtype"))
      .def("run", &Weight::run, py::arg("x"), py::arg("ldx"), py::arg("x_dtype"), py::arg("y"), py::arg("M"),
           py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
           "y [M, O] contiguous = x [M, I] (rows ldx apart) @ W.T (+ bias), best ISA");
  m.def("isa_supported", [](const std::string& isa) { return isa_supported(parse_isa(isa)); });
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); });
  m.def("max_threads", &max_threads, "CPUs this process may run on");
  m.def("set_default_threads", &set_default_threads);
  m.def("default_threads", &default_threads);
  m.def("set_spin_us", &set_spin_us, "how long idle pool workers spin before sleeping");
  m.def("spin_us", &spin_us);
  m.def("set_min_parallel_bytes", &set_min_parallel_bytes, "W bytes below which a call runs on one thread");
  m.def("min_parallel_bytes", &min_parallel_bytes);
}
