"""The Maze service (welfare.v1.Maze): rollouts played on the server, and sessions in which an
external trainer steps a server-hosted batch of envs.

Rollout plays B mazes x G group members: maze b is episode 0 of env b under the request's seed
(the same mazes for any G and any policy), cloned into its G envs with independent futures (wind,
prompt shuffles, sampling seeds), so a GRPO group starts from one maze and diverges. The policy is
the served model (train/rollout.play_episodes: one engine session per env, optionally steered),
uniform over the valid moves (RANDOM), or a first move of a shortest path to the nearest Gold
(ORACLE, random among the optimal moves; uniform when no Gold is reachable). The episodes are
played in a worker thread (the engine serves other calls meanwhile) and streamed once the batch
has finished; a call that ends early stops the worker after its current turn.

Session hosts one MazeBatch per stream. A reset builds a fresh batch (the same mazes for the same
rules, num_envs and seed) and answers its first observations; each step moves every env by its
action and answers the step's rewards, tiles and done flags with the observations that follow.
An episode that ends starts the env's next episode (a new maze) within the same step (same-step
autoreset, docs/maze_spec.md): `done` marks the step that ended one, and the observations are
already the new episode's, so a trainer steps on without resetting. An open Session counts against
max_concurrent_requests for as long as it lasts: it holds its batch's memory while idle.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading

import grpc
import torch

from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.model.fields import InvalidRequest
from welfare_server.server import wire
from welfare_server.server.errors import WireError, exhausted, invalid, translate
from welfare_server.server.proto import maze_pb2
from welfare_server.server.proto import maze_pb2_grpc
from welfare_server.server.vectors_service import Progress, maze_config, served_call
from welfare_server.train.rollout import RolloutConfig, RolloutResult, episode_context_tokens, play_episodes

POLICIES = {maze_pb2.POLICY_UNSPECIFIED: "model", maze_pb2.POLICY_MODEL: "model", maze_pb2.POLICY_RANDOM: "random",
            maze_pb2.POLICY_ORACLE: "oracle"}

TABLE_CACHE_SIZE = 16
"""Token tables kept per maze config (building one checks 512 rendered prompts, ~0.15 s)."""

_ENGINE_FIELD = re.compile(r"^requests\[\d+\]\.")


def _state_bytes(config: MazeConfig, envs: int) -> int:
    return envs * (config.size * config.size + 64)


class MazeService(maze_pb2_grpc.MazeServicer):
    def __init__(self, state):
        self.state = state
        self._tables: dict[MazeConfig, MazeTokenTable] = {}
        self._tables_lock = threading.Lock()
        self._sessions_held = 0  # engine sessions held by MODEL rollouts (touched on the loop only)

    def _table(self, config: MazeConfig, field: str) -> MazeTokenTable:
        """The token table of a config (built once per config; call from a worker thread)."""
        with self._tables_lock:
            table = self._tables.get(config)
        if table is not None:
            return table
        tokenizer = self.state.engine.tokenizer
        if tokenizer is None:
            raise invalid(field, "this model has no tokenizer: it cannot render maze prompts")
        try:
            table = MazeTokenTable.from_tokenizer(tokenizer, config)
        except ValueError as error:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"this model cannot read maze prompts: {error}")
        with self._tables_lock:
            if len(self._tables) >= TABLE_CACHE_SIZE:
                self._tables.pop(next(iter(self._tables)))
            self._tables[config] = table
        return table

    # ------------------------------------------------------------------ Rollout
    async def Rollout(self, request, context):
        s = self.state
        async with served_call(s, "Rollout", context, admit=True) as call:
            plan = self._rollout_plan(request)
            call.log.update(policy=plan["policy"], num_mazes=plan["B"], group_size=plan["G"])
            reserved = 0
            if plan["policy"] == "model":
                # Each env holds an engine session for its whole episode; two rollouts whose sessions
                # together pass max_sessions would evict each other's between turns.
                free = s.engine.cfg.max_sessions - self._sessions_held
                if plan["envs"] > free:
                    raise exhausted(f"Rollout: {plan['envs']} envs need as many engine sessions; "
                                    f"{self._sessions_held} of max_sessions={s.engine.cfg.max_sessions} are held "
                                    "by other rollouts")
                reserved = plan["envs"]
                self._sessions_held += reserved

            def release():  # when the worker ends: its sessions are closed by then
                self._sessions_held -= reserved

            progress = Progress(asyncio.get_running_loop())
            async for _ in progress.run(lambda: self._play(plan, progress), on_end=release):
                pass
            result = progress.value
            B, G = plan["B"], plan["G"]
            model = plan["policy"] == "model"
            for b in range(B):
                for g in range(G):
                    yield self._episode(result, b, g, b * G + g, model, request.include_tokens)

    def _rollout_plan(self, request) -> dict:
        """Every field checked (cheap checks only; the token table is built in the worker)."""
        s = self.state
        policy = wire.enum_value(POLICIES, request.policy, "policy", "Policy")
        B, G = request.num_mazes, request.group_size or 1
        if B < 1:
            raise invalid("num_mazes", f"{B}; at least 1 maze is required")
        if G < 1:
            raise invalid("group_size", f"{G} is negative (0 or unset: 1)")
        envs, limit = B * G, s.config.max_rollout_envs
        if envs > limit:
            raise invalid("num_mazes" if B > limit else "group_size",
                          f"{B} mazes x {G} per group = {envs} envs, more than max_rollout_envs={limit}")
        state_limit = s.config.max_maze_state_bytes
        config = maze_config(request.rules, "rules", max_state_bytes=state_limit)
        if _state_bytes(config, envs) > state_limit:
            raise invalid("num_mazes" if G == 1 else "group_size",
                          f"{envs} envs of size {config.size} need {_state_bytes(config, envs)} bytes of maze state, "
                          f"more than max_maze_state_bytes={state_limit}")
        if request.seed < 0:
            raise invalid("seed", f"{request.seed} is negative")
        plan = dict(policy=policy, B=B, G=G, envs=envs, config=config, seed=request.seed, steering=None,
                    temperature=1.0, tokens=request.include_tokens or policy == "model")
        if request.HasField("temperature"):
            temperature = request.temperature
            if not (math.isfinite(temperature) and 0.0 <= temperature <= 100.0):
                raise invalid("temperature", f"{temperature} is out of bounds [0, 100] (0: greedy)")
            plan["temperature"] = temperature
        if request.steering.terms:
            if policy != "model":
                raise invalid("steering", f"steering applies to the MODEL policy only, not {policy.upper()}")
            plan["steering"] = wire.steering(request.steering, num_layers=s.engine.L, registry=s.registry,
                                             identity=s.identity, max_elements=s.config.max_tensor_elements)
        if policy == "model":
            if s.engine.tokenizer is None:
                raise invalid("policy", "this model has no tokenizer: it cannot play the maze (use RANDOM or ORACLE)")
            if envs > s.engine.cfg.max_sessions:
                raise invalid("num_mazes" if G == 1 else "group_size",
                              f"{envs} envs need one engine session each; the engine has max_sessions="
                              f"{s.engine.cfg.max_sessions}")
        return plan

    def _play(self, plan: dict, progress: Progress) -> RolloutResult:
        """The worker: build the mazes and play them (raises Stopped once the call has gone)."""
        config, B, G = plan["config"], plan["B"], plan["G"]
        table = self._table(config, "rules") if plan["tokens"] else None
        engine = self.state.engine
        if plan["policy"] == "model" and episode_context_tokens(table) > engine.cfg.max_context_len:
            raise invalid("rules.episode_steps", f"an episode of {config.episode_steps} turns can reach "
                                                 f"{episode_context_tokens(table)} tokens, more than the engine's "
                                                 f"max_context_len={engine.cfg.max_context_len}")
        maze = MazeBatch(config, B * G, seed=plan["seed"])
        if G > 1:
            # Maze b is env b's first maze. Sources are read before any clone overwrites them: maze b
            # goes to envs [bG, bG + G), all at or past b, so going from the last maze down, no
            # source is overwritten before it is copied (maze 0 stays in env 0 and is copied beside it).
            for b in reversed(range(B)):
                if b == 0:
                    maze.clone(0, 1, G, independent=True)
                else:
                    maze.clone(b, b * G, b * G + G, independent=True)

        def on_turn(t):
            progress.report(t)

        if plan["policy"] == "model":
            try:
                return play_episodes(engine, table, maze, RolloutConfig(plan["temperature"], plan["seed"]),
                                     steering=plan["steering"], on_turn=on_turn)
            except InvalidRequest as error:
                # The engine names the field of one env's turn request ("requests[3].steering..."):
                # every env carries the call's steering, so the message's field is what follows.
                refusal = translate(error)
                field = _ENGINE_FIELD.sub("", refusal.violations[0][0]) if refusal.violations else "request"
                raise invalid(field, refusal.violations[0][1] if refusal.violations else str(error)) from None
        return _play_baseline(maze, table, plan["policy"], plan["seed"], on_turn)

    @staticmethod
    def _episode(result: RolloutResult, b: int, g: int, i: int, model: bool, tokens: bool) -> maze_pb2.Episode:
        episode = maze_pb2.Episode(
            maze=b, member=g, actions=result.actions[i].tolist(), rewards=result.rewards[i].tolist(),
            tiles_entered=result.tiles_entered[i].tolist(), tiles_pushed=result.tiles_pushed[i].tolist(),
            wind_from=result.wind_from[i].tolist(), episode_return=float(result.rewards[i].sum()))
        if model:
            episode.logprobs.extend(result.logprobs[i].tolist())
        if tokens:
            episode.token_ids.extend(result.token_ids[i])
        return episode

    # ------------------------------------------------------------------ Session
    async def Session(self, request_iterator, context):
        s = self.state
        async with served_call(s, "Session", context, admit=True) as call:
            batch, table, steps = None, None, 0
            async for message in request_iterator:
                kind = message.WhichOneof("command")
                if kind is None:
                    raise invalid("command", "unset: send reset or step")
                if kind == "reset":
                    batch, table = await asyncio.to_thread(self._reset, message.reset)
                    call.log.update(num_envs=batch.num_envs)
                    yield await asyncio.to_thread(_session_response, batch, table, None)
                    continue
                if batch is None:
                    raise invalid("step", "no reset yet: the first command of a session is a reset")
                actions = list(message.step.actions)
                if len(actions) != batch.num_envs:
                    raise invalid("step.actions", f"{len(actions)} actions for {batch.num_envs} envs (one per env)")
                yield await asyncio.to_thread(_session_step, batch, table, actions)
                steps += 1
                call.log.update(steps=steps)

    def _reset(self, reset) -> tuple[MazeBatch, MazeTokenTable | None]:
        s = self.state
        state_limit = self.state.config.max_maze_state_bytes
        config = maze_config(reset.rules, "reset.rules", autoreset=True, max_state_bytes=state_limit)
        limit = s.config.max_rollout_envs
        if not 1 <= reset.num_envs <= limit:
            raise invalid("reset.num_envs", f"{reset.num_envs} is out of range [1, max_rollout_envs={limit}]")
        if _state_bytes(config, reset.num_envs) > state_limit:
            raise invalid("reset.num_envs", f"{reset.num_envs} envs of size {config.size} need "
                                            f"{_state_bytes(config, reset.num_envs)} bytes of maze state, more "
                                            f"than max_maze_state_bytes={state_limit}")
        if reset.seed < 0:
            raise invalid("reset.seed", f"{reset.seed} is negative")
        table = self._table(config, "reset.render_tokens") if reset.render_tokens else None
        return MazeBatch(config, reset.num_envs, seed=reset.seed), table


def _session_step(batch: MazeBatch, table, actions: list[int]) -> maze_pb2.SessionResponse:
    try:
        result = batch.step(torch.tensor(actions, dtype=torch.int32))
    except ValueError as error:  # the core names the env and the move; nothing was changed
        raise invalid("step.actions", str(error)) from None
    return _session_response(batch, table, result)


def _session_response(batch: MazeBatch, table, result) -> maze_pb2.SessionResponse:
    """The step's outcome (none after a reset) and the observations that follow it."""
    response = maze_pb2.SessionResponse()
    if result is not None:
        response.rewards.extend(result.reward.tolist())
        response.tiles_entered.extend(result.tile_entered.tolist())
        response.done.extend(result.done.tolist())
    observation = batch.observe()
    response.neighbours.extend(observation.neighbours.flatten().tolist())
    response.positions.extend(observation.position.flatten().tolist())
    response.step_index.extend(observation.step_index.tolist())
    response.wind_from.extend(observation.wind_from.tolist())
    if table is not None:
        ids, lengths = batch.render_tokens(table)
        response.token_ids.extend(ids.flatten().tolist())
        response.token_lengths.extend(lengths.tolist())
        response.max_len = table.max_len
        response.pad_id = table.pad_id
    return response


