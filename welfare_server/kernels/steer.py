"""steer: apply per-row steering terms to the residual stream in one pass.

hidden [T, D]; bank [K, D]; per row up to NT <= MAX_TERMS terms (vector index, coef, mode),
applied in order to an fp32 accumulator, then stored once in hidden's dtype. Optional fused
projections onto up to MAX_MONITORS monitor vectors (pre- or post-steering). Rows with no active
term are not written when in place and copied bit-for-bit when out of place.

Reference: steer_reference (torch, the CPU path and the test oracle).
Kernel: steer_triton (one program per row, or per few rows for small D; each row, each term
vector and each monitor vector are loaded once into registers, so the only traffic is one read and
at most one write of the row). A row is held in one power-of-two register tile, or in two when D is
not a power of two (576 = 512 + 64), so no lanes idle on padding (row_blocks).
"""
from __future__ import annotations

import torch

from welfare_server.kernels._checks import check_out, is_inplace
from welfare_server.kernels._ref_terms import apply_terms
from welfare_server.kernels.rows import HAS_TRITON, LaunchTuning, launch_buffers, launch_config

if HAS_TRITON:
    import triton
    import triton.language as tl

    from welfare_server.kernels.rows import steer_rows


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------
def _store_rows(steered_f: torch.Tensor, hidden: torch.Tensor, row_active: torch.Tensor, out):
    """Write the steered rows; inactive rows keep hidden's exact bits (torch.where selects, it
    does not round-trip). In place, the reference rewrites inactive rows with their own bits
    (indistinguishable; only the Triton kernel literally skips the store)."""
    res = torch.where(row_active[:, None], steered_f.to(hidden.dtype), hidden)
    if out is None:
        return res
    out.copy_(res)
    return out


def steer_reference(hidden, bank, term_vector, term_coef, term_mode, *, out=None, monitor=None,
                    monitor_post=True):
    x0 = hidden.float()
    x, row_active = apply_terms(x0, bank, term_vector, term_coef, term_mode)
    proj = None
    if monitor is not None:
        # Post-steering projections read the fp32 accumulator (before rounding to hidden's dtype).
        proj = (x if monitor_post else x0) @ monitor.float().t()
    if out is not None and not is_inplace(out, hidden):
        check_out(out, hidden)
    return _store_rows(x, hidden, row_active, out), proj


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _steer_kernel(h_ptr, stride_h, out_ptr, stride_o, bank_ptr, stride_bk, K,
                      tv_ptr, tc_ptr, tm_ptr, mon_ptr, stride_mm, proj_ptr, T, D,
                      NT: tl.constexpr, M: tl.constexpr, MONITOR_POST: tl.constexpr,
                      INPLACE: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        steer_rows(h_ptr, stride_h, out_ptr, stride_o, bank_ptr, stride_bk, K, tv_ptr, tc_ptr,
                    tm_ptr, mon_ptr, stride_mm, proj_ptr, rows, T, D, NT, M, MONITOR_POST, INPLACE,
                    BLOCK_A, BLOCK_B, h_ptr, 0, False)


def steer_triton(hidden, bank, term_vector, term_coef, term_mode, *, out=None, monitor=None,
                 monitor_post=True, tuning: LaunchTuning | None = None):
    T, D = hidden.shape
    b = launch_buffers("steer", hidden, bank, term_vector, term_coef, term_mode, out, monitor)
    if T == 0:
        return b["out"], b["proj"]
    ROWS, BLOCK_A, BLOCK_B, num_warps = launch_config(D, T, tuning)
    _steer_kernel[(triton.cdiv(T, ROWS),)](
        b["hidden"], b["hidden"].stride(0), b["out"], b["out"].stride(0), b["bank"], b["bank"].stride(0),
        b["bank"].shape[0], b["tv"], b["tc"], b["tm"], b["mon_arg"], b["mon_stride"], b["proj_arg"], T, D,
        NT=b["tv"].shape[1], M=b["M"], MONITOR_POST=bool(monitor_post), INPLACE=b["inplace"],
        ROWS=ROWS, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, num_warps=num_warps)
    return b["out"], b["proj"]
