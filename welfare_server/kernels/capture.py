"""capture: streaming per-class sums/counts of residual rows, plus per-row projections.

sums [C, D] fp32 += sum of rows with label c; counts [C] int64 += number of such rows; rows with
label -1 are skipped. Difference-of-means vectors are then sums/counts, computed without keeping
any activation. Optionally returns per-row projections [T, P] = <h_t, p_j> in fp32 (every row,
including skipped ones).

Reference: capture_reference. Kernel: capture_triton: one program per tile of BLOCK_T rows, D in
BLOCK_D chunks; per chunk each present class gets one fp32 atomic add of its partial sum, so the
atomics are T/BLOCK_T * C * D, not T * D. Atomics make the fp32 summation order
non-deterministic (differences at fp32 rounding level); tests compare against a float64 sum.
"""
from __future__ import annotations

import os

import torch

from welfare_server.kernels.rows import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def capture_reference(hidden, labels, sums, counts, *, proj_vectors=None):
    C = sums.shape[0]
    x = hidden.float()
    valid = (labels >= 0) & (labels < C)
    if C > 0 and hidden.shape[0] > 0:
        lab = labels.long().clamp(0, C - 1)
        # Skipped rows add an exact 0 row (no host sync for a boolean gather).
        sums.index_add_(0, lab, torch.where(valid[:, None], x, torch.zeros_like(x)))
        counts.index_add_(0, lab, valid.long())
    if proj_vectors is None:
        return None
    return x @ proj_vectors.float().t()


# Up to this many classes a tile loops over classes (unrolled: C is a compile-time constant, and
# extraction uses a handful of class counts) and issues one atomic per present class per chunk;
# above it, one atomic per row (the class loop would cost C compare-reduces per tile).
CLASS_LOOP_MAX_C = 32

if HAS_TRITON:

    @triton.jit
    def _capture_kernel(h_ptr, stride_h, lab_ptr, sums_ptr, counts_ptr, C, T, D,
                        pv_ptr, stride_p, proj_ptr,
                        P: tl.constexpr, P_PAD: tl.constexpr, CLASS_LOOP: tl.constexpr,
                        NC: tl.constexpr, N_CHUNKS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        lab = tl.load(lab_ptr + rows, mask=rmask, other=-1).to(tl.int32)
        lab = tl.where((lab >= 0) & (lab < C), lab, -1)
        if CLASS_LOOP:
            for c in tl.static_range(NC):
                n = tl.sum((lab == c).to(tl.int64), axis=0)
                if n > 0:
                    tl.atomic_add(counts_ptr + c, n)
        else:
            tl.atomic_add(counts_ptr + tl.where(lab >= 0, lab, 0), tl.full([BLOCK_T], 1, tl.int64),
                          mask=lab >= 0)
        pcols = tl.arange(0, P_PAD)
        acc = tl.zeros([BLOCK_T, P_PAD], dtype=tl.float32)
        # Constant trip count (N_CHUNKS = cdiv(D, BLOCK_D), fixed per model): the Triton 3.6
        # interpreter cannot run range() over a runtime scalar with numpy >= 2.4 (int() of a
        # 1-element array), and D is fixed per model so the extra specialization costs nothing.
        for i in range(N_CHUNKS):
            offs = i * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = offs < D
            x = tl.load(h_ptr + rows64[:, None] * stride_h + offs[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            if CLASS_LOOP:
                for c in tl.static_range(NC):
                    sel = lab == c
                    if tl.sum(sel.to(tl.int32), axis=0) > 0:
                        part = tl.sum(tl.where(sel[:, None], x, 0.0), axis=0)
                        tl.atomic_add(sums_ptr + c * D + offs, part, mask=dmask)
            else:
                safe = tl.where(lab >= 0, lab, 0).to(tl.int64)
                tl.atomic_add(sums_ptr + safe[:, None] * D + offs[None, :], x,
                              mask=(lab >= 0)[:, None] & dmask[None, :])
            for p in tl.static_range(P):
                pv = tl.load(pv_ptr + p * stride_p + offs, mask=dmask, other=0.0).to(tl.float32)
                part = tl.sum(x * pv[None, :], axis=1)
                acc += tl.where(pcols[None, :] == p, part[:, None], 0.0)
        if P > 0:
            tl.store(proj_ptr + rows64[:, None] * P + pcols[None, :], acc,
                     mask=rmask[:, None] & (pcols[None, :] < P))


def capture_triton(hidden, labels, sums, counts, *, proj_vectors=None):
    T, D = hidden.shape
    C = sums.shape[0]
    if hidden.stride(1) != 1 and D > 1:
        hidden = hidden.contiguous()
    if not sums.is_contiguous():
        raise ValueError("sums must be contiguous (accumulated in place by the kernel)")
    if not counts.is_contiguous():
        raise ValueError("counts must be contiguous (accumulated in place by the kernel)")
    labels = labels.contiguous()
    P = 0 if proj_vectors is None else proj_vectors.shape[0]
    proj = None
    if proj_vectors is not None:
        proj_vectors = proj_vectors.contiguous()
        proj = torch.empty((T, P), dtype=torch.float32, device=hidden.device)
    if T == 0 or (C == 0 and P == 0):
        return proj
    # 64x64 fp32 tile = 32 registers/thread at 4 warps, coalesced 256 B row segments.
    # Under TRITON_INTERPRET=1 the D loop is Python, so take wide chunks there.
    BLOCK_T, BLOCK_D = 64, 64
    if os.environ.get("TRITON_INTERPRET") == "1":
        BLOCK_D = min(1024, max(64, triton.next_power_of_2(D)))
    grid = (triton.cdiv(T, BLOCK_T),)
    _capture_kernel[grid](
        hidden, hidden.stride(0), labels, sums, counts, C, T, D,
        proj_vectors if proj_vectors is not None else hidden,
        proj_vectors.stride(0) if proj_vectors is not None else 0,
        proj if proj is not None else sums,
        P=P, P_PAD=max(2, triton.next_power_of_2(max(P, 1))), CLASS_LOOP=C <= CLASS_LOOP_MAX_C,
        NC=C if C <= CLASS_LOOP_MAX_C else 0, N_CHUNKS=triton.cdiv(D, BLOCK_D),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4)
    return proj
