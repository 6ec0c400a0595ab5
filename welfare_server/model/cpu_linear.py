"""The engine's linear layers: ONE place decides how y = x @ W.T + b runs on each device.

On CPU, per call, by the rows M of x (x.numel() // in_features) and the dtypes:

    path                                     when
    small-M kernel (welfare_server._cpu_linear)
                                             M <= KERNEL_MAX_ROWS[(W dtype, x dtype)] where oneDNN
                                             packs W's dtype; any M where it cannot (bf16 on
                                             AVX2-only CPUs: KERNEL_MAX_ROWS_NO_PACKING)
    oneDNN on the prepacked weight           more rows, W packed (fp32; bf16 where the CPU packs it)
    F.linear on the HF weight                everything else (CUDA, fp16, prepack off, no kernel)

The small-M kernel (csrc/cpu_linear, C++) reads the HF weight in place, row-major as PyTorch
stores it, W fp32 with x fp32 or W bf16 with x bf16/fp32 (fp32 accumulation, bf16 rounded to
nearest even as torch does), AVX2+FMA chosen at run time or a portable loop, rows of W split
between the calling thread and a small persistent pool (KERNEL_THREADS; workers spin ~50 us for
the next call, then sleep). At decode (M = 1..8) a step streams every weight once; this is what
it is built for: reading W at the memory's speed, with no per-call fixed cost to speak of.

The oneDNN packing, earlier (measured on a 2-core AMD EPYC dev box with AVX-512 + avx512_bf16,
torch 2.13 CPU, 2 threads,
all linears of the SmolLM2-135M shape run back to back (30 layers x qkv/o/gate_up/down + the
49152x576 lm_head, weights streamed from memory as in a real decode step), ms per pass, best of 4):

                      F.linear (MKL)   oneDNN packed (hint 8)
    fp32  M=1              32.2              13.8
    fp32  M=8              42.1              15.9
    fp32  M=512           ~765              ~320
    bf16  M=1              10.8               7.2
    bf16  M=8              12.5               8.7

MKL's small-M fp32 GEMM is the slow one here (lm_head M=1: 6.8 ms = 17 GB/s; packed: 2.4 ms).
One packing (batch hint 8) served every M we tried (1, 8, 64, 512) within noise of the packing
made for that M, so one packed copy per weight is kept, not one per batch size. Rows fewer than
PACKED_MIN_ROWS fall back to F.linear on the original weight; the measured crossover is below 1
(packed wins at M=1 too), so the fallback is off by default and kept as the knob to turn if
another CPU measures differently. A oneDNN call has a ~10 us fixed cost (F.linear fp32: ~1 us;
16x16 weight, 1 row), which makes MKL faster for the small o/down weights when they are hot in
cache, but in the streamed 30-layer pass MKL for o+down at M=1 fp32 was slower (15.1 vs 10.8 ms),
so every linear takes the packed path. That fixed cost (~1.2 ms/step for 121 calls) is now the
largest non-bandwidth term of a batch-1 bf16 step.

The small-M kernel against the others on the AVX2-only Zen 2 VM (2 cores, 2 threads, quiet; the
same streamed pass, bench/bench_linear.py, bench/results/linear.csv; read roof ~25 GB/s):

                      F.linear (MKL)   oneDNN packed   small-M kernel
    fp32  M=1              57.1             38.6            37.0      (lm_head alone: 11.7 / 5.5 / 4.7)
    fp32  M=8             103.4             56.7            54.9
    bf16  M=1              26.5            (no packing)     20.9
    bf16  M=8             164.6            (no packing)     52.5

At fp32 M=1 the kernel reads lm_head at 93% of the roof and down at 85%, but qkv, o and gate_up at
61-69% (calls of 1.3-7 MB each), and the whole interleaved pass at 56%. Inside a real decode step
the linears lost more: the step's linears alone, back to back, took 22.7 ms, but the whole step
45 ms with only ~9 ms of other work. torch's OpenMP workers, spinning after each parallel region
(SDPA's, per layer), took the second core from the kernel's pool. The step's other ops now run as
single-threaded C++ calls (kernels/cpu_native.py), no OpenMP region runs inside a decode step, and
the fp32 batch-1 step takes ~32 ms (bench_generate: 2.12x HF generate, was 1.58x).

Memory: the packed weight is an opaque oneDNN tensor, a second copy of the weight (the HF module
keeps its own parameters: HF generate, the hook reference and training still use them). For the
SmolLM2-135M shape that is +537 MB in fp32 (+268 MB in bf16): 106M layer weights + the 28M tied
lm_head (measured RSS growth of an Engine: fp32 +839 MB with packing vs +89 MB without, the rest
being allocator retention of packing temporaries; bf16 +266 MB vs +1 MB).
EngineConfig.cpu_prepack=False turns it off (F.linear on the HF weights, no copy; the kernel still
takes the calls of few rows). The packed copy is a snapshot: after changing the model's weights,
call Engine.refresh_weights(). The kernel reads the live weight (in-place changes show at once);
repack() re-binds it too, and a call re-binds by itself if the tensor's storage was replaced.

Numerics: oneDNN and the kernel accumulate in orders other than MKL's (fp32 differences ~1e-7
relative, within a few ulps of the sum of |terms|); greedy tokens still equal HF generate in the
tests (tests/model/test_equality.py, the bundled model in fp32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # the C++ small-M kernel (csrc/cpu_linear); absent in a build without it: oneDNN / F.linear only
    from welfare_server import _cpu_linear as _kernel
except ImportError:  # pragma: no cover - depends on the build
    _kernel = None

PACKED_MIN_ROWS = 1
"""Calls with fewer rows than this use F.linear on the original weight (MKL) rather than the
oneDNN-packed copy (when the small-M kernel does not take them first); see the table."""

PACK_BATCH_HINT = 8
"""Batch size oneDNN's weight layout is chosen for (one layout serves every batch size)."""

