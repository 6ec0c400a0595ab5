"""The training forward: the model's logits of the four direction tokens at every move of an episode.

Token in, token out: the ids fed here are exactly the ids the rollout sampled and conditioned on
(RolloutResult.token_ids, never re-tokenised), and the move at answer position p is scored by the
forward's output at position p - 1 (the logits that predicted it). check_moves() compares the
recomputed log-probs with the rollout's own and names the first move that differs beyond the
tolerance.

Only the final hidden states at the answer positions go through the output head (15 rows per
episode instead of ~1,300), and the head's output is cut to the four direction tokens.

load_tokenizer() and check_model_tokens() refuse a model the maze cannot be played with (no chat
template, directions that are not single tokens) before its weights are read.
"""

from __future__ import annotations

from pathlib import Path

import torch

LOGPROB_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 0.15, torch.float16: 0.15}
"""Default |training - rollout| log-prob tolerance per dtype. fp32: the engine's linears
accumulate in another order than MKL and a LoRA's merged weight rounds differently from its
separate path (measured differences ~1e-5 on the bundled model; 1e-3 is the engine's own test
bound on the paper's maze). bf16: a merged weight is rounded to bf16 (8 bits of mantissa), which
alone moves logits by ~1e-2 on a 4B model; 0.15 still catches a wrong token or position."""


class TokenMismatch(ValueError):
    """The training forward does not reproduce a rollout's move (token ids or log-prob)."""


def pad_batch(token_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, L] and attention mask [n, L]: a causal model's outputs at real
    positions do not depend on what follows, so right padding changes nothing they compute."""
    width = max(len(ids) for ids in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_ids), width, dtype=torch.long)
    for i, seq in enumerate(token_ids):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def move_logits(model, token_ids: list[list[int]], answer_positions: list[list[int]],
                action_token_ids: list[int], pad_id: int) -> torch.Tensor:
    """Logits [n, T, 4] of N/E/S/W at each of the n episodes' T answer positions (the output at
    position p - 1 for the move token at p), with gradients when the model has trainable weights."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(token_ids, pad_id, device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # final norm applied
    rows = torch.tensor([[p - 1 for p in positions] for positions in answer_positions], device=device)
    picked = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))  # [n, T, D]
    logits = model.lm_head(picked)[..., action_token_ids]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma2: logits are soft-capped after the head, as the model's own forward does
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_moves(token_ids: list[list[int]], answer_positions: list[list[int]], actions: torch.Tensor,
                action_token_ids: list[int], rollout_logp: torch.Tensor, train_logp: torch.Tensor,
                tolerance: float, env_ids: list[int]) -> float:
    """Check every move of n episodes: the token at its answer position is the chosen action's
    token, and |train_logp - rollout_logp| <= tolerance. Returns the largest difference; raises
    TokenMismatch naming the env (its index in the step's batch), the turn and both values."""
    acts = actions.tolist()
    for i, (ids, positions) in enumerate(zip(token_ids, answer_positions)):
        for t, p in enumerate(positions):
            if ids[p] != action_token_ids[acts[i][t]]:
                raise TokenMismatch(f"env {env_ids[i]}, turn {t}: token {ids[p]} at answer position {p} is not "
                                    f"the chosen move's token {action_token_ids[acts[i][t]]}")
    diff = (train_logp.detach().float() - rollout_logp.float()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst <= tolerance:  # NaN fails too
        flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
        i, t = divmod(flat, diff.shape[1])
        raise TokenMismatch(
            f"env {env_ids[i]}, turn {t}: the training forward gives log-prob {float(train_logp[i, t]):.6f} "
            f"for the move the rollout sampled with log-prob {float(rollout_logp[i, t]):.6f} "
            f"(|difference| {float(diff[i, t]):.3g} > tolerance {tolerance:g})")
    return worst


def load_tokenizer(name: str):
    """The model's tokenizer, loaded before the model so a model the maze cannot use is refused
    before its weights are read."""
    from transformers import AutoTokenizer

    from welfare_server.model.bundled import default_tokenizer_dir
    from welfare_server.model.loading import BUNDLED_NAME, PRESETS

    if name in PRESETS or name == BUNDLED_NAME:
        return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(f"TrainConfig.model: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}), "
                         f"{BUNDLED_NAME!r}, nor a local Hugging Face directory with a config.json")
    return AutoTokenizer.from_pretrained(str(path))


def check_model_tokens(tokenizer, maze_config):
    """The maze's token table for this tokenizer; a clear error when the model lacks what the maze
    needs: a chat template, and N, E, S, W as single tokens."""
    from welfare_server.maze import MazeTokenTable

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("TrainConfig.model: the tokenizer has no chat template; the maze is played as a "
                         "multi-turn chat (an instruct model's tokenizer is needed)")
    try:
        return MazeTokenTable.from_tokenizer(tokenizer, maze_config)
    except ValueError as error:
        raise ValueError(f"TrainConfig.model: {error}") from None