def _play_baseline(maze: MazeBatch, table, policy: str, seed: int, on_turn) -> RolloutResult:
    """RANDOM or ORACLE moves in every env (see the module docstring); with a table, the
    conversations those moves make, laid out as play_episodes lays out the model's."""
    B, steps = maze.num_envs, maze.config.episode_steps
    generator = torch.Generator().manual_seed(seed)
    out = {name: torch.zeros(B, steps, dtype=dtype) for name, dtype in
           (("actions", torch.int64), ("logprobs", torch.float32), ("rewards", torch.float32),
            ("tiles_entered", torch.int32), ("tiles_pushed", torch.int32), ("wind_from", torch.int32))}
    conversations = [list(table.conversation_prefix_ids) if table else [] for _ in range(B)]
    positions: list[list[int]] = [[] for _ in range(B)]
    end = list(table.assistant_end_ids) if table else []
    for t in range(steps):
        choices = maze.observe().valid.clone()
        if policy == "oracle":
            dist, optimal = maze.oracle()
            best = optimal & choices
            use = (dist >= 0) & best.any(dim=1)
            choices = torch.where(use[:, None], best, choices)
        actions = torch.multinomial(choices.float(), 1, generator=generator).squeeze(1)
        if table is not None:
            ids, lengths = maze.render_tokens(table)
            ids, lengths = ids.tolist(), lengths.tolist()
            for i in range(B):
                conversations[i] += ([] if t == 0 else end) + ids[i][:lengths[i]]
                positions[i].append(len(conversations[i]))
                conversations[i].append(table.action_token_ids[int(actions[i])])
        result = maze.step(actions.to(torch.int32))
        out["actions"][:, t] = actions
        out["rewards"][:, t] = result.reward
        out["tiles_entered"][:, t] = result.tile_entered
        out["tiles_pushed"][:, t] = result.tile_pushed
        out["wind_from"][:, t] = result.wind_from
        on_turn(t)
    if table is not None:
        for i in range(B):
            conversations[i] += end
    return RolloutResult(token_ids=conversations, answer_positions=positions, **out)

