"""Steering modes and the named limits shared by every kernel and its torch reference."""
from __future__ import annotations

import enum


class SteerMode(enum.IntEnum):
    """What one term does to a row's fp32 accumulator x, with vector v and coefficient c."""

    ADD = 0         # x += c v
    ADD_RENORM = 1  # n0 = ||x||; x += c v; x *= n0 / ||x||   (||x|| == 0 -> x left as is)
    ABLATE = 2      # x -= (<x,v>/<v,v>) v                      (c ignored; v == 0 -> no-op)
    CLAMP = 3       # x += (c - <x,v>/||v||) v/||v||            (component along v/||v|| becomes c)



# Terms per row. A compile-time constant of the kernels (tl.constexpr): a term table narrower than
# this compiles a narrower kernel, so decode batches with 1 term pay for 1, not 4.
MAX_TERMS = 4
# Monitor vectors per call (fused per-row projections). Also a constexpr of the kernels.
MAX_MONITORS = 8
# Projection vectors per capture call.
MAX_PROJ = 8
# Largest D the Triton steer kernels hold in registers (one row = one program, loaded once).
# 16384 covers every dense decoder we target (Llama-405B has D = 16384); larger D falls back to
# the torch reference at the dispatch point rather than silently taking several passes.
MAX_TRITON_D = 16384
