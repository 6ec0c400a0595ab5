"""Attention over the engine's KV cache: causal / sliding-window masks and grouped-query attention
without repeating K/V. Shared by prefill, eager decode and the static (graph) decode step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, mask, scale: float, softcap: float | None):
    """scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), or, for soft-capped
    scores (Gemma2), HF's eager order: (q k^T * scale) -> cap * tanh(. / cap) -> + mask -> softmax
    in fp32 -> p v. mask: additive float or boolean (True = attend), broadcastable to the scores."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def attends(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [*query_pos.shape, ctx]: causal (key position <= query position) and, with a sliding
    window, key position > query position - window."""
    q = query_pos[..., None]
    m = key_pos <= q
    return m if window is None else m & (key_pos > q - window)


def additive_mask(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attended, -inf elsewhere (what SDPA turns a bool mask into; made once per step,
    since a bool mask costs SDPA a where() per layer)."""
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))


def slot_rows(slot_list, slots: torch.Tensor):
    """Index of the cache rows of these slots: a slice (a view, no copy) when they are consecutive."""
    s0 = slot_list[0]
    return slice(s0, s0 + len(slot_list)) if list(slot_list) == list(range(s0, s0 + len(slot_list))) else slots


def gqa_attention(lay, q, K, V, mask, A: int, T: int):
    """Attention of q [A*T, H, hd] over cached K/V [A, n_kv, ctx, hd] without repeating K/V: the
    g query heads of a kv head become g query rows per token (mask rows follow that layout).
    Returns [A*T, H*hd]."""
    g, hd = lay.n_heads // lay.n_kv, lay.head_dim
    if T == 1:  # decode: the same layout as plain views (no transposes on the per-token path)
        return attention(q.view(A, lay.n_kv, g, hd), K, V, mask, lay.scaling, lay.softcap).reshape(A, -1)
    qg = q.view(A, T, lay.n_kv, g, hd).transpose(1, 2).reshape(A, lay.n_kv, T * g, hd)
    o = attention(qg, K, V, mask, lay.scaling, lay.softcap)
    return o.view(A, lay.n_kv, T, g, hd).transpose(1, 2).reshape(A * T, lay.n_heads * hd)
