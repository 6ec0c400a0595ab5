"""The Maze service on a real server on a loopback port: ORACLE finds more Gold than RANDOM on the
same mazes; a greedy MODEL rollout (plain and steered by a registry id) equals play_episodes run
directly on the same mazes; a group of G starts from one maze and diverges; a Session's answers
equal a MazeBatch stepped directly; refusals (too many envs, invalid moves, bad fields) name their
field; admission and cancellation free what a call held."""
import asyncio
import re
import time

import grpc
import pytest
import torch

from tests.server.conftest import module_server
from welfare_server.kernels import SteerMode
from welfare_server.maze import GOLD, MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.model.engine import Scope, SteeringSpec, SteeringTerm
from welfare_server.server.client import AsyncWelfareClient, WelfareClient
from welfare_server.server.errors import field_violations
from welfare_server.server.proto import maze_pb2
from welfare_server.train.rollout import RolloutConfig, play_episodes

RULES = dict(size=12, episode_steps=4)
MAX_ENVS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, max_rollout_envs=MAX_ENVS)


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.server.engine.tokenizer


def _refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """The one field a refused call names."""
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert raised.value.code() == code, raised.value.details()
    violations = field_violations(raised.value)
    return violations[0][0] if violations else ""


def _gold(episodes) -> int:
    return sum(tile == GOLD for e in episodes for tile in list(e.tiles_entered) + list(e.tiles_pushed))


def _first_turn(tokenizer, episode) -> tuple[str, frozenset]:
    """The location and the (direction, tile) clauses of an episode's first user turn, order aside
    (each env shuffles the directions of its own prompts)."""
    text = tokenizer.decode(episode.token_ids)
    turn = text.split("You are in a maze.")[1].split("Where do you move?")[0]
    location = re.search(r"location \((\d+), (\d+)\)", turn).group(0)
    clauses = frozenset(re.findall(r"[Tt]o the (\w+) there is ([^;.\s]+)", turn))
    return location, clauses


def test_oracle_finds_more_gold_than_random_on_the_same_mazes(client):
    rules = dict(size=12, episode_steps=8)
    runs = {policy: list(client.rollout(num_mazes=24, policy=policy, rules=rules, seed=3))
            for policy in ("random", "oracle")}
    for episodes in runs.values():
        assert [(e.maze, e.member) for e in episodes] == [(b, 0) for b in range(24)]
        for e in episodes:
            assert len(e.actions) == len(e.rewards) == len(e.tiles_entered) == 8 and not e.logprobs
            assert e.episode_return == pytest.approx(sum(e.rewards), abs=1e-4)
            assert not e.token_ids
    assert _gold(runs["oracle"]) > 2 * _gold(runs["random"]) > 0
    # Seeded: the same request plays the same moves.
    again = list(client.rollout(num_mazes=24, policy="random", rules=rules, seed=3))
    assert [list(e.actions) for e in again] == [list(e.actions) for e in runs["random"]]


def _direct(server, seed, steering=None, num_envs=3):
    engine = server.server.engine
    config = MazeConfig(**RULES)
    table = MazeTokenTable.from_tokenizer(engine.tokenizer, config)
    return play_episodes(engine, table, MazeBatch(config, num_envs, seed=seed), RolloutConfig(0.0, seed),
                         steering=steering)


def _assert_equal(episodes, result):
    assert [list(e.actions) for e in episodes] == result.actions.tolist()
    assert [list(e.rewards) for e in episodes] == result.rewards.tolist()
    assert [list(e.tiles_entered) for e in episodes] == result.tiles_entered.tolist()
    assert [list(e.wind_from) for e in episodes] == result.wind_from.tolist()
    assert [list(e.token_ids) for e in episodes] == result.token_ids
    for e, logprobs in zip(episodes, result.logprobs.tolist()):
        assert list(e.logprobs) == pytest.approx(logprobs, abs=1e-5)


def test_greedy_model_rollout_equals_play_episodes(server, client):
    episodes = list(client.rollout(num_mazes=3, policy="model", temperature=0.0, rules=RULES, seed=7,
                                   include_tokens=True))
    _assert_equal(episodes, _direct(server, 7))

    # Steered by a registry record: as play_episodes with the record's row as the term's vector.
    row = torch.randn(64, generator=torch.Generator().manual_seed(5))
    record_id = client.put_vector(row, [1], name="push")
    steered = list(client.rollout(num_mazes=3, policy="model", temperature=0.0, rules=RULES, seed=7,
                                  include_tokens=True, steering=[client.term(record_id, layers=[1], coefficient=4.0)]))
    spec = SteeringSpec([SteeringTerm(row, [1], 4.0, SteerMode.ADD, "block_input")], Scope.ASSISTANT_AND_GENERATED)
    _assert_equal(steered, _direct(server, 7, spec))
    assert [list(e.logprobs) for e in steered] != [list(e.logprobs) for e in episodes]


