"""The term recurrence in torch, shared by the steer and steer+RMSNorm references.

Every mode is written as x <- s * (x + beta * v), with the scalars computed from <x,x>, <x,v>,
<v,v> exactly as the Triton kernels compute them (same formulas, same order of scalar ops), so
the reference and the kernel differ only in the order of the D-long reductions.
"""
from __future__ import annotations

import torch

from welfare_server.kernels.modes import SteerMode

ADD, ADD_RENORM, ABLATE, CLAMP = (int(m) for m in SteerMode)


def term_active(term_vector: torch.Tensor, term_mode: torch.Tensor, K: int) -> torch.Tensor:
    """[T, NT] bool: the term does something. Out-of-range indices / unknown modes (possible only
    when value checks were skipped) are ignored, as in the kernels."""
    return (term_vector >= 0) & (term_vector < K) & (term_mode >= 0) & (term_mode <= CLAMP)


def apply_terms(x: torch.Tensor, bank: torch.Tensor, term_vector, term_coef, term_mode) -> torch.Tensor:
    """x: fp32 [T, D] accumulator (not modified); returns the steered fp32 accumulator."""
    K = bank.shape[0]
    if K == 0 or term_vector.shape[1] == 0:
        return x
    bank_f = bank.float()
    act_all = term_active(term_vector, term_mode, K)
    for j in range(term_vector.shape[1]):
        active = act_all[:, j]
        mode = term_mode[:, j]
        v = bank_f[term_vector[:, j].long().clamp(0, K - 1)] * active[:, None]
        c = torch.where(active, term_coef[:, j], torch.zeros_like(term_coef[:, j]))
        xx = (x * x).sum(-1)
        xv = (x * v).sum(-1)
        vv = (v * v).sum(-1)
        pos = vv > 0
        vv_s = torch.where(pos, vv, torch.ones_like(vv))
        nv_s = vv_s.sqrt()
        beta_abl = torch.where(pos, -xv / vv_s, torch.zeros_like(vv))
        beta_clamp = torch.where(pos, (c - xv / nv_s) / nv_s, torch.zeros_like(vv))
        beta = torch.where(mode <= ADD_RENORM, c, torch.where(mode == ABLATE, beta_abl, beta_clamp))
        y = x + beta[:, None] * v
        yy = (y * y).sum(-1)
        ren = (mode == ADD_RENORM) & (yy > 0)
        s = torch.where(ren, xx.sqrt() / torch.where(ren, yy, torch.ones_like(yy)).sqrt(), torch.ones_like(yy))
        y = torch.where(ren[:, None], y * s[:, None], y)
        x = torch.where(active[:, None], y, x)
    return x
