"""The row machinery the steer kernels share (steer, steer_rmsnorm, rmsnorm, add_rmsnorm): how a
[T, D] batch is split into programs (LaunchTuning, launch_config), what a wrapper prepares before a
launch (launch_buffers), and the jitted one-pass body over a block of rows (steer_rows) that each
kernel calls and extends with its own epilogue.

A row of D elements is held as one or two register tiles: chunk A = [0, BLOCK_A) and, when D is not
a power of two, chunk B = [BLOCK_A, BLOCK_A + BLOCK_B) (BLOCK_B = 0: none). Tile sides must be
powers of two; one tile of next_pow2(D) would leave 44% of the lanes idle at D = 576 (SmolLM2), as
512 + 64 leaves none. Row sums add the two chunks' partial sums.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from welfare_server.kernels._checks import check_out, is_inplace

try:  # triton is optional on CPU-only installs; the references need only torch
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def term_beta(c, mode, xv, vv):
        """Per-row coefficient of v in y = x + beta v (same formulas as _ref_terms.apply_terms)."""
        pos = vv > 0
        vv_s = tl.where(pos, vv, 1.0)
        nv_s = tl.sqrt(vv_s)
        beta_abl = tl.where(pos, -xv / vv_s, 0.0)
        beta_clamp = tl.where(pos, (c - xv / nv_s) / nv_s, 0.0)
        return tl.where(mode <= 1, c, tl.where(mode == 2, beta_abl, beta_clamp))

    @triton.jit
    def renorm_scale(mode, xx, yy):
        """ADD_RENORM rows: (True, ||x|| / ||y||); other rows (and y = 0): (False, 1)."""
        ren = (mode == 1) & (yy > 0)
        return ren, tl.where(ren, tl.sqrt(xx) / tl.sqrt(tl.where(ren, yy, 1.0)), 1.0)

    @triton.jit
    def apply_terms_rows(xa, xb, offs_a, offs_b, dmask_a, dmask_b, rows, rmask, bank_ptr, stride_bk,
                          K, tv_ptr, tc_ptr, tm_ptr, NT: tl.constexpr, BLOCK_B: tl.constexpr):
        """Apply each row's NT terms to its fp32 accumulator, chunks xa [ROWS, BLOCK_A] and xb
        [ROWS, BLOCK_B] (xb unused when BLOCK_B = 0). Returns (xa, xb, any_active [ROWS])."""
        any_active = rows < 0  # all False, [ROWS]
        for j in tl.static_range(NT):
            idx = tl.load(tv_ptr + rows * NT + j, mask=rmask, other=-1).to(tl.int32)
            mode = tl.load(tm_ptr + rows * NT + j, mask=rmask, other=0).to(tl.int32)
            # Out-of-range indices / unknown modes are ignored, so an unchecked table never reads
            # outside the bank.
            active = (idx >= 0) & (idx < K) & (mode >= 0) & (mode <= 3)
            any_active = any_active | active
            c = tl.load(tc_ptr + rows * NT + j, mask=rmask & active, other=0.0)
            c = tl.where(active, c, 0.0)
            v_row = bank_ptr + tl.where(active, idx, 0).to(tl.int64)[:, None] * stride_bk
            va = tl.load(v_row + offs_a[None, :], mask=active[:, None] & dmask_a[None, :], other=0.0).to(tl.float32)
            xx = tl.sum(xa * xa, axis=1)
            xv = tl.sum(xa * va, axis=1)
            vv = tl.sum(va * va, axis=1)
            if BLOCK_B > 0:
                vb = tl.load(v_row + offs_b[None, :], mask=active[:, None] & dmask_b[None, :],
                             other=0.0).to(tl.float32)
                xx += tl.sum(xb * xb, axis=1)
                xv += tl.sum(xb * vb, axis=1)
                vv += tl.sum(vb * vb, axis=1)
            beta = term_beta(c, mode, xv, vv)
            ya = xa + beta[:, None] * va
            yy = tl.sum(ya * ya, axis=1)
            if BLOCK_B > 0:
                yb = xb + beta[:, None] * vb
                yy += tl.sum(yb * yb, axis=1)
            ren, s = renorm_scale(mode, xx, yy)
            xa = tl.where(active[:, None], tl.where(ren[:, None], ya * s[:, None], ya), xa)
            if BLOCK_B > 0:
                xb = tl.where(active[:, None], tl.where(ren[:, None], yb * s[:, None], yb), xb)
        return xa, xb, any_active

    @triton.jit
    def monitor_rows(xa, xb, offs_a, offs_b, dmask_a, dmask_b, rows, rmask, mon_ptr, stride_mm, proj_ptr,
                      M: tl.constexpr, BLOCK_B: tl.constexpr):
        # Each monitor vector is loaded once per program and shared by its ROWS rows.
        for j in tl.static_range(M):
            ma = tl.load(mon_ptr + j * stride_mm + offs_a, mask=dmask_a, other=0.0).to(tl.float32)
            p = tl.sum(xa * ma[None, :], axis=1)
            if BLOCK_B > 0:
                mb = tl.load(mon_ptr + j * stride_mm + offs_b, mask=dmask_b, other=0.0).to(tl.float32)
                p += tl.sum(xb * mb[None, :], axis=1)
            tl.store(proj_ptr + rows * M + j, p, mask=rmask)

    @triton.jit
    def store_chunk(out_ptr, stride_o, rows, offs, x, h, any_active, mask2, INPLACE: tl.constexpr):
        """Store one chunk of the rows; returns what was stored (hidden's dtype)."""
        # Untouched rows keep the loaded bits, not an fp32 round trip (keeps NaN payloads exact).
        stored = tl.where(any_active[:, None], x.to(h.dtype), h)
        optr = out_ptr + rows[:, None] * stride_o + offs[None, :]
        if INPLACE:
            # In place, untouched rows are not written at all (no bytes, no race).
            tl.store(optr, stored, mask=mask2 & any_active[:, None])
        else:
            tl.store(optr, stored, mask=mask2)
        return stored

    @triton.jit
    def load_rows(h_ptr, stride_h, res_ptr, stride_r, rows, offs, mask2, HAS_RES: tl.constexpr):
        """One chunk of the rows in hidden's dtype, plus the residual's when HAS_RES."""
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs[None, :], mask=mask2, other=0.0)
        if HAS_RES:
            # As torch adds half-precision tensors: in fp32, rounded once (the interpreter also
            # needs the explicit casts: it adds bf16 bit patterns otherwise).
            r = tl.load(res_ptr + rows[:, None] * stride_r + offs[None, :], mask=mask2, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        return h

    @triton.jit
    def steer_rows(h_ptr, stride_h, out_ptr, stride_o, bank_ptr, stride_bk, K, tv_ptr, tc_ptr,
                    tm_ptr, mon_ptr, stride_mm, proj_ptr, rows, T, D, NT: tl.constexpr,
                    M: tl.constexpr, MONITOR_POST: tl.constexpr, INPLACE: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, res_ptr, stride_r,
                    HAS_RES: tl.constexpr):
        """One pass over a block of rows: load (plus the residual row when HAS_RES, added in
        hidden's dtype as `hidden + residual` rounds), apply the terms in fp32, project onto the
        monitors, store. Returns, per chunk, the stored rows (hidden's dtype), their offsets and
        masks, for fused epilogues (steer_rmsnorm reads the stored row without loading it again)."""
        rmask = rows < T
        offs_a = tl.arange(0, BLOCK_A)
        dmask_a = offs_a < D
        mask_a = rmask[:, None] & dmask_a[None, :]
        ha = load_rows(h_ptr, stride_h, res_ptr, stride_r, rows, offs_a, mask_a, HAS_RES)
        xa0 = ha.to(tl.float32)
        if BLOCK_B > 0:
            offs_b = BLOCK_A + tl.arange(0, BLOCK_B)
            dmask_b = offs_b < D
            mask_b = rmask[:, None] & dmask_b[None, :]
            hb = load_rows(h_ptr, stride_h, res_ptr, stride_r, rows, offs_b, mask_b, HAS_RES)
            xb0 = hb.to(tl.float32)
        else:  # placeholders: nothing reads them when BLOCK_B = 0
            offs_b, dmask_b, mask_b, hb, xb0 = offs_a, dmask_a, mask_a, ha, xa0
        xa, xb, any_active = apply_terms_rows(xa0, xb0, offs_a, offs_b, dmask_a, dmask_b, rows, rmask,
                                               bank_ptr, stride_bk, K, tv_ptr, tc_ptr, tm_ptr, NT, BLOCK_B)
        if M > 0:
            if MONITOR_POST:
                monitor_rows(xa, xb, offs_a, offs_b, dmask_a, dmask_b, rows, rmask, mon_ptr, stride_mm,
                              proj_ptr, M, BLOCK_B)
            else:
                monitor_rows(xa0, xb0, offs_a, offs_b, dmask_a, dmask_b, rows, rmask, mon_ptr, stride_mm,
                              proj_ptr, M, BLOCK_B)
        stored_a = store_chunk(out_ptr, stride_o, rows, offs_a, xa, ha, any_active, mask_a, INPLACE)
        stored_b = stored_a
        if BLOCK_B > 0:
            stored_b = store_chunk(out_ptr, stride_o, rows, offs_b, xb, hb, any_active, mask_b, INPLACE)
        return stored_a, stored_b, offs_a, offs_b, mask_a, mask_b, dmask_a, dmask_b

@dataclass(frozen=True)
class LaunchTuning:
    """How the register-resident steer kernels split a [T, D] batch into programs. The defaults are
    reasoned, not yet measured on a GPU: bench/bench_steer.py --sweep times alternatives."""

    elements_per_program: int = 4096
    """Target ROWS * (row width in registers) of one program (never below one row). Small D packs
    several rows per program so a program has enough bytes in flight and bank/monitor/weight loads
    are shared."""
    elements_per_thread: int = 16
    """Target fp32 elements of each row-sized tensor (x, v, y) per thread; sets num_warps. More
    means fewer warps and more registers per thread (at 32 the rows spill: scripts/triton_aot.py)."""
    max_warps: int = 16
    """Upper bound on num_warps (512 threads: 128 registers each fit one program per SM)."""


DEFAULT_TUNING = LaunchTuning()
# Under TRITON_INTERPRET=1 each program costs ~15 ms of Python: programs take as many rows as fit
# 64K elements, so the tests finish in seconds instead of minutes.
INTERPRETER_TUNING = LaunchTuning(elements_per_program=65536)


def prev_power_of_2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def row_blocks(D: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): the register tiles a row of D elements is held in (BLOCK_B = 0: one
    tile). Two tiles when D is not a power of two and they are narrower than next_pow2(D)."""
    full = max(16, triton.next_power_of_2(D))
    a = prev_power_of_2(D)
    if D <= 16 or a == D:
        return full, 0
    b = max(16, triton.next_power_of_2(D - a))
    return (a, b) if a + b < full else (full, 0)


def launch_config(D: int, T: int, tuning: LaunchTuning | None = None):
    """(ROWS, BLOCK_A, BLOCK_B, num_warps). The whole row lives in registers (row_blocks), so h is
    read once and written once; ROWS <= 64 rows share a program when D is small."""
    if tuning is None:
        tuning = INTERPRETER_TUNING if os.environ.get("TRITON_INTERPRET") == "1" else DEFAULT_TUNING
    BLOCK_A, BLOCK_B = row_blocks(D)
    width = BLOCK_A + BLOCK_B
    ROWS = prev_power_of_2(max(1, min(tuning.elements_per_program // width, 64, triton.next_power_of_2(max(T, 1)))))
    threads = ROWS * width // tuning.elements_per_thread
    num_warps = prev_power_of_2(max(1, min(tuning.max_warps, threads // 32)))
    return ROWS, BLOCK_A, BLOCK_B, num_warps


def row_ready(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit stride along D."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def launch_buffers(op, hidden, bank, term_vector, term_coef, term_mode, out, monitor):
    """What both Triton wrappers prepare before a launch: hidden with unit stride along D, the out
    buffer (checked, or allocated), contiguous tables, the projections buffer, and placeholders the
    kernel never reads when there are no monitors. Returns a dict of them."""
    T, D = hidden.shape
    inplace = is_inplace(out, hidden)
    if hidden.stride(1) != 1 and D > 1:
        if inplace:
            raise ValueError(f"in-place {op} needs hidden with unit stride along D")
        hidden = hidden.contiguous()
    if out is None:
        out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    elif not inplace:
        check_out(out, hidden)
        if out.stride(1) != 1 and D > 1:
            raise ValueError("out needs unit stride along D")
    tc = term_coef.contiguous()
    mon = row_ready(monitor) if monitor is not None else None
    proj = torch.empty((T, mon.shape[0]), dtype=torch.float32, device=hidden.device) if mon is not None else None
    return dict(hidden=hidden, out=out, inplace=inplace, bank=row_ready(bank), tv=term_vector.contiguous(),
                tc=tc, tm=term_mode.contiguous(), proj=proj, M=0 if mon is None else mon.shape[0],
                mon_arg=mon if mon is not None else hidden, mon_stride=mon.stride(0) if mon is not None else 0,
                proj_arg=proj if proj is not None else tc)


def no_terms(hidden):
    """Empty [T, 0] term tables (vector, coef, mode): the kernel applies no term and reads no bank row."""
    index = torch.empty((hidden.shape[0], 0), dtype=torch.int32, device=hidden.device)
    return index, index.float(), index