def test_a_group_starts_from_one_maze_and_diverges(client, tokenizer):
    G = 3
    grouped = list(client.rollout(num_mazes=2, group_size=G, policy="random", rules=dict(size=12, episode_steps=6),
                                  seed=11, include_tokens=True))
    alone = list(client.rollout(num_mazes=2, policy="random", rules=dict(size=12, episode_steps=6), seed=11,
                                include_tokens=True))
    assert [(e.maze, e.member) for e in grouped] == [(b, g) for b in range(2) for g in range(G)]
    for b in range(2):
        members = grouped[b * G:(b + 1) * G]
        assert {_first_turn(tokenizer, e) for e in members} == {_first_turn(tokenizer, alone[b])}  # maze b's start
        assert len({tuple(e.actions) for e in members}) > 1  # then each goes its own way
    assert _first_turn(tokenizer, alone[0]) != _first_turn(tokenizer, alone[1])
    # The model plays groups too, each member with its own sampling seed.
    played = list(client.rollout(num_mazes=2, group_size=2, policy="model", rules=dict(size=12, episode_steps=3),
                                 seed=2, include_tokens=True))
    assert len(played) == 4 and all(len(e.logprobs) == 3 for e in played)
    assert _first_turn(tokenizer, played[0]) == _first_turn(tokenizer, played[1])


def _valid_actions(response, num_envs, turn):
    """A valid move per env, varied by turn (the neighbours list -1 outside the grid)."""
    neighbours = list(response.neighbours)
    out = []
    for i in range(num_envs):
        valid = [d for d in range(4) if neighbours[4 * i + d] >= 0]
        out.append(valid[(turn + i) % len(valid)])
    return out


def test_session_answers_equal_a_maze_batch_stepped_directly(client, tokenizer):
    rules, B, seed = dict(size=8, episode_steps=4, wind_prob=0.3), 3, 5
    batch = MazeBatch(MazeConfig(**rules, autoreset=True), B, seed=seed)
    table = MazeTokenTable.from_tokenizer(tokenizer, MazeConfig(**rules))

    def expect(response, result):
        if result is None:
            assert not response.rewards and not response.done
        else:
            assert list(response.rewards) == result.reward.tolist()
            assert list(response.tiles_entered) == result.tile_entered.tolist()
            assert list(response.done) == result.done.tolist()
        observation = batch.observe()
        assert list(response.neighbours) == observation.neighbours.flatten().tolist()
        assert list(response.positions) == observation.position.flatten().tolist()
        assert list(response.step_index) == observation.step_index.tolist()
        assert list(response.wind_from) == observation.wind_from.tolist()
        ids, lengths = batch.render_tokens(table)
        assert (response.max_len, response.pad_id) == (table.max_len, table.pad_id)
        assert list(response.token_ids) == ids.flatten().tolist()
        assert list(response.token_lengths) == lengths.tolist()

    with client.maze_session() as session:
        response = session.reset(B, seed=seed, rules=rules, render_tokens=True)
        expect(response, None)
        dones = 0
        for turn in range(10):  # across two episode ends: each env goes on in its next maze
            actions = _valid_actions(response, B, turn)
            response = session.step(actions)
            expect(response, batch.step(torch.tensor(actions, dtype=torch.int32)))
            dones += all(response.done)
        assert dones == 2
        # A reset starts over: the same mazes for the same seed.
        again = session.reset(B, seed=seed, rules=rules)
        fresh = MazeBatch(MazeConfig(**rules), B, seed=seed).observe()
        assert list(again.positions) == fresh.position.flatten().tolist()
        assert not again.token_ids


