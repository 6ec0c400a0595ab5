"""The CPU decode step's non-linear ops in C++ (welfare_server._cpu_decode, csrc/cpu_decode): the
RMSNorm with its residual add, RoPE, SiLU-and-multiply and the attention of a few new tokens over
the KV cache, one call each.

Why: at decode a step's rows are few and each of these ops is microseconds of arithmetic, but
torch's eager forms cost dispatch and allocation per op (F.rms_norm ~22 us on a [1, 576] row,
SDPA ~30 us, a KV-cache index_put ~8 us; ~40 eager ops a layer), which on the 2-core Zen 2 VM
made ~9-10 ms of a 45 ms fp32 step at batch 1 (the linears' share, streamed at the memory's
speed, is ~23 ms).

Each function returns None (or False) where its call is not for the C++ op: not built, not CPU,
a dtype other than fp32 / bf16 (the same for every operand), more than MAX_ROWS rows, a layout
the op does not take, or autograd recording. The caller then runs its torch reference, which
every op here matches (tests/kernels/test_cpu_native.py):

    add_rmsnorm / rmsnorm   kernels.steer_rmsnorm.rmsnorm_reference (after hidden + residual)
    rope_qk_                model.engine.adapter.ModelAdapter._rope_qk
    silu_mul                act(gate) * up with act = SiLU
    attend_decode           index_put of the new K/V, then model.engine.attention.gqa_attention

Numerics: fp32 element-wise results round as torch's do; reductions (sums of squares, dot
products) accumulate in another order (differences in the last bits); bf16 intermediates are
rounded where torch stores them in bf16.
"""

from __future__ import annotations

import torch

try:  # absent in a build without it: the torch references only
    from welfare_server import _cpu_decode as _ops
except ImportError:  # pragma: no cover - depends on the build
    _ops = None

USE_NATIVE = True
"""Run the ops below in C++ where they apply; False: every caller runs its torch reference
(what the benchmarks compare against)."""

MAX_ROWS = 16
"""The most rows (tokens) a call may have to run in C++: the ops are single-threaded, built for a
decode step's few rows; a prefill chunk's many rows run torch's ops, which use every thread."""

_CODES = {} if _ops is None else {torch.float32: _ops.FLOAT32, torch.bfloat16: _ops.BFLOAT16}
"""The ops' dtype codes, as their module defines them."""


def available() -> bool:
    """Whether the C++ ops are built into this install (and turned on)."""
    return USE_NATIVE and _ops is not None


def _usable(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype the ops take, autograd not recording through them (on the hot
    path: ~150 calls a decode step, so attribute reads only)."""
    if not USE_NATIVE or _ops is None:
        return False
    dtype = tensors[0].dtype
    if dtype not in _CODES:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype is not dtype:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def add_rmsnorm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(hidden + residual, its RMSNorm * weight) for contiguous [rows, D] rows (residual None: the
    norm of hidden, and hidden itself as the first element); None where not for the C++ op."""
    tensors = (hidden, weight) if residual is None else (hidden, residual, weight)
    if not _usable(*tensors) or hidden.dim() != 2 or not all(t.is_contiguous() for t in tensors):
        return None
    rows, D = hidden.shape
    if rows > MAX_ROWS or weight.shape != (D,) or (residual is not None and residual.shape != hidden.shape):
        return None
    y = torch.empty_like(hidden)
    if residual is None:
        _ops.add_rmsnorm(hidden.data_ptr(), 0, 0, weight.data_ptr(), y.data_ptr(), rows, D, eps,
                         _CODES[hidden.dtype])
        return hidden, y
    summed = torch.empty_like(hidden)
    _ops.add_rmsnorm(hidden.data_ptr(), residual.data_ptr(), summed.data_ptr(), weight.data_ptr(), y.data_ptr(),
                     rows, D, eps, _CODES[hidden.dtype])
    return summed, y


def rope_qk_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> bool:
    """x [T, heads, hd] (heads contiguous, rows any stride) rotated in place by cos / sin_signed
    ([T, 1, hd] or [T, hd], contiguous): x * cos + swap_halves(x) * sin_signed. False (x
    untouched) where not for the C++ op."""
    if not _usable(x, cos, sin_signed) or x.dim() != 3:
        return False
    T, H, hd = x.shape
    if T > MAX_ROWS or x.stride(2) != 1 or x.stride(1) != hd or hd % 2:
        return False
    if not (cos.numel() == sin_signed.numel() == T * hd and cos.is_contiguous() and sin_signed.is_contiguous()):
        return False
    _ops.rope_inplace(x.data_ptr(), T, x.stride(0), H, hd, cos.data_ptr(), sin_signed.data_ptr(), _CODES[x.dtype])
    return True


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor | None:
    """silu(gate_up[:, :inter]) * gate_up[:, inter:] for contiguous [rows, 2 * inter]; None where
    not for the C++ op."""
    if (not _usable(gate_up) or gate_up.dim() != 2 or gate_up.shape[0] > MAX_ROWS or gate_up.shape[1] != 2 * inter
            or not gate_up.is_contiguous()):
        return None
    out = gate_up.new_empty((gate_up.shape[0], inter))
    _ops.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], inter, _CODES[gate_up.dtype])
    return out


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, window: int | None,
                  scale: float) -> torch.Tensor | None:
    """One new token per row: writes k / v [B, n_kv, hd] into the layer's caches [S, n_kv, T, hd]
    at (slots[b], positions[b]), then returns the attention [B, n_heads * hd] of q [B, n_heads, hd]
    over each row's cached positions <= its own (within the sliding window). None (nothing
    written) where not for the C++ op; positions and slots must be in range (the engine's are)."""
    if not _usable(q, k, v, k_cache, v_cache) or q.dim() != 3 or k.dim() != 3 or k_cache.dim() != 4:
        return None
    B, H, hd = q.shape
    S, n_kv, T, _ = k_cache.shape
    if (B > MAX_ROWS or k.shape != (B, n_kv, hd) or v.shape != k.shape or k_cache.shape[3] != hd
            or v_cache.shape != k_cache.shape or H % n_kv):
        return None
    # One row stride for k and v (a size-1 dim's stride is arbitrary: any, when B == 1).
    if (q.stride(2) != 1 or q.stride(1) != hd or k.stride()[1:] != (hd, 1) or v.stride()[1:] != (hd, 1)
            or (B > 1 and v.stride(0) != k.stride(0))
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    if not (slots.dtype == positions.dtype == torch.int64 and slots.is_contiguous() and positions.is_contiguous()
            and slots.shape == positions.shape == (B,) and slots.device.type == positions.device.type == "cpu"):
        return None
    out = q.new_empty((B, H * hd))
    _ops.attend_decode(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), k_cache.data_ptr(),
                       v_cache.data_ptr(), S, T, slots.data_ptr(), positions.data_ptr(), B, H, n_kv, hd,
                       int(window or 0), float(scale), out.data_ptr(), _CODES[q.dtype])
    return out
