"""Maze rollouts with a causal LM: the batched, cached, padded loop equals one plain forward per env."""

import pytest
import torch

from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.train.rollout import RolloutConfig, rollout


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