USE_KERNEL = True
"""Default of make_linear(kernel=None): run calls of few rows through the C++ small-M kernel
(welfare_server._cpu_linear) where it is built and the weight suits it. False restores the
oneDNN / F.linear paths for every call (the engine's linears are made once, at Engine
construction: set this before)."""

KERNEL_MAX_ROWS = {
    (torch.float32, torch.float32): 8,
    (torch.bfloat16, torch.bfloat16): 8,
    (torch.bfloat16, torch.float32): 8,
}
"""(weight dtype, activation dtype) -> the most rows (M = x.numel() // in_features) a call may have
to run on the small-M kernel; more rows go to oneDNN / F.linear. See the tables above."""

KERNEL_MAX_ROWS_NO_PACKING = 1 << 30
"""The row limit where oneDNN cannot pack the weight's dtype (bf16 on AVX2-only CPUs): there the
alternative is torch's bf16 F.linear, which the kernel beats at every M measured (3.1x at M=8 in the table above)."""

KERNEL_THREADS = 0
"""Threads a kernel call uses, the caller included: 0 follows torch.get_num_threads() (read per
call, so torch.set_num_threads applies at once)."""

_PACK_DTYPES = (torch.float32, torch.bfloat16)
# The kernel's dtype codes, as its module defines them (empty without the module: nothing qualifies).
_KERNEL_CODES = {} if _kernel is None else {torch.float32: _kernel.FLOAT32, torch.bfloat16: _kernel.BFLOAT16}


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.lru_cache(maxsize=None)
def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs (and runs) weights of this dtype on this CPU. fp32 packs on any x86-64
    oneDNN supports; bf16 needs avx512bw/vl/dq or avx_ne_convert (an AVX2-only CPU such as AMD
    Zen 2 refuses it, and its linears then run F.linear). Probed once per dtype."""
    if dtype not in _PACK_DTYPES or not _onednn_ok():
        return False
    try:
        with torch.inference_mode():
            packed = _pack(torch.ones(8, 8, dtype=dtype))
            got = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), packed, None, "none", [], "")
        return got.shape == (1, 8) and bool((got.float() == 8).all())
    except RuntimeError:
        return False


def kernel_available() -> bool:
    """Whether the C++ small-M kernel is built into this install."""
    return _kernel is not None


def kernel_isa() -> str | None:
    """The instruction set the small-M kernel runs on this CPU ("avx2" or "portable"), None if
    it is not built."""
    return _kernel.best_isa() if _kernel is not None else None


def cpu_flags() -> set[str]:
    """The feature flags /proc/cpuinfo lists for this CPU (empty where it cannot be read): what
    benchmarks record beside their rows and what tests compare the kernel's own detection with."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 dot products natively (AVX512_BF16 or AMX): only there do bf16 linears
    beat fp32 (RuntimeConfig's dtype="auto" reads this). Elsewhere bf16 is widened to fp32 in
    software and is slower than fp32 itself (see RuntimeConfig.dtype for the measurements)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


class Linear:
    """y = x @ weight.T + bias over the last dim of x, by the path make_linear chose: the small-M
    kernel for calls of few rows (when bound), else the oneDNN-packed copy (when packed), else
    F.linear."""

    __slots__ = ("bias", "out_features", "packed", "weight", "_kernel_on", "_kw", "_kw_ptrs", "_kmax", "_in", "_ylike")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None,
                 kernel: bool = False):
        self.weight = weight  # the HF (or fused) tensor itself: a reference, not a copy
        self.bias = bias
        self.packed = packed
        self.out_features = weight.shape[0]
        self._in = weight.shape[1] if weight.dim() == 2 else -1
        self._kernel_on = kernel
        self._kw = None  # the kernel's binding of (weight, bias), None: the kernel is not used
        self._kw_ptrs = None  # (weight, bias) addresses it was bound at
        self._kmax = {}  # activation dtype -> (dtype code, most rows)
        # (rows, dtype) -> a one-element tensor expanded to [rows, out_features]: torch.empty_like
        # of it allocates the output in ~2.4 us against ~3.7 us for torch.empty(shape, dtype=)
        # (per call, 121 calls a step; measured on the Zen 2 VM under load).
        self._ylike = {}
        self._bind_kernel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kw = self._kw
        if kw is not None:
            lim = self._kmax.get(x.dtype)
            if lim is not None and x.is_cpu:
                y = self._run_kernel(kw, x, lim)
                if y is not None:
                    return y
        p = self.packed
        if p is not None and (PACKED_MIN_ROWS <= 1 or x.numel() >= PACKED_MIN_ROWS * x.shape[-1]):
            return torch.ops.mkldnn._linear_pointwise(x, p, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _run_kernel(self, kw, x: torch.Tensor, lim: tuple[int, int]) -> torch.Tensor | None:
        """The kernel's y, or None where this call is not for it (too many rows, a shape F.linear
        should refuse, autograd recording, storage no longer suitable)."""
        shape = x.shape
        n_in = self._in
        if len(shape) == 2:  # the engine's calls: [rows, in_features]
            rows = shape[0]
            if shape[1] != n_in or not 0 < rows <= lim[1]:
                return None
            stride = x.stride()
            if stride[1] != 1:
                x = x.contiguous()
                stride = (n_in, 1)
            ldx = stride[0]
            like = self._ylike.get((rows, x.dtype))
            if like is None:
                like = torch.empty(1, dtype=x.dtype).expand(rows, self.out_features)
                if len(self._ylike) < 64:
                    self._ylike[(rows, x.dtype)] = like
        else:
            if not shape or shape[-1] != n_in:
                return None
            rows = x.numel() // n_in
            if not 0 < rows <= lim[1]:
                return None
            if not x.is_contiguous():
                x = x.contiguous()
            ldx = n_in
            like = None
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return None  # the kernel has no backward: let autograd record F.linear
        if (w.data_ptr(), 0 if b is None else b.data_ptr()) != self._kw_ptrs:
            # The tensors' storage was replaced (param.data = ...): re-check and re-bind.
            self._bind_kernel()
            if self._kw is None:
                return None
            kw = self._kw
        if like is not None:
            y = torch.empty_like(like)
        else:
            y = torch.empty(shape[:-1] + (self.out_features,), dtype=x.dtype)
        kw.run(x.data_ptr(), ldx, lim[0], y.data_ptr(), rows, KERNEL_THREADS or torch.get_num_threads())
        return y

    def _bind_kernel(self) -> None:
        """Binds the kernel to the weight's (and bias's) current storage if they suit it: CPU,
        contiguous, fp32 or bf16 (bias of either), 2-D with both sizes > 0."""
        self._kw = None
        self._kw_ptrs = None
        self._kmax = {}
        w, b = self.weight, self.bias
        if not (self._kernel_on and _kernel is not None and w.device.type == "cpu" and w.dim() == 2
                and w.dtype in _KERNEL_CODES and w.is_contiguous() and w.shape[0] > 0 and w.shape[1] > 0):
            return
        if b is not None and not (b.device.type == "cpu" and b.dtype in _KERNEL_CODES and b.is_contiguous()
                                  and tuple(b.shape) == (w.shape[0],)):
            return
        no_packing = not packing_supported(w.dtype)
        for (wd, xd), limit in KERNEL_MAX_ROWS.items():
            if wd == w.dtype:
                self._kmax[xd] = (_KERNEL_CODES[xd], KERNEL_MAX_ROWS_NO_PACKING if no_packing else limit)
        self._kw = _kernel.Weight(w.data_ptr(), _KERNEL_CODES[w.dtype], w.shape[0], w.shape[1],
                                  0 if b is None else b.data_ptr(), _KERNEL_CODES[b.dtype] if b is not None else 0)
        self._kw_ptrs = (w.data_ptr(), 0 if b is None else b.data_ptr())

    def repack(self) -> None:
        """Re-read the weight into the packed copy (after the model's weights changed). The kernel
        reads the weight in place, so it needs no refresh for in-place changes; it is re-bound here
        anyway in case the tensors' storage was replaced."""
        if self.packed is not None:
            self.packed = _pack(self.weight)
        self._bind_kernel()

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    @property
    def uses_kernel(self) -> bool:
        """Whether calls of few rows run on the small-M kernel."""
        return self._kw is not None

    def kernel_max_rows(self, x_dtype: torch.dtype) -> int:
        """The most rows a call with activations of this dtype runs on the kernel (0: never)."""
        lim = self._kmax.get(x_dtype) if self._kw is not None else None
        return 0 if lim is None else lim[1]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, prepack: bool = True,
                kernel: bool | None = None) -> Linear:
    """The engine's linear for this weight. On CPU: calls of few rows run on the small-M kernel
    (kernel=None: USE_KERNEL; where built and the weight is fp32/bf16, contiguous); the rest run
    oneDNN-packed (fp32/bf16, where this CPU packs the dtype: packing_supported) when prepack, else
    F.linear. Packing is checked against a probe row; any failure falls back."""
    packed = None
    if (prepack and weight.device.type == "cpu" and weight.dim() == 2 and packing_supported(weight.dtype)
            and (bias is None or bias.dtype == weight.dtype)):
        try:
            with torch.inference_mode():
                packed = _pack(weight)
                probe = torch.ones(1, weight.shape[1], dtype=weight.dtype)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
                if got.shape != (1, weight.shape[0]):
                    packed = None
        except RuntimeError:
            packed = None
    return Linear(weight, bias, packed, kernel=USE_KERNEL if kernel is None else bool(kernel))
