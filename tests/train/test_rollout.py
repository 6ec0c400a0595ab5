"""Maze rollouts with a causal LM: the reference (HF forward, batched, cached, padded) equals one plain
forward per env; the engine rollout (sessions, allowed-token moves, steering) equals the reference."""

import pytest
import torch

from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.train.rollout import RolloutConfig, reference_rollout as rollout


@pytest.fixture(scope="module")
def tiny_llama():
    from welfare_server.model.loading import load_model

    return load_model("tiny-llama", dtype="float32", device="cpu").model.eval()


def masked_choice(logits, valid, action_ids):
    move = logits[action_ids].masked_fill(~valid, float("-inf"))
    return int(move.argmax()), torch.log_softmax(move, dim=-1)


@pytest.mark.parametrize("wind_prob", [0.0, 0.6])
def test_greedy_rollout_equals_unbatched_forward(tiny_llama, smollm2_tokenizer, wind_prob):
    config = MazeConfig(size=12, episode_steps=5, wind_prob=wind_prob)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    maze = MazeBatch(config, 5, seed=3)
    result = rollout(tiny_llama, table, maze, RolloutConfig(temperature=0.0))
    replay = MazeBatch(config, 5, seed=3)  # the same mazes, to read the valid masks turn by turn
    action_ids = torch.tensor(table.action_token_ids)
    messages = [[] for _ in range(maze.num_envs)]
    for t in range(config.episode_steps):
        valid = replay.observe().valid
        texts = replay.render_text()
        for i in range(maze.num_envs):
            position = result.answer_positions[i][t]
            context = torch.tensor([result.token_ids[i][:position]])
            with torch.no_grad():
                logits = tiny_llama(context).logits[0, -1]
            choice, log_probs = masked_choice(logits, valid[i], action_ids)
            assert result.actions[i, t] == choice, f"env {i} step {t}"
            assert result.token_ids[i][position] == table.action_token_ids[choice]
            assert torch.allclose(result.logprobs[i, t], log_probs[choice], atol=1e-4)
            # The user turn before the answer is the maze's own prompt text.
            assert texts[i] in smollm2_tokenizer.decode(result.token_ids[i][:position])
            messages[i] += [{"role": "user", "content": texts[i]},
                            {"role": "assistant", "content": "NESW"[choice]}]
        replay.step(result.actions[:, t])
    # The whole multi-turn conversation is exactly what the tokenizer's chat template makes of it.
    for i in range(maze.num_envs):
        templated = smollm2_tokenizer.apply_chat_template(messages[i], tokenize=True, return_dict=False)
        assert list(templated) == result.token_ids[i]
    assert torch.equal(result.returns, result.rewards.sum(dim=1))


def test_sampled_rollout_is_seeded_and_respects_the_mask(tiny_llama, smollm2_tokenizer):
    config = MazeConfig(size=6, episode_steps=6)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    runs = [rollout(tiny_llama, table, MazeBatch(config, 6, seed=1), RolloutConfig(temperature=1.0, seed=s))
            for s in (4, 4, 5)]
    assert torch.equal(runs[0].actions, runs[1].actions)
    assert not torch.equal(runs[0].actions, runs[2].actions)
    assert (runs[0].logprobs <= 0).all() and torch.isfinite(runs[0].logprobs).all()


def test_rollout_needs_fresh_episodes(tiny_llama, smollm2_tokenizer):
    config = MazeConfig(size=6, episode_steps=3, wind_prob=0.0)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    maze = MazeBatch(config, 2)
    maze.step(maze.observe().valid.int().argmax(dim=1))
    with pytest.raises(ValueError, match="step 0"):
        rollout(tiny_llama, table, maze)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=-1.0)


# ---------------------------------------------------------------- through the engine
from welfare_server.kernels import SteerMode  # noqa: E402
from welfare_server.model.engine import Engine, EngineConfig, Scope, SteeringSpec, SteeringTerm  # noqa: E402
from welfare_server.model.hf_reference import hook_steering  # noqa: E402
from welfare_server.model.steering import prompt_steer_mask  # noqa: E402
from welfare_server.train.rollout import generation_header_ids, play_episodes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_loaded():
    from welfare_server.model.loading import load_model

    return load_model("tiny-llama", dtype="float32", device="cpu")


def _engine(loaded, envs, **kw):
    return Engine(loaded, EngineConfig(max_batch_slots=envs, max_context_len=kw.pop("ctx", 1024), **kw))


