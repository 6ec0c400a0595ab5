"""Maze rollouts with a causal LM: the model plays B mazes at once, one move token per turn.

Each env's conversation is the chat template's prefix, then per turn the rendered user turn (token
ids straight from MazeBatch.render_tokens) and the model's one-token answer, masked to the valid
directions among N/E/S/W. The whole history stays in context (DESIGN.md), held in a KV cache: each
turn appends one block per env — the previous answer, the template's end-of-answer ids and the new
user turn — left-padded within the block so every env's last real token sits at the block's end.

This is the reference rollout on a Hugging Face model's own forward; the trainer will drive the
same loop through the generation engine (welfare_server/model) once it exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from welfare_server.maze.batch import MazeBatch
from welfare_server.maze.tokens import MazeTokenTable


@dataclass(frozen=True)
class RolloutConfig:
    """How actions are sampled during a rollout."""

    temperature: float = 1.0
    """Softmax temperature over the valid direction tokens; 0 picks the most likely (greedy)."""

    seed: int = 0
    """Seed of the action sampler (the maze has its own seed)."""

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"RolloutConfig.temperature={self.temperature!r} is out of bounds [0, 100]")


@dataclass
class RolloutResult:
    actions: torch.Tensor
    """int64 [B, steps]: direction codes chosen."""
    logprobs: torch.Tensor
    """float32 [B, steps]: log-probability of each chosen action under the masked distribution."""
    rewards: torch.Tensor
    """float32 [B, steps]."""
    tiles_entered: torch.Tensor
    """int32 [B, steps]."""
    token_ids: list[list[int]]
    """Each env's whole conversation as token ids (prefix, turns, answers)."""
    answer_positions: list[list[int]]
    """Index in token_ids[i] of each of env i's answer tokens (where its log-prob is read)."""

    @property
    def returns(self) -> torch.Tensor:
        return self.rewards.sum(dim=1)


@torch.inference_mode()
def rollout(model, table: MazeTokenTable, maze: MazeBatch, config: RolloutConfig = RolloutConfig()) -> RolloutResult:
    """Play one episode in every env of maze (which must be freshly reset) with model."""
    from transformers import DynamicCache

    if bool((maze.step_index != 0).any()):
        raise ValueError("rollout needs every env at step 0; call maze.reset() first")
    device = next(model.parameters()).device
    B, steps = maze.num_envs, maze.config.episode_steps
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    action_ids = torch.tensor(table.action_token_ids, device=device)
    cache = DynamicCache()
    attention = torch.zeros(B, 0, dtype=torch.long, device=device)
    next_position = torch.zeros(B, dtype=torch.long, device=device)
    conversations = [list(table.conversation_prefix_ids) for _ in range(B)]
    answer_positions: list[list[int]] = [[] for _ in range(B)]
    cache_argument = _cache_argument_name(model)
    out = {name: torch.zeros(B, steps, dtype=dtype) for name, dtype in
           (("actions", torch.int64), ("logprobs", torch.float32), ("rewards", torch.float32),
            ("tiles_entered", torch.int32))}
    previous_answer: list[list[int]] = [[] for _ in range(B)]
    for t in range(steps):
        ids, lengths = maze.render_tokens(table)
        ids, lengths = ids.cpu().tolist(), lengths.cpu().tolist()
        blocks = []
        for i in range(B):
            block = previous_answer[i] + ids[i][: lengths[i]]
            if t == 0:
                block = list(table.conversation_prefix_ids) + block
            conversations[i] += ids[i][: lengths[i]]
            blocks.append(block)
        width = max(len(block) for block in blocks)
        block_ids = torch.full((B, width), table.pad_id, dtype=torch.long)
        block_mask = torch.zeros(B, width, dtype=torch.long)
        for i, block in enumerate(blocks):
            block_ids[i, width - len(block):] = torch.tensor(block)
            block_mask[i, width - len(block):] = 1
        block_ids, block_mask = block_ids.to(device), block_mask.to(device)
        positions = next_position[:, None] + block_mask.cumsum(dim=1) - 1
        next_position = next_position + block_mask.sum(dim=1)
        attention = torch.cat([attention, block_mask], dim=1)
        logits = model(input_ids=block_ids, attention_mask=attention, position_ids=positions.clamp(min=0),
                       use_cache=True, **{cache_argument: cache}).logits[:, -1, :]
        valid = maze.observe().valid.to(device)
        move_logits = logits[:, action_ids].float().masked_fill(~valid, float("-inf"))
        log_probs = torch.log_softmax(move_logits, dim=-1)
        if config.temperature == 0:
            actions = move_logits.argmax(dim=-1)
        else:
            probs = torch.softmax(move_logits / config.temperature, dim=-1).cpu()
            actions = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        result = maze.step(actions.to(maze.device))
        out["actions"][:, t] = actions.cpu()
        out["logprobs"][:, t] = log_probs.gather(1, actions[:, None]).squeeze(1).cpu()
        out["rewards"][:, t] = result.reward.cpu()
        out["tiles_entered"][:, t] = result.tile_entered.cpu()
        for i in range(B):
            answer = [table.action_token_ids[int(actions[i])]]
            answer_positions[i].append(len(conversations[i]))
            conversations[i] += answer + table.assistant_end_ids
            previous_answer[i] = answer + list(table.assistant_end_ids)
    return RolloutResult(token_ids=conversations, answer_positions=answer_positions, **out)


def _cache_argument_name(model) -> str:
    """transformers renamed forward's past_key_values to cache (5.2x); the GPU image has 5.17."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
