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
import torch.nn.functional as F

from welfare_server.kernels import cpu_native
from welfare_server.kernels._checks import check_out
from welfare_server.kernels.rows import (HAS_TRITON, LaunchTuning, launch_buffers, launch_config, no_terms,
                                         row_ready)
from welfare_server.kernels.steer import steer_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    from welfare_server.kernels.rows import steer_rows


def normed_dtype(hidden: torch.Tensor, norm_weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, norm_weight.dtype)


def rmsnorm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, verbatim semantics."""
    xs = h.float()
    var = xs.pow(2).mean(-1, keepdim=True)
    xs = xs * torch.rsqrt(var + eps)
    return weight * xs.to(h.dtype)


def rmsnorm_cpu(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_reference on the CPU path: the C++ op where it applies (cpu_native), else in fp32
    the same maths as one fused op (6 eager ops -> 1: ~1 ms per decode step at 30 layers on the
    dev CPU)."""
    native = cpu_native.add_rmsnorm(h, None, weight, eps)
    if native is not None:
        return native[1]
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    return rmsnorm_reference(h, weight, eps)


def steer_rmsnorm_reference(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                            out=None, normed_out=None, monitor=None, monitor_post=True, residual=None):
    return _steer_then_norm(rmsnorm_reference, hidden, bank, term_vector, term_coef, term_mode, norm_weight,
                            eps, out=out, normed_out=normed_out, monitor=monitor, monitor_post=monitor_post,
                            residual=residual)


def steer_rmsnorm_cpu(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                      out=None, normed_out=None, monitor=None, monitor_post=True, residual=None):
    """steer_rmsnorm_reference on the CPU path: the same steering, the norm by rmsnorm_cpu (one
    C++ call or one fused op instead of six eager ones; equal up to the reduction's order)."""
    return _steer_then_norm(rmsnorm_cpu, hidden, bank, term_vector, term_coef, term_mode, norm_weight,
                            eps, out=out, normed_out=normed_out, monitor=monitor, monitor_post=monitor_post,
                            residual=residual)


def _steer_then_norm(norm, hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                     out, normed_out, monitor, monitor_post, residual):
    if residual is not None:
        # hidden + residual in hidden's dtype is the row that is steered and normed; in place, it
        # replaces hidden (every row, steered or not).
        summed = hidden + residual
        if out is hidden:
            hidden.copy_(summed)
        else:
            hidden = summed
            out = summed if out is None else out
    # The steer reference does the steering; the norm is applied to what it stored.
    steered, proj = steer_reference(hidden, bank, term_vector, term_coef, term_mode, out=out,
                                    monitor=monitor, monitor_post=monitor_post)
    normed = norm(steered, norm_weight, eps)
    if normed_out is not None:
        check_out(normed_out, hidden, "normed_out", normed_dtype(hidden, norm_weight))
        normed_out.copy_(normed)
        normed = normed_out
    return steered, normed, proj


