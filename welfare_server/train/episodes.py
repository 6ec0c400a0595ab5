"""A training step's episodes: group mazes, rollouts with per-turn observations, the oracle.

A step's batch is B mazes x G episodes: MazeBatch(B * G envs, the step's seed), then env b * G is
cloned into envs b * G + 1 .. (b + 1) * G - 1 with independent=True (same maze and start, their own
wind and prompt shuffles). Everything is a pure function of (run seed, step): a rank (or a chunk
of at most max_rollout_envs envs) plays a shard of that batch, copied out by `shard`, with moves
seeded by the envs' indices in the whole batch, so sharding changes nothing an episode does.

Sessions are not forked within a group: with independent clones the first user turn already
differs (its directions are shuffled by each clone's own key), so the shared prefix is only the
chat template's system prompt (21 of ~1,300 tokens of an episode with SmolLM2), under 2% of the
prefill work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from welfare_server.maze import GOLD, MOLD, PATH, MazeBatch, MazeConfig, MazeTokenTable

_STATE = ("grids", "row", "col", "step_index", "wind_from", "episode", "step_key", "done", "origin_env",
          "origin_episode")
"""MazeBatch's live per-env state tensors: everything an env's future depends on."""


@dataclass
class Episodes:
    """n episodes of one step, each T moves (tensors on the CPU)."""

    env_ids: list[int]
    """Each episode's env index in the step's batch (group = env_id // group_size)."""
    token_ids: list[list[int]]
    """Each episode's whole conversation, exactly the ids played."""
    answer_positions: list[list[int]]
    """Index of each move token in token_ids."""
    actions: torch.Tensor
    """int64 [n, T]."""
    logprobs: torch.Tensor
    """float32 [n, T]: the rollout's masked log-prob of each move (NaN for oracle episodes)."""
    rewards: torch.Tensor
    """float32 [n, T]."""
    tiles_entered: torch.Tensor
    """int32 [n, T]."""
    tiles_pushed: torch.Tensor
    """int32 [n, T]: -1 without a wind push."""
    valid: torch.Tensor
    """bool [n, T, 4]: the valid moves at each turn (the action mask)."""
    neighbours: torch.Tensor
    """int32 [n, T, 4]: tile code in each direction at each turn (-1 outside the grid)."""
    oracle_returns: torch.Tensor
    """float32 [n]: return of the oracle policy on the same maze with the same wind."""

    def __len__(self) -> int:
        return len(self.env_ids)

    @property
    def returns(self) -> torch.Tensor:
        return self.rewards.sum(dim=1)

    def tile_counts(self, tile: int) -> torch.Tensor:
        """float [n]: tiles of this type entered per episode, by moves and by wind pushes."""
        return ((self.tiles_entered == tile).sum(1) + (self.tiles_pushed == tile).sum(1)).float()

    @property
    def gold(self) -> torch.Tensor:
        return self.tile_counts(GOLD)

    @property
    def mold(self) -> torch.Tensor:
        return self.tile_counts(MOLD)

    @property
    def regret(self) -> torch.Tensor:
        return self.oracle_returns - self.returns

    def select(self, index: list[int]) -> "Episodes":
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index]
        return Episodes(**picked)

    @staticmethod
    def empty(steps: int) -> "Episodes":
        """No episodes of `steps` moves: what a rank plays whose share of a batch is empty (fewer
        held-out mazes than processes)."""
        def none(dtype, *shape):
            return torch.zeros(0, *shape, dtype=dtype)

        return Episodes(env_ids=[], token_ids=[], answer_positions=[], actions=none(torch.int64, steps),
                        logprobs=none(torch.float32, steps), rewards=none(torch.float32, steps),
                        tiles_entered=none(torch.int32, steps), tiles_pushed=none(torch.int32, steps),
                        valid=none(torch.bool, steps, 4), neighbours=none(torch.int32, steps, 4),
                        oracle_returns=none(torch.float32))

    @staticmethod
    def concat(parts: list["Episodes"]) -> "Episodes":
        joined = {}
        for f in fields(Episodes):
            values = [getattr(p, f.name) for p in parts]
            joined[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, [])
        return Episodes(**joined)


def group_batch(config: MazeConfig, groups: int, group_size: int, seed: int, prepare=None) -> MazeBatch:
    """The step's B x G batch: fresh mazes from seed, prepare(maze) (a caller's edit of the state,
    e.g. a crafted easy maze), then env b * G cloned into the rest of group b."""
    maze = MazeBatch(config, groups * group_size, seed=seed)
    if prepare is not None:
        prepare(maze)
    for b in range(groups):
        if group_size > 1:
            maze.clone(b * group_size, b * group_size + 1, (b + 1) * group_size, independent=True)
    return maze


def shard(maze: MazeBatch, env_ids: list[int]) -> MazeBatch:
    """A new MazeBatch whose env k is a copy of maze's env env_ids[k] (its whole live state)."""
    out = MazeBatch(maze.config, len(env_ids), seed=maze.seed, device=maze.device)
    index = torch.tensor(env_ids, dtype=torch.long, device=maze.device)
    for name in _STATE:
        getattr(out, name).copy_(getattr(maze, name)[index])
    return out