def test_refusals_name_their_field(server, client):
    rollout = lambda **kw: lambda: client.rollout(**{**dict(num_mazes=2, rules=RULES), **kw})  # noqa: E731
    sessions = server.server.engine.cfg.max_sessions
    cases = [
        (rollout(num_mazes=MAX_ENVS + 1, policy="random"), "num_mazes"),
        (rollout(num_mazes=MAX_ENVS // 2, group_size=3, policy="random"), "group_size"),
        (rollout(num_mazes=sessions + 1, policy="model"), "num_mazes"),  # one engine session per env
        (rollout(num_mazes=sessions, group_size=2, policy="model"), "group_size"),
        (rollout(num_mazes=0), "num_mazes"),
        (rollout(group_size=-1), "group_size"),
        (rollout(rules=dict(size=3)), "rules.size"),
        (rollout(rules=dict(wind_prob=1.5)), "rules.wind_prob"),
        (rollout(rules=dict(glyphs="runes")), "rules.glyphs"),
        (rollout(rules=dict(size=100, episode_steps=15)), "rules.episode_steps"),  # past max_context_len
        (rollout(seed=-1), "seed"),
        (rollout(temperature=-1.0), "temperature"),
        (rollout(policy="random", steering=[client.term("0123456789abcdef", layers=[1])]), "steering"),
        (rollout(steering=[client.term("0123456789abcdef", layers=[1])]), "steering.terms[0].vector_id"),
        (rollout(steering=[client.term(torch.ones(64), layers=[1], coefficient=float("nan"))]),
         "steering.terms[0].coefficient"),
        (lambda: client.maze.Rollout(maze_pb2.RolloutRequest(num_mazes=1, policy=9)), "policy"),
    ]
    for call, field in cases:
        assert _refused(call) == field

    def session(*commands):
        def run():
            with client.maze_session() as s:
                for command in commands:
                    command(s)
        return run

    reset = lambda **kw: lambda s: s.reset(**{**dict(num_envs=2, rules=dict(size=6, wind_prob=0.0,  # noqa: E731
                                                                             episode_steps=10)), **kw})
    north = lambda s: s.step([0, 0])  # noqa: E731
    cases = [
        (session(reset(num_envs=MAX_ENVS + 1)), "reset.num_envs"),
        (session(reset(num_envs=0)), "reset.num_envs"),
        (session(reset(seed=-2)), "reset.seed"),
        (session(reset(rules=dict(size=2000))), "reset.rules.size"),
        (session(north), "step"),
        (session(reset(), lambda s: s.step([0])), "step.actions"),
        (session(reset(), lambda s: s.step([0, 7])), "step.actions"),
        # Six moves north leave a 6x6 grid from any row.
        (session(reset(), *[north] * 6), "step.actions"),
        (session(lambda s: s._send(maze_pb2.SessionRequest())), "command"),
    ]
    for call, field in cases:
        assert _refused(call) == field
    with pytest.raises(grpc.RpcError) as off_grid:
        session(reset(), *[north] * 6)()
    assert "actions[0]=0 (N) would leave the grid" in off_grid.value.details()  # the env and its move named
    # The session that refused ended; a new one is fine.
    with client.maze_session() as s:
        assert len(s.reset(2, rules=dict(size=6)).positions) == 4
    assert server.server.state.admission.active == 0


def test_admission_and_cancellation_free_what_a_call_held(running_server):
    server = running_server(max_concurrent_requests=1, engine=dict(max_batch_slots=8, max_context_len=512))
    service_sessions = server.server.engine.sessions
    with WelfareClient(server.address) as client:
        with client.maze_session() as session:
            session.reset(2, rules=RULES)
            assert _refused(lambda: client.rollout(num_mazes=1, policy="random"),
                            grpc.StatusCode.RESOURCE_EXHAUSTED) == ""
        assert len(list(client.rollout(num_mazes=1, policy="random", rules=RULES))) == 1
        # A rollout past its deadline stops after its current turn and closes its engine sessions.
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as late:
            list(client.maze.Rollout(maze_pb2.RolloutRequest(num_mazes=8, rules=maze_pb2.MazeRules(**RULES)),
                                     timeout=0.05))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.time() + 20
        while (server.server.state.admission.active or service_sessions.sessions) and time.time() < deadline:
            time.sleep(0.02)
        assert server.server.state.admission.active == 0 and not service_sessions.sessions
        assert time.perf_counter() - started < 20
        # Every engine session is free again (the reservation goes when the worker's end reaches the loop).
        while True:
            try:
                assert len(list(client.rollout(num_mazes=8, policy="model", rules=RULES))) == 8
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.time() < deadline
                time.sleep(0.02)


def test_async_client(server):
    async def main():
        async with AsyncWelfareClient(server.address, timeout=60) as client:
            episodes = [e async for e in client.rollout(num_mazes=2, policy="oracle", rules=RULES, seed=1)]
            assert [e.maze for e in episodes] == [0, 1]
            async with client.maze_session() as session:
                first = await session.reset(2, rules=RULES, seed=1)
                moved = await session.step(_valid_actions(first, 2, 0))
                assert list(moved.step_index) == [1, 1]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with client.maze_session() as session:
                    await session.step([0, 0])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())
