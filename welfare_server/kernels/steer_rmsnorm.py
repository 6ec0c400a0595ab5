"""steer_rmsnorm: steering and the next block's input RMSNorm in one pass over the row.

Returns the steered residual (the stream the rest of the model keeps adding into) and
normed = RMSNorm(steered) * weight, which is what the following decoder layer reads, so that
layer's input norm does not make its own pass over h.

The norm follows Hugging Face's LlamaRMSNorm on the *stored* steered row (hidden's dtype):
    xs = steered.float(); xs = xs * rsqrt(mean(xs^2) + eps); normed = weight * xs.to(hidden.dtype)
so fused and unfused (steer, then LlamaRMSNorm) give the same numbers up to reduction order.
For fp32 hidden the stored row is the fp32 accumulator itself. The normed dtype is
promote(hidden.dtype, weight.dtype), again as LlamaRMSNorm returns it.
"""
from __future__ import annotations

import torch

from welfare_server.kernels._checks import check_out
from welfare_server.kernels.steer import (HAS_TRITON, LaunchTuning, _launch_buffers, launch_config,
                                          steer_reference)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from welfare_server.kernels.steer import _steer_rows


def normed_dtype(hidden: torch.Tensor, norm_weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, norm_weight.dtype)


def rmsnorm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, verbatim semantics."""
    xs = h.float()
    var = xs.pow(2).mean(-1, keepdim=True)
    xs = xs * torch.rsqrt(var + eps)
    return weight * xs.to(h.dtype)


def steer_rmsnorm_reference(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                            out=None, normed_out=None, monitor=None, monitor_post=True,
                         tuning: LaunchTuning | None = None):
    # The steer reference does the steering; the norm is applied to what it stored.
    steered, proj = steer_reference(hidden, bank, term_vector, term_coef, term_mode, out=out,
                                    monitor=monitor, monitor_post=monitor_post)
    normed = rmsnorm_reference(steered, norm_weight, eps)
    if normed_out is not None:
        check_out(normed_out, hidden, "normed_out", normed_dtype(hidden, norm_weight))
        normed_out.copy_(normed)
        normed = normed_out
    return steered, normed, proj


if HAS_TRITON:

    @triton.jit
    def _steer_rmsnorm_kernel(h_ptr, stride_h, out_ptr, stride_o, n_ptr, stride_n, w_ptr, eps,
                              bank_ptr, stride_bk, K, tv_ptr, tc_ptr, tm_ptr,
                              mon_ptr, stride_mm, proj_ptr, T, D,
                              NT: tl.constexpr, M: tl.constexpr, MONITOR_POST: tl.constexpr,
                              INPLACE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = tl.arange(0, BLOCK_D)
        stored, mask2, dmask = _steer_rows(h_ptr, stride_h, out_ptr, stride_o, bank_ptr, stride_bk, K,
                                           tv_ptr, tc_ptr, tm_ptr, mon_ptr, stride_mm, proj_ptr, rows,
                                           offs, T, D, NT, M, MONITOR_POST, INPLACE)
        # RMSNorm of the stored row, as LlamaRMSNorm computes it (see module doc).
        xs = stored.to(tl.float32)
        var = tl.sum(xs * xs, axis=1) / D
        xn = (xs * (1.0 / tl.sqrt(var + eps))[:, None]).to(stored.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(n_ptr + rows[:, None] * stride_n + offs[None, :],
                 (w[None, :] * xn).to(n_ptr.dtype.element_ty), mask=mask2)


def steer_rmsnorm_triton(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                         out=None, normed_out=None, monitor=None, monitor_post=True,
                         tuning: LaunchTuning | None = None):
    T, D = hidden.shape
    b = _launch_buffers("steer_rmsnorm", hidden, bank, term_vector, term_coef, term_mode, out, monitor)
    ndt = normed_dtype(hidden, norm_weight)
    if normed_out is None:
        normed_out = torch.empty((T, D), dtype=ndt, device=hidden.device)
    else:
        check_out(normed_out, hidden, "normed_out", ndt)
        if normed_out.stride(1) != 1 and D > 1:
            raise ValueError("normed_out needs unit stride along D")
    if T == 0:
        return b["out"], normed_out, b["proj"]
    ROWS, BLOCK_D, num_warps = launch_config(D, T, tuning)
    _steer_rmsnorm_kernel[(triton.cdiv(T, ROWS),)](
        b["hidden"], b["hidden"].stride(0), b["out"], b["out"].stride(0), normed_out, normed_out.stride(0),
        norm_weight.contiguous(), float(eps), b["bank"], b["bank"].stride(0), b["bank"].shape[0],
        b["tv"], b["tc"], b["tm"], b["mon_arg"], b["mon_stride"], b["proj_arg"], T, D,
        NT=b["tv"].shape[1], M=b["M"], MONITOR_POST=bool(monitor_post), INPLACE=b["inplace"],
        ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return b["out"], normed_out, b["proj"]
