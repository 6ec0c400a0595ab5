"""Maze rollouts with a causal LM: the model plays B mazes at once, one move token per turn.

Each env's conversation is the chat template's prefix, then per turn the rendered user turn (token
ids straight from MazeBatch.render_tokens, never re-tokenised) and the model's one-token answer,
masked to the valid directions among N/E/S/W. The whole history stays in context (docs/architecture.md).

play_episodes() plays them through the generation engine: one engine session per env keeps the
conversation's KV cache between turns, so a turn prefills only the previous answer's end-of-turn
ids and the new user turn; the move is one token sampled under an allowed-token mask, and
steering (a SteeringSpec) applies to every assistant-turn and generated token as the paper does.

reference_rollout() is the same loop on a Hugging Face model's own forward with a DynamicCache (each
turn appends one block per env, left-padded so every env's last real token sits at the block's
end): the oracle the engine rollout is tested against and the baseline bench/bench_rollout.py
measures it against.
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
    """float32 [B, steps]: log-probability of each chosen action under the masked distribution
    (softmax of the raw logits over the valid moves' tokens: the policy's own probability)."""
    rewards: torch.Tensor
    """float32 [B, steps]."""
    tiles_entered: torch.Tensor
    """int32 [B, steps]."""
    tiles_pushed: torch.Tensor
    """int32 [B, steps]: tile a wind push entered, -1 without a push."""
    wind_from: torch.Tensor
    """int32 [B, steps]: direction the wind came from after the move, -1 without a push."""
    token_ids: list[list[int]]
    """Each env's whole conversation as token ids (prefix, turns, answers)."""
    answer_positions: list[list[int]]
    """Index in token_ids[i] of each of env i's answer tokens (where its log-prob is read)."""

    @property
    def returns(self) -> torch.Tensor:
        return self.rewards.sum(dim=1)


def _result_buffers(B: int, steps: int) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(B, steps, dtype=dtype) for name, dtype in
            (("actions", torch.int64), ("logprobs", torch.float32), ("rewards", torch.float32),
             ("tiles_entered", torch.int32), ("tiles_pushed", torch.int32), ("wind_from", torch.int32))}


def _record_step(out: dict, t: int, result) -> None:
    out["rewards"][:, t] = result.reward.cpu()
    out["tiles_entered"][:, t] = result.tile_entered.cpu()
    out["tiles_pushed"][:, t] = result.tile_pushed.cpu()
    out["wind_from"][:, t] = result.wind_from.cpu()


def _check_fresh(maze: MazeBatch) -> None:
    if bool((maze.step_index != 0).any()):
        raise ValueError("rollout needs every env at step 0; call maze.reset() first")


@torch.inference_mode()
def reference_rollout(model, table: MazeTokenTable, maze: MazeBatch,
                      config: RolloutConfig = RolloutConfig()) -> RolloutResult:
    """Play one episode in every env of maze (which must be freshly reset) with a Hugging Face
    model's own forward (the reference; see the module docstring)."""
    from transformers import DynamicCache

    _check_fresh(maze)
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
    out = _result_buffers(B, steps)
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
        _record_step(out, t, result)
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


def generation_header_ids(tokenizer) -> list[int]:
    """Ids the chat template adds as the generation prompt (e.g. "<|im_start|>assistant\n"): the
    tail of every rendered user turn, which belongs to the assistant's turn."""
    messages = [{"role": "user", "content": "x"}]
    with_header = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not with_header.startswith(without):
        raise ValueError("the chat template's generation prompt is not a suffix of the conversation")
    header = with_header[len(without):]
    return list(tokenizer(header, add_special_tokens=False)["input_ids"]) if header else []


def episode_context_tokens(table: MazeTokenTable) -> int:
    """Most tokens one episode's conversation can reach (the engine's max_context_len must hold it)."""
    steps = table.config.episode_steps
    return len(table.conversation_prefix_ids) + steps * (table.max_len + len(table.assistant_end_ids) + 1)


def action_seed(seed: int, env: int, turn: int) -> int:
    """The sampling seed of env's move at turn: a pure function of (seed, env, turn), so a move
    does not depend on which other envs share the batch."""
    return ((seed * 1_000_003 + env) * 1_009 + turn) & ((1 << 62) - 1)


