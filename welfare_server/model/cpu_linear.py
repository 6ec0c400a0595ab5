"""The engine's linear layers: ONE place decides how y = x @ W.T + b runs on each device.

On CPU (fp32 / bf16, oneDNN available) the weight is reordered ONCE, at engine construction, into
oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and every call runs
`torch.ops.mkldnn._linear_pointwise` on it. Elsewhere (CUDA, fp16 on CPU, no oneDNN) it is plain
F.linear on the Hugging Face weight, unchanged.

Why (measured on the 2-core AMD EPYC dev box, AVX-512 + avx512_bf16, torch 2.13 CPU, 2 threads,
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

Memory: the packed weight is an opaque oneDNN tensor, a second copy of the weight (the HF module
keeps its own parameters: HF generate, the hook reference and training still use them). For the
SmolLM2-135M shape that is +537 MB in fp32 (+268 MB in bf16): 106M layer weights + the 28M tied
lm_head (measured RSS growth of an Engine: fp32 +839 MB with packing vs +89 MB without, the rest
being allocator retention of packing temporaries; bf16 +266 MB vs +1 MB).
EngineConfig.cpu_prepack=False turns it off (F.linear on the HF weights, no copy).
The packed copy is a snapshot: after changing the model's weights, call Engine.refresh_weights().

Numerics: oneDNN accumulates in a different order from MKL (fp32 differences ~1e-7 relative);
greedy tokens still equal HF generate in the tests.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACKED_MIN_ROWS = 1
"""Calls with fewer rows than this use F.linear on the original weight (MKL); see the table."""

PACK_BATCH_HINT = 8
"""Batch size oneDNN's weight layout is chosen for (one layout serves every batch size)."""

_PACK_DTYPES = (torch.float32, torch.bfloat16)


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


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 dot products natively (AVX512_BF16 or AMX): only there do bf16 linears
    beat fp32 (RuntimeConfig's dtype="auto" reads this). Elsewhere bf16 is widened to fp32 in
    software and is slower than fp32 itself (see RuntimeConfig.dtype for the measurements)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


class Linear:
    """y = x @ weight.T + bias over the last dim of x, by the path make_linear chose."""

    __slots__ = ("bias", "out_features", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None):
        self.weight = weight  # the HF (or fused) tensor itself: a reference, not a copy
        self.bias = bias
        self.packed = packed
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if p is not None and (PACKED_MIN_ROWS <= 1 or x.numel() >= PACKED_MIN_ROWS * x.shape[-1]):
            return torch.ops.mkldnn._linear_pointwise(x, p, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def repack(self) -> None:
        """Re-read the weight into the packed copy (after the model's weights changed)."""
        if self.packed is not None:
            self.packed = _pack(self.weight)

    @property
    def is_packed(self) -> bool:
        return self.packed is not None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, prepack: bool = True) -> Linear:
    """The engine's linear for this weight: oneDNN-packed on CPU (fp32/bf16, where this CPU packs
    the dtype: packing_supported) when prepack, else F.linear. Packing is checked against a probe
    row; any failure falls back."""
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
    return Linear(weight, bias, packed)