if HAS_TRITON:

    @triton.jit
    def _normed_chunk(n_ptr, stride_n, w_ptr, rows, offs, dmask, mask2, stored, inv_rms):
        # LlamaRMSNorm's rounding: normalise in fp32, round to the row's dtype, then scale by w.
        xn = (stored.to(tl.float32) * inv_rms[:, None]).to(stored.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(n_ptr + rows[:, None] * stride_n + offs[None, :], (w[None, :] * xn).to(n_ptr.dtype.element_ty),
                 mask=mask2)

    @triton.jit
    def _steer_rmsnorm_kernel(h_ptr, stride_h, out_ptr, stride_o, n_ptr, stride_n, w_ptr, eps,
                              bank_ptr, stride_bk, K, tv_ptr, tc_ptr, tm_ptr,
                              mon_ptr, stride_mm, proj_ptr, T, D,
                              NT: tl.constexpr, M: tl.constexpr, MONITOR_POST: tl.constexpr,
                              INPLACE: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
                              BLOCK_B: tl.constexpr, res_ptr, stride_r, HAS_RES: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        stored_a, stored_b, offs_a, offs_b, mask_a, mask_b, dmask_a, dmask_b = steer_rows(
            h_ptr, stride_h, out_ptr, stride_o, bank_ptr, stride_bk, K, tv_ptr, tc_ptr, tm_ptr, mon_ptr,
            stride_mm, proj_ptr, rows, T, D, NT, M, MONITOR_POST, INPLACE, BLOCK_A, BLOCK_B, res_ptr,
            stride_r, HAS_RES)
        # RMSNorm of the stored row, as LlamaRMSNorm computes it (see module doc).
        xs_a = stored_a.to(tl.float32)
        sum_sq = tl.sum(xs_a * xs_a, axis=1)
        if BLOCK_B > 0:
            xs_b = stored_b.to(tl.float32)
            sum_sq += tl.sum(xs_b * xs_b, axis=1)
        inv_rms = 1.0 / tl.sqrt(sum_sq / D + eps)
        _normed_chunk(n_ptr, stride_n, w_ptr, rows, offs_a, dmask_a, mask_a, stored_a, inv_rms)
        if BLOCK_B > 0:
            _normed_chunk(n_ptr, stride_n, w_ptr, rows, offs_b, dmask_b, mask_b, stored_b, inv_rms)


def steer_rmsnorm_triton(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *,
                         out=None, normed_out=None, monitor=None, monitor_post=True, residual=None,
                         tuning: LaunchTuning | None = None):
    T, D = hidden.shape
    b = launch_buffers("steer_rmsnorm", hidden, bank, term_vector, term_coef, term_mode, out, monitor)
    ndt = normed_dtype(hidden, norm_weight)
    if normed_out is None:
        normed_out = torch.empty((T, D), dtype=ndt, device=hidden.device)
    else:
        check_out(normed_out, hidden, "normed_out", ndt)
        if normed_out.stride(1) != 1 and D > 1:
            raise ValueError("normed_out needs unit stride along D")
    if T == 0:
        return b["out"], normed_out, b["proj"]
    ROWS, BLOCK_A, BLOCK_B, num_warps = launch_config(D, T, tuning)
    res = b["hidden"] if residual is None else row_ready(residual)
    _steer_rmsnorm_kernel[(triton.cdiv(T, ROWS),)](
        b["hidden"], b["hidden"].stride(0), b["out"], b["out"].stride(0), normed_out, normed_out.stride(0),
        norm_weight.contiguous(), float(eps), b["bank"], b["bank"].stride(0), b["bank"].shape[0],
        b["tv"], b["tc"], b["tm"], b["mon_arg"], b["mon_stride"], b["proj_arg"], T, D,
        # With a residual every row changes, so every row is written (in place too).
        NT=b["tv"].shape[1], M=b["M"], MONITOR_POST=bool(monitor_post),
        INPLACE=b["inplace"] and residual is None, ROWS=ROWS, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B,
        res_ptr=res, stride_r=res.stride(0), HAS_RES=residual is not None, num_warps=num_warps)
    return b["out"], normed_out, b["proj"]


def rmsnorm_triton(hidden, norm_weight, eps, *, tuning: LaunchTuning | None = None):
    """The steer_rmsnorm kernel with an empty term table, in place: no row is steered, so none is
    written back, and the pass is one read of h and one write of the normed rows."""
    h = row_ready(hidden)
    _, normed, _ = steer_rmsnorm_triton(h, h, *no_terms(h), norm_weight, eps, out=h, tuning=tuning)
    return normed


def add_rmsnorm_cpu(hidden, residual, norm_weight, eps):
    native = cpu_native.add_rmsnorm(hidden, residual, norm_weight, eps)
    if native is not None:
        return native
    summed = hidden + residual
    return summed, rmsnorm_cpu(summed, norm_weight, eps)


def add_rmsnorm_triton(hidden, residual, norm_weight, eps, *, tuning: LaunchTuning | None = None):
    """hidden + residual and its norm in one pass: reads both, writes the sum and the normed rows."""
    summed, normed, _ = steer_rmsnorm_triton(hidden, hidden, *no_terms(hidden), norm_weight, eps,
                                             residual=residual, tuning=tuning)
    return summed, normed
