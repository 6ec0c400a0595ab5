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


def apply_terms(x: torch.Tensor, bank: torch.Tensor, term_vector, term_coef,
                term_mode) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [T, D] accumulator (not modified). Returns (the steered fp32 accumulator, [T] bool:
    the row has an active term, i.e. its store must change it)."""
    K = bank.shape[0]
    act_all = term_active(term_vector, term_mode, K)
    if K == 0 or term_vector.shape[1] == 0:
        return x, act_all.any(1)
    on_host = x.device.type == "cpu"
    if on_host:
        # On CPU this reference IS the engine's steering path, and host decisions cost nothing:
        # skip term columns no row uses, and use the plain add where every active term of a
        # column is ADD (the common case). Both give the same bits as the general recurrence;
        # they cut a 1-row, 1-term call from ~270 us to ~20 us (dev box, 2 threads). On CUDA they
        # would cost a host sync per call, so the general form runs there.
        used = act_all.any(dim=0).tolist()
        add_only = (~((term_mode != ADD) & act_all).any(dim=0)).tolist()
    for j in range(term_vector.shape[1]):
        if on_host and not used[j]:
            continue
        active = act_all[:, j]
        # Gather the rows' vectors before converting: converting the whole bank copies [K, D].
        v = bank[term_vector[:, j].long().clamp(0, K - 1)].float() * active[:, None]
        c = torch.where(active, term_coef[:, j], torch.zeros_like(term_coef[:, j]))
        if on_host and add_only[j]:
            x = torch.where(active[:, None], x + c[:, None] * v, x)
            continue
        mode = term_mode[:, j]
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
    return x, act_all.any(1)