def _observe(maze: MazeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    obs = maze.observe()
    return obs.valid.cpu().clone(), obs.neighbours.cpu().clone()


def play(engine, table: MazeTokenTable, maze: MazeBatch, env_ids: list[int], rollout_config, *,
         steering=None, chunk: int, on_turn=None) -> Episodes:
    """Play env_ids of the step's batch through the engine, at most `chunk` envs at once."""
    from welfare_server.train.rollout import play_episodes

    parts = []
    for start in range(0, len(env_ids), chunk):
        ids = env_ids[start:start + chunk]
        sub = shard(maze, ids)
        oracle = oracle_returns(shard(maze, ids))
        valid, neighbours = [], []
        first = _observe(sub)
        valid.append(first[0])
        neighbours.append(first[1])
        steps = maze.config.episode_steps

        def turn_done(t, sub=sub, valid=valid, neighbours=neighbours):
            if t + 1 < steps:  # the observation the next turn's prompt shows
                v, n = _observe(sub)
                valid.append(v)
                neighbours.append(n)
            if on_turn is not None:
                on_turn(t)

        result = play_episodes(engine, table, sub, rollout_config, steering=steering, on_turn=turn_done, env_ids=ids)
        parts.append(Episodes(
            env_ids=list(ids), token_ids=result.token_ids, answer_positions=result.answer_positions,
            actions=result.actions, logprobs=result.logprobs, rewards=result.rewards,
            tiles_entered=result.tiles_entered, tiles_pushed=result.tiles_pushed,
            valid=torch.stack(valid, dim=1), neighbours=torch.stack(neighbours, dim=1), oracle_returns=oracle))
    return Episodes.concat(parts) if parts else Episodes.empty(maze.config.episode_steps)


def _oracle_moves(maze: MazeBatch, generator: torch.Generator | None) -> torch.Tensor:
    """One oracle move per env: a first move of a shortest path to the nearest Gold through non-Mold
    tiles (MazeBatch.oracle; without reachable Gold, a move onto a non-Mold tile). generator None:
    the first such move in N, E, S, W order; else one drawn uniformly."""
    _, optimal = maze.oracle()
    optimal = optimal.cpu().float()
    if generator is None:
        return optimal.argmax(dim=1)  # the first maximal entry
    return torch.multinomial(optimal, 1, generator=generator).squeeze(1)


def oracle_returns(maze: MazeBatch) -> torch.Tensor:
    """Return of the deterministic oracle policy in each env (played on maze, which it steps):
    on a copy of a rollout's maze it sees the same wind, so the difference of returns is the
    rollout's regret against the oracle (negative when the rollout did better: the oracle is
    greedy toward the nearest Gold, not optimal over the episode)."""
    total = torch.zeros(maze.num_envs, dtype=torch.float32)
    for _ in range(maze.config.episode_steps):
        total += maze.step(_oracle_moves(maze, None).to(torch.int32).to(maze.device)).reward.cpu()
    return total


def oracle_episodes(table: MazeTokenTable, maze: MazeBatch, env_ids: list[int], generator: torch.Generator) -> Episodes:
    """SFT data: the oracle plays env_ids of the step's batch (a uniformly drawn shortest-path move
    each turn), written as the conversations a rollout makes (chat prefix, user turns straight
    from render_tokens, one move token per answer, the template's end-of-turn ids)."""
    sub = shard(maze, env_ids)
    oracle = oracle_returns(shard(maze, env_ids))
    n, steps = len(env_ids), maze.config.episode_steps
    prefix, end = list(table.conversation_prefix_ids), list(table.assistant_end_ids)
    conversations = [list(prefix) for _ in range(n)]
    positions: list[list[int]] = [[] for _ in range(n)]
    buffers = {name: torch.zeros(n, steps, dtype=dtype) for name, dtype in
               (("actions", torch.int64), ("rewards", torch.float32), ("tiles_entered", torch.int32),
                ("tiles_pushed", torch.int32))}
    valid, neighbours = [], []
    for t in range(steps):
        v, nb = _observe(sub)
        valid.append(v)
        neighbours.append(nb)
        ids, lengths = sub.render_tokens(table)
        ids, lengths = ids.cpu().tolist(), lengths.cpu().tolist()
        moves = _oracle_moves(sub, generator)
        for i in range(n):
            conversations[i] += ([] if t == 0 else end) + ids[i][:lengths[i]]
            positions[i].append(len(conversations[i]))
            conversations[i].append(table.action_token_ids[int(moves[i])])
        result = sub.step(moves.to(torch.int32).to(sub.device))
        buffers["actions"][:, t] = moves
        buffers["rewards"][:, t] = result.reward.cpu()
        buffers["tiles_entered"][:, t] = result.tile_entered.cpu()
        buffers["tiles_pushed"][:, t] = result.tile_pushed.cpu()
    for i in range(n):
        conversations[i] += end
    return Episodes(env_ids=list(env_ids), token_ids=conversations, answer_positions=positions,
                    logprobs=torch.full((n, steps), float("nan")), valid=torch.stack(valid, 1),
                    neighbours=torch.stack(neighbours, 1), oracle_returns=oracle, **buffers)


__all__ = ["Episodes", "group_batch", "shard", "play", "oracle_returns", "oracle_episodes", "PATH", "GOLD", "MOLD"]