def _same_episodes(got, want, atol):
    assert torch.equal(got.actions, want.actions)
    assert got.token_ids == want.token_ids and got.answer_positions == want.answer_positions
    for name in ("rewards", "tiles_entered", "tiles_pushed", "wind_from"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_engine_rollout_equals_the_reference_greedily(tiny_llama, tiny_loaded, smollm2_tokenizer, static):
    config = MazeConfig(size=12, episode_steps=6, wind_prob=0.5)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    want = rollout(tiny_llama, table, MazeBatch(config, 5, seed=3), RolloutConfig(temperature=0.0))
    turns = []
    got = play_episodes(_engine(tiny_loaded, 5, static_decode=static), table, MazeBatch(config, 5, seed=3),
                        RolloutConfig(temperature=0.0), on_turn=turns.append)
    _same_episodes(got, want, atol=1e-4)
    assert turns == list(range(6)) and (got.wind_from >= 0).any()  # winds blew: pushes were replayed too


def test_sampled_engine_rollout_is_seeded_masked_and_batch_invariant(tiny_loaded, smollm2_tokenizer):
    config = MazeConfig(size=6, episode_steps=6)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    eng = _engine(tiny_loaded, 6)
    runs = [play_episodes(eng, table, MazeBatch(config, n, seed=1), RolloutConfig(temperature=1.0, seed=s))
            for n, s in ((6, 4), (6, 4), (6, 5), (2, 4))]
    assert torch.equal(runs[0].actions, runs[1].actions) and not torch.equal(runs[0].actions, runs[2].actions)
    # Env i's maze and move seeds depend on i alone: the first two envs play the same with 2 or 6 envs.
    assert torch.equal(runs[3].actions, runs[0].actions[:2])
    assert (runs[0].logprobs <= 0).all() and torch.isfinite(runs[0].logprobs).all()
    replay = MazeBatch(config, 6, seed=1)
    for t in range(config.episode_steps):  # every move was a valid one
        assert replay.observe().valid[torch.arange(6), runs[0].actions[:, t]].all()
        replay.step(runs[0].actions[:, t])
    assert eng.num_running == 0 and not eng.sessions.sessions  # sessions closed at the end


def test_steered_rollout_steers_assistant_and_generated_tokens_as_hooks_do(tiny_llama, tiny_loaded,
                                                                           smollm2_tokenizer):
    """The engine's steered move equals a hook-steered HF forward over the same conversation, with
    the paper's scope: assistant-turn tokens (generation headers, previous answers, end-of-turn ids)
    steered, system and user tokens not."""
    config = MazeConfig(size=10, episode_steps=4, wind_prob=0.0)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    D = tiny_loaded.config.hidden_size
    v = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 6
    spec = SteeringSpec([SteeringTerm(v, [1, 2], 1.0, SteerMode.ADD)], Scope.ASSISTANT_AND_GENERATED)
    steered = play_episodes(_engine(tiny_loaded, 3), table, MazeBatch(config, 3, seed=7),
                            RolloutConfig(temperature=0.0), steering=spec)
    plain = play_episodes(_engine(tiny_loaded, 3), table, MazeBatch(config, 3, seed=7), RolloutConfig(temperature=0.0))
    assert not torch.equal(steered.logprobs, plain.logprobs)
    header = generation_header_ids(smollm2_tokenizer)
    action_ids = torch.tensor(table.action_token_ids)
    replay = MazeBatch(config, 3, seed=7)
    for t in range(config.episode_steps):
        valid = replay.observe().valid
        for i in range(3):
            position = steered.answer_positions[i][t]
            ctx = steered.token_ids[i][:position]
            roles = _roles(ctx, steered.answer_positions[i][:t], len(table.conversation_prefix_ids),
                           table.assistant_end_ids, header)
            mask = prompt_steer_mask(Scope.ASSISTANT_AND_GENERATED, roles, len(ctx))
            with torch.inference_mode(), hook_steering(tiny_llama, [spec], [mask], len(ctx)):
                logits = tiny_llama(torch.tensor([ctx])).logits[0, -1]
            choice, log_probs = masked_choice(logits, valid[i], action_ids)
            assert steered.actions[i, t] == choice
            assert torch.allclose(steered.logprobs[i, t], log_probs[choice], atol=1e-4)
        replay.step(steered.actions[:, t])


def _roles(ctx, answers, n_prefix, end_ids, header):
    roles = ["system"] * n_prefix + ["user"] * (len(ctx) - n_prefix)
    for a in answers:  # each previous answer token, and the end-of-turn ids after it
        roles[a] = "generated"
        for k in range(len(end_ids)):
            roles[a + 1 + k] = "assistant"
    for k in range(len(header)):  # the generation prompt before each answer
        for a in answers + [len(ctx)]:
            roles[a - 1 - k] = "assistant"
    return roles


def test_engine_rollout_refuses_an_engine_too_small(tiny_loaded, smollm2_tokenizer):
    config = MazeConfig(size=6, episode_steps=15)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    with pytest.raises(ValueError, match="num_envs=3 needs one engine session per env; the engine has max_sessions=2"):
        play_episodes(_engine(tiny_loaded, 2), table, MazeBatch(config, 3))
    with pytest.raises(ValueError, match="more than the engine's max_context_len=256"):
        play_episodes(_engine(tiny_loaded, 3, ctx=256), table, MazeBatch(config, 3))


@pytest.mark.real_model
def test_engine_rollout_equals_the_reference_on_the_bundled_model(smollm2_tokenizer):
    """The paper's maze (100x100, 15 moves, wind), the real SmolLM2 in fp32: same moves and
    conversations, log-probs within 1e-3."""
    from welfare_server.model.loading import load_model

    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    config = MazeConfig()
    table = MazeTokenTable.from_tokenizer(loaded.tokenizer, config)
    want = rollout(loaded.model, table, MazeBatch(config, 2, seed=11), RolloutConfig(temperature=0.0))
    got = play_episodes(_engine(loaded, 2, ctx=2048), table, MazeBatch(config, 2, seed=11),
                        RolloutConfig(temperature=0.0))
    _same_episodes(got, want, atol=1e-3)
