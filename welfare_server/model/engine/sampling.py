"""Token choice on tensors: greedy, seeded sampling (temperature, top-k, top-p) and allowed-token
masks, per row, with no generator state: a row's choice depends only on its own logits, its
parameters, its seed and its step, never on the batch around it (batch invariance), and the
noise is computed on the device (it runs inside a CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding 32-bit values (products wrap; low bits exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counter-based Gumbel noise [B, V] from (seed, step, token id): no generator state, so a
    row's draws do not depend on the batch around it, and it runs inside a CUDA graph."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    key = _hash32((seed[:, None] & _M32) ^ _hash32((step[:, None] * 0x9E3779B1) & _M32))
    key = _hash32(key ^ ((seed[:, None] >> 32) & _M32))
    h = _hash32((idx * 0x27D4EB2F + key) & _M32)
    return -torch.log(-torch.log(hash_to_uniform(_hash32(h ^ key))))


def hash_to_uniform(h: torch.Tensor) -> torch.Tensor:
    """fp32 u strictly inside (0, 1) from 32-bit hash values (int64 tensors)."""
    # 23 bits: (k + 0.5) * 2^-23 is exact in fp32 for k < 2^23, so u lies in [2^-24, 1 - 2^-24] and
    # the noise is finite. (With 24 bits, k = 2^24 - 1 rounded u up to 1.0: +inf noise at one token
    # in 2^24, about one sampled step in 340 at SmolLM2's vocabulary, chose a random token.)
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingRows:
    """Per-row sampling parameters of one step, as tensors on the logits' device (built by the loop
    from its requests; flags that are the same for the whole batch let it skip work)."""

    temperature: torch.Tensor
    """fp32 [B]; 0 = greedy for that row."""
    top_k: torch.Tensor
    """int64 [B]; 0 = off."""
    top_p: torch.Tensor
    """fp32 [B]; 1 = off."""
    seed: torch.Tensor
    """int64 [B]."""
    step: torch.Tensor
    """int64 [B]: how many tokens the row has generated before this one."""
    allowed: torch.Tensor | None = None
    """bool [B, V]: tokens a row may choose (rows without a constraint are all True), or None."""
    all_greedy: bool = True
    any_filter: bool = False
    """Some row uses top-k or top-p."""
    want_logprobs: bool = False


@dataclass
class Choice:
    tokens: torch.Tensor
    """int64 [B]."""
    logprob: torch.Tensor | None
    """fp32 [B]: the chosen token's log-probability under the raw distribution (logits before
    temperature, top-k, top-p and the allowed-token mask); None unless asked for."""
    masked_logprob: torch.Tensor | None
    """fp32 [B]: the same under the allowed-token mask alone (softmax over the allowed tokens of the
    raw logits: the policy's own distribution in a masked action space); None without a mask."""


def choose(logits: torch.Tensor, rows: SamplingRows) -> Choice:
    """tokens [B] (and log-probs) from fp32 logits [B, V]."""
    B, V = logits.shape
    masked = logits if rows.allowed is None else logits.masked_fill(~rows.allowed, float("-inf"))
    if rows.all_greedy:
        tokens = masked.argmax(-1)
    else:
        greedy_row = rows.temperature == 0
        temp = torch.where(greedy_row, torch.ones_like(rows.temperature), rows.temperature)
        scaled = masked / temp[:, None]
        if rows.any_filter:
            srt, idx = scaled.sort(-1, descending=True)
            rank = torch.arange(V, device=logits.device)[None, :]
            k = torch.where(rows.top_k > 0, rows.top_k, torch.full_like(rows.top_k, V))
            srt = srt.masked_fill(rank >= k[:, None], float("-inf"))
            probs = srt.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > rows.top_p[:, None]  # keeps at least the top token
            srt = srt.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, idx, srt)
        sampled = (scaled + gumbel_noise(rows.seed, rows.step, V)).argmax(-1)
        tokens = torch.where(greedy_row, masked.argmax(-1), sampled)
    logprob = masked_logprob = None
    if rows.want_logprobs:
        logprob = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        if rows.allowed is not None:
            masked_logprob = masked.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return Choice(tokens, logprob, masked_logprob)