@torch.inference_mode()
def play_episodes(engine, table: MazeTokenTable, maze: MazeBatch, config: RolloutConfig = RolloutConfig(),
                  steering=None, on_turn=None, *, env_ids=None) -> RolloutResult:
    """Play one episode in every env of maze (freshly reset) through the engine (see the module
    docstring). steering: a SteeringSpec applied to every env (its scope decides which prompt
    tokens it touches; the paper's is ASSISTANT_AND_GENERATED). on_turn(t): called after each turn
    (a progress bar). env_ids: the index each env's moves are seeded by (action_seed), default its
    position in maze; a trainer that plays a shard of a larger batch passes the envs' indices in
    the whole batch, so a move does not depend on how the batch was sharded. Each env holds an
    engine session for the episode; they are closed at the end."""
    from welfare_server.model.engine import Request, SamplingParams

    _check_fresh(maze)
    B, steps = maze.num_envs, maze.config.episode_steps
    cfg = engine.cfg
    if B > cfg.max_sessions:
        raise ValueError(f"num_envs={B} needs one engine session per env; the engine has max_sessions="
                         f"{cfg.max_sessions} (max_batch_slots={cfg.max_batch_slots})")
    prefix, end = list(table.conversation_prefix_ids), list(table.assistant_end_ids)
    header = generation_header_ids(engine.tokenizer)
    longest = episode_context_tokens(table)
    if longest > cfg.max_context_len:
        raise ValueError(f"an episode of {steps} turns can reach {longest} tokens, more than the engine's "
                         f"max_context_len={cfg.max_context_len}")
    action_ids = list(table.action_token_ids)
    action_of = {tok: a for a, tok in enumerate(action_ids)}
    seed_env = list(range(B)) if env_ids is None else [int(e) for e in env_ids]
    if len(seed_env) != B:
        raise ValueError(f"env_ids has {len(seed_env)} entries, the maze has {B} envs")
    out = _result_buffers(B, steps)
    conversations = [list(prefix) for _ in range(B)]
    answer_positions: list[list[int]] = [[] for _ in range(B)]
    sessions = [engine.open_session(pinned=True) for _ in range(B)]
    try:
        for t in range(steps):
            ids, lengths = maze.render_tokens(table)
            ids, lengths = ids.cpu().tolist(), lengths.cpu().tolist()
            valid = maze.observe().valid.cpu().tolist()
            requests = []
            for i in range(B):
                turn = ids[i][: lengths[i]]
                if header and turn[-len(header):] != header:
                    raise ValueError("a rendered user turn does not end with the chat template's generation prompt")
                roles = ["user"] * (len(turn) - len(header)) + ["assistant"] * len(header)
                lead, lead_role = (prefix, "system") if t == 0 else (end, "assistant")
                conversations[i] += ([] if t == 0 else end) + turn
                answer_positions[i].append(len(conversations[i]))
                allowed = [action_ids[d] for d in range(4) if valid[i][d]]
                requests.append(Request(
                    prompt=lead + turn, prompt_roles=[lead_role] * len(lead) + roles, session_id=sessions[i],
                    steering=steering, sampling=SamplingParams(
                        max_new_tokens=1, temperature=config.temperature, seed=action_seed(config.seed, seed_env[i], t),
                        logprobs=True, allowed_token_ids=allowed, ignore_eos=True)))
            outputs = engine.generate(requests)
            actions = torch.tensor([action_of[o.token_ids[0]] for o in outputs], dtype=torch.int64)
            for i, o in enumerate(outputs):
                conversations[i].append(o.token_ids[0])
            out["actions"][:, t] = actions
            out["logprobs"][:, t] = torch.tensor([o.masked_logprobs[0] for o in outputs])
            _record_step(out, t, maze.step(actions.to(torch.int32).to(maze.device)))
            if on_turn is not None:
                on_turn(t)
    finally:
        for sid in sessions:
            engine.close_session(sid)
    for i in range(B):
        conversations[i] += end
    return RolloutResult(token_ids=conversations, answer_positions=answer_positions, **out)
