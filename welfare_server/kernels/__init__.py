"""Steering / extraction kernels: the ONE place that decides torch reference vs Triton.

CUDA tensors run the Triton kernels, CPU tensors the torch references (use_triton=None).
use_triton=True forces Triton (tests do this on CPU tensors under TRITON_INTERPRET=1);
use_triton=False forces the reference on any device.

Value checks (term indices, modes, finite coefficients, labels) cost one host sync on CUDA; pass
check_values=False on a hot path whose tables were validated once with validate_terms (see
_checks.py). They are skipped automatically during CUDA-graph capture.
"""
from __future__ import annotations

import os

import torch

from welfare_server.kernels import _checks
from welfare_server.kernels._checks import validate_terms
from welfare_server.kernels.capture import capture_reference, capture_triton
from welfare_server.kernels.modes import MAX_MONITORS, MAX_PROJ, MAX_TERMS, MAX_TRITON_D, SteerMode
from welfare_server.kernels.rows import HAS_TRITON
from welfare_server.kernels.steer import steer_reference, steer_triton
from welfare_server.kernels.steer_rmsnorm import (add_rmsnorm_cpu, add_rmsnorm_triton, rmsnorm_cpu,
                                                  rmsnorm_reference, rmsnorm_triton, steer_rmsnorm_cpu,
                                                  steer_rmsnorm_reference, steer_rmsnorm_triton)

__all__ = ["SteerMode", "MAX_TERMS", "MAX_MONITORS", "MAX_PROJ", "MAX_TRITON_D", "steer",
           "steer_rmsnorm", "rmsnorm", "add_rmsnorm", "capture", "validate_terms", "steer_reference",
           "steer_rmsnorm_reference", "capture_reference", "rmsnorm_reference", "HAS_TRITON"]


def _use_triton(use_triton, hidden: torch.Tensor, steer_kernel: bool) -> bool:
    if use_triton is None:
        use = hidden.is_cuda and HAS_TRITON
        # Rows wider than the register-resident kernel: the reference, not a multi-pass kernel.
        return use and not (steer_kernel and hidden.shape[1] > MAX_TRITON_D)
    if use_triton:
        if not HAS_TRITON:
            raise RuntimeError("use_triton=True but triton is not installed")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("use_triton=True on CPU tensors needs TRITON_INTERPRET=1")
        if steer_kernel and hidden.shape[1] > MAX_TRITON_D:
            raise ValueError(f"Triton steer kernels support D <= MAX_TRITON_D={MAX_TRITON_D}, "
                             f"got D={hidden.shape[1]}")
    return bool(use_triton)


def steer(hidden, bank, term_vector, term_coef, term_mode, *, out=None, monitor=None,
          monitor_post=True, use_triton=None, check_values=None):
    """hidden [T,D] fp32/bf16/fp16; bank [K,D] (hidden's dtype or fp32); term_vector int32 [T,NT]
    (NT <= MAX_TERMS, -1 = no term); term_coef fp32 [T,NT]; term_mode int32 [T,NT] (SteerMode).
    out: None -> new tensor; out is hidden -> in place; else a [T,D] tensor of hidden's dtype.
    monitor: optional [M,D] (M <= MAX_MONITORS); projections fp32 [T,M] = <x, m_j> with x the
    pre-steering row or (monitor_post) the post-steering fp32 accumulator.
    Returns (out, projections or None)."""
    _checks.check_terms(hidden, bank, term_vector, term_coef, term_mode, check_values)
    _checks.check_monitor(monitor, hidden)
    if out is not None and not _checks.is_inplace(out, hidden):
        _checks.check_out(out, hidden)
    fn = steer_triton if _use_triton(use_triton, hidden, True) else steer_reference
    return fn(hidden, bank, term_vector, term_coef, term_mode, out=out, monitor=monitor,
              monitor_post=monitor_post)


def steer_rmsnorm(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, *, out=None,
                  normed_out=None, monitor=None, monitor_post=True, residual=None, use_triton=None,
                  check_values=None):
    """steer(), then normed = LlamaRMSNorm(steered) * norm_weight in the same pass.
    residual: optional [T,D] of hidden's dtype added first (`hidden + residual`, the decoder's
    residual add folded into the same pass); then every row is written, steered or not.
    Returns (steered [T,D], normed [T,D] of promote(hidden.dtype, norm_weight.dtype), projections or None)."""
    _checks.check_terms(hidden, bank, term_vector, term_coef, term_mode, check_values)
    _checks.check_monitor(monitor, hidden)
    _checks.check_norm(hidden, norm_weight, eps)
    _checks.check_residual(residual, hidden)
    if out is not None and not _checks.is_inplace(out, hidden):
        _checks.check_out(out, hidden)
    if normed_out is not None:
        _checks.check_out(normed_out, hidden, "normed_out", torch.promote_types(hidden.dtype, norm_weight.dtype))
    fn = steer_rmsnorm_triton if _use_triton(use_triton, hidden, True) else steer_rmsnorm_cpu
    return fn(hidden, bank, term_vector, term_coef, term_mode, norm_weight, eps, out=out,
              normed_out=normed_out, monitor=monitor, monitor_post=monitor_post, residual=residual)


def rmsnorm(hidden, norm_weight, eps, *, use_triton=None):
    """LlamaRMSNorm of hidden [T, D]: norm_weight * (h.float() * rsqrt(mean(h^2) + eps)).to(h.dtype),
    in promote(hidden.dtype, norm_weight.dtype). On CUDA one Triton pass (the steer_rmsnorm kernel
    with no terms: it reads each row once and writes only the normed row), where eager PyTorch
    takes about seven launches in half precision."""
    _checks.check_hidden(hidden)
    _checks.check_norm(hidden, norm_weight, eps)
    fn = rmsnorm_triton if _use_triton(use_triton, hidden, True) else rmsnorm_cpu
    return fn(hidden, norm_weight, eps)


def add_rmsnorm(hidden, residual, norm_weight, eps, *, use_triton=None):
    """(hidden + residual, rmsnorm of it): the decoder's residual add and the next norm in one
    pass on CUDA (reads both rows once, writes the sum and the normed row)."""
    _checks.check_hidden(hidden)
    _checks.check_norm(hidden, norm_weight, eps)
    _checks.check_residual(residual, hidden)
    fn = add_rmsnorm_triton if _use_triton(use_triton, hidden, True) else add_rmsnorm_cpu
    return fn(hidden, residual, norm_weight, eps)


def capture(hidden, labels, sums, counts, *, proj_vectors=None, use_triton=None, check_values=None):
    """labels int32/int64 [T] in [-1, C); sums fp32 [C,D] and counts int64 [C] accumulated IN
    PLACE; returns projections fp32 [T,P] = <h_t, p_j> (P <= MAX_PROJ) or None."""
    _checks.check_capture(hidden, labels, sums, counts, proj_vectors, check_values)
    fn = capture_triton if _use_triton(use_triton, hidden, False) else capture_reference
    return fn(hidden, labels, sums, counts, proj_vectors=proj_vectors)
