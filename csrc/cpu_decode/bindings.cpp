// welfare_server._cpu_decode: a thin pybind11 face of the CPU decode ops (ops.h). Tensors cross as
// raw host addresses (ints); the Python caller (welfare_server/kernels/cpu_native.py) owns them,
// checks devices, dtypes, shapes and strides, and keeps them alive across the call. Every call
// releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu_decode/ops.h"

namespace py = pybind11;
using namespace ws::cpu_decode;

namespace {

template <typename T>
T* p(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

}  // namespace

PYBIND11_MODULE(_cpu_decode, m) {
  m.doc() = "The non-linear ops of a CPU decode step on raw host pointers (single-threaded)";
  m.attr("FLOAT32") = static_cast<int>(DType::kF32);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBF16);
  m.def(
      "add_rmsnorm",
      [](uintptr_t h, uintptr_t res, uintptr_t sum, uintptr_t w, uintptr_t y, int64_t rows, int64_t D, float eps,
         int dtype) {
        const DType dt = ws::cpu_linear::dtype_from_code(dtype);
        py::gil_scoped_release release;
        add_rmsnorm(p<const void>(h), p<const void>(res), p<void>(sum), p<const void>(w), p<void>(y), rows, D, eps, dt);
      },
      py::arg("h"), py::arg("res"), py::arg("sum"), py::arg("w"), py::arg("y"), py::arg("rows"), py::arg("D"),
      py::arg("eps"), py::arg("dtype"), "sum = h + res (res 0: none); y = RMSNorm(sum or h) * w");
  m.def(
      "rope_inplace",
      [](uintptr_t x, int64_t rows, int64_t ld_x, int64_t heads, int64_t hd, uintptr_t cos, uintptr_t sin_signed,
         int dtype) {
        const DType dt = ws::cpu_linear::dtype_from_code(dtype);
        py::gil_scoped_release release;
        rope_inplace(p<void>(x), rows, ld_x, heads, hd, p<const void>(cos), p<const void>(sin_signed), dt);
      },
      py::arg("x"), py::arg("rows"), py::arg("ld_x"), py::arg("heads"), py::arg("hd"), py::arg("cos"),
      py::arg("sin_signed"), py::arg("dtype"), "x = x * cos + swap_halves(x) * sin_signed, in place");
  m.def(
      "silu_mul",
      [](uintptr_t gu, uintptr_t out, int64_t rows, int64_t inter, int dtype) {
        const DType dt = ws::cpu_linear::dtype_from_code(dtype);
        py::gil_scoped_release release;
        silu_mul(p<const void>(gu), p<void>(out), rows, inter, dt);
      },
      py::arg("gu"), py::arg("out"), py::arg("rows"), py::arg("inter"), py::arg("dtype"),
      "out = silu(gu[:, :inter]) * gu[:, inter:]");
  m.def(
      "attend_decode",
      [](uintptr_t q, int64_t ld_q, uintptr_t k_new, uintptr_t v_new, int64_t ld_new, uintptr_t k_cache,
         uintptr_t v_cache, int64_t S, int64_t T, uintptr_t slots, uintptr_t positions, int64_t B, int64_t n_heads,
         int64_t n_kv, int64_t hd, int64_t window, float scale, uintptr_t out, int dtype) {
        AttendArgs a;
        a.q = p<const void>(q);
        a.ld_q = ld_q;
        a.k_new = p<const void>(k_new);
        a.v_new = p<const void>(v_new);
        a.ld_new = ld_new;
        a.k_cache = p<void>(k_cache);
        a.v_cache = p<void>(v_cache);
        a.S = S;
        a.T = T;
        a.slots = p<const int64_t>(slots);
        a.positions = p<const int64_t>(positions);
        a.B = B;
        a.n_heads = n_heads;
        a.n_kv = n_kv;
        a.hd = hd;
        a.window = window;
        a.scale = scale;
        a.out = p<void>(out);
        a.dtype = ws::cpu_linear::dtype_from_code(dtype);
        py::gil_scoped_release release;
        attend_decode(a);
      },
      py::arg("q"), py::arg("ld_q"), py::arg("k_new"), py::arg("v_new"), py::arg("ld_new"), py::arg("k_cache"),
      py::arg("v_cache"), py::arg("S"), py::arg("T"), py::arg("slots"), py::arg("positions"), py::arg("B"),
      py::arg("n_heads"), py::arg("n_kv"), py::arg("hd"), py::arg("window"), py::arg("scale"), py::arg("out"),
      py::arg("dtype"), "write the new K/V at (slot, position), then attend (ops.h: attend_decode)");
}
