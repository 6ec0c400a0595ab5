"""The RL and SFT objectives on the maze's move distribution, on tensors only.

The policy at one turn is the distribution over the valid moves: the softmax of the model's logits
of the four direction tokens at the answer position, invalid directions masked out (what the
rollout's masked log-probs are). Every function here takes

    logp   float [..., 4]  log-probabilities of the four moves (-inf where invalid)
    valid  bool  [..., 4]  which moves are valid at that turn

and works per turn; the caller sums per-turn terms and divides by the loss's constant
(token_normaliser: Dr. GRPO's "sum over tokens, divided by a constant").

Advantages:
  * Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = R_i - mean_group(R),
    no division by the group's standard deviation (that division overweights groups whose returns
    barely differ), one advantage for every move of the episode.
  * GRPO (Shao et al. 2024): A_i = (R_i - mean_group(R)) / (std_group(R) + eps), the unbiased
    standard deviation (torch.std, as TRL computes it).
  * token-level REINFORCE: every move gets its own advantage: its return-to-go
    G_t = sum_{k >= t} gamma^(k-t) r_k minus the mean of G_t over the group at the same turn t
    (a per-position group baseline).

Objective per move: the dual-clip PPO surrogate (Ye et al. 2020) with ratio
rho = pi(a) / pi_old(a): for A >= 0 min(rho A, clip(rho, 1-eps, 1+eps) A); for A < 0 additionally
bounded below by c A (c > 1), so a move whose probability grew far beyond the old policy's under a
negative advantage cannot produce an unbounded loss.
"""

from __future__ import annotations

import math

import torch

GRPO_STD_EPS = 1e-6
"""Added to the group's standard deviation (GRPO): a group whose returns are all equal has zero
advantages instead of 0/0."""


# ---------------------------------------------------------------------------------- advantages
def group_advantages(returns: torch.Tensor, *, normalise_std: bool) -> torch.Tensor:
    """returns float [B, G] (B groups of G episodes on one maze) -> advantages [B, G].
    normalise_std False: Dr. GRPO (R - mean); True: GRPO ((R - mean) / (std + eps))."""
    if returns.dim() != 2:
        raise ValueError(f"returns must be [groups, group_size], got shape {list(returns.shape)}")
    centred = returns - returns.mean(dim=1, keepdim=True)
    if not normalise_std:
        return centred
    if returns.shape[1] < 2:
        raise ValueError("GRPO's standard deviation needs groups of at least 2 episodes")
    return centred / (returns.std(dim=1, keepdim=True) + GRPO_STD_EPS)


def returns_to_go(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """rewards float [..., T] -> G float [..., T], G_t = sum_{k >= t} gamma^(k-t) r_k."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def reinforce_advantages(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """rewards float [B, G, T] -> advantages [B, G, T]: return-to-go minus its mean over the group
    at the same turn (token-level REINFORCE with a per-position group baseline)."""
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [groups, group_size, turns], got shape {list(rewards.shape)}")
    rtg = returns_to_go(rewards, gamma)
    return rtg - rtg.mean(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------- the policy
def masked_log_softmax(move_logits: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits of the four direction tokens [..., 4] -> log-probabilities over the valid moves
    (-inf on invalid ones), computed in fp32 whatever the model's dtype."""
    logits = move_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)


def _probs(logp: torch.Tensor) -> torch.Tensor:
    return logp.exp()  # exp(-inf) = 0 on invalid moves


def _plogp(logp: torch.Tensor) -> torch.Tensor:
    """p log p, 0 where p = 0 (invalid moves): no NaN from 0 * -inf, in value or gradient."""
    finite = torch.isfinite(logp)
    safe = torch.where(finite, logp, torch.zeros_like(logp))
    return torch.where(finite, safe.exp() * safe, torch.zeros_like(logp))


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of the move distribution [..., 4] -> [...] (nats)."""
    return -_plogp(logp).sum(dim=-1)


def equalised_entropy(logp: torch.Tensor, valid: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """The equalised entropy bonus [..., 4] -> [...].

    Reading (the paper gives the name and its purpose, not the formula): the valid moves are
    grouped by the tile type they lead to (neighbours: tile code per direction, Path 0 / Mold 1 /
    Gold 2); the bonus is sum over groups g of sg(pi(g)) * H(pi(. | g)), the entropy of the move
    distribution restricted to g (renormalised within g), weighted by the group's probability
    with its gradient stopped. Its value is the conditional entropy H(move | tile type) of the
    current policy. It depends on the logit differences within each group only: shifting one tile
    type's logits together leaves it unchanged, so its gradient sums to zero over every group and
    has no component that raises or lowers a tile type as a whole. It spreads probability evenly
    among moves that lead to the same kind of tile (it undoes a bias such as always preferring
    North among equivalent moves) and does not reward putting mass on a tile type, which the plain
    entropy bonus does (whichever type has more moves). A finite step along the gradient still
    moves pi(g) a little at first order when the group's moves have unequal probabilities (the
    step is zero-sum in logits, not in probability). A group of one move contributes 0.
    """
    out = torch.zeros(logp.shape[:-1], dtype=logp.dtype, device=logp.device)
    for tile in range(3):
        member = valid & (neighbours == tile)
        present = member.any(dim=-1, keepdim=True)
        if not bool(present.any()):
            continue
        # Rows without a move of this type get a finite stand-in (all zeros) and weight 0: a
        # logsumexp over only -inf would put NaN into the backward pass.
        group_logp = torch.where(present, logp.masked_fill(~member, float("-inf")), torch.zeros_like(logp))
        log_mass = torch.logsumexp(group_logp, dim=-1, keepdim=True)
        h = entropy(group_logp - log_mass)
        weight = torch.where(present.squeeze(-1), log_mass.squeeze(-1).exp(), torch.zeros_like(h)).detach()
        out = out + weight * h
    return out


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of the move distribution [..., 4] -> [...], exact over the (at most four)
    valid moves rather than a sampled estimator: the whole distribution is at hand."""
    finite = torch.isfinite(logp)
    diff = torch.where(finite, logp - torch.where(finite, ref_logp, torch.zeros_like(ref_logp)),
                       torch.zeros_like(logp))
    return (_probs(logp) * diff).sum(dim=-1)


# ---------------------------------------------------------------------------------- objectives
def dual_clip_ppo(logp_taken: torch.Tensor, old_logp_taken: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float, dual_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-move loss (to minimise) of the dual-clip PPO surrogate, and a float mask of the moves
    whose ratio was clipped (a metric). All arguments share one shape."""
    ratio = torch.exp(logp_taken - old_logp_taken)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    clipped = torch.minimum(surr1, surr2)
    objective = torch.where(advantages < 0, torch.maximum(clipped, dual_clip * advantages), clipped)
    was_clipped = ((surr2 < surr1) | ((advantages < 0) & (dual_clip * advantages > clipped))).float()
    return -objective, was_clipped


def cosine_coefficient(start: float, end: float, step: int, total_steps: int) -> float:
    """Cosine annealing from start (step 0) to end (step total_steps)."""
    if total_steps <= 0:
        return start
    frac = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))
