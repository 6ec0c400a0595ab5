"""Fixtures of the trainer tests: a small TrainConfig on the tiny random Llama preset."""

import pytest

TINY_RUN = dict(model="tiny-llama", device="cpu", dtype="float32", steps=2, groups_per_step=2, group_size=2,
                lora_rank=4, lora_alpha=8.0, lr=1e-2, micro_batch_size=4, eval_episodes=4, eval_every=0,
                checkpoint_every=0, progress=False, seed=5)
"""A run that takes about a second per step on one core: 2 mazes x 2 episodes of 3 moves on a
12 x 12 grid (TINY_MAZE), LoRA rank 4, fp32 on the CPU."""

TINY_MAZE = dict(size=12, episode_steps=3)


def tiny_config(out_dir, maze=None, **overrides):
    from welfare_server.maze import MazeConfig
    from welfare_server.train.config import TrainConfig

    maze = MazeConfig(**TINY_MAZE) if maze is None else maze
    return TrainConfig(**dict(TINY_RUN, out_dir=str(out_dir), maze=maze, **overrides))


@pytest.fixture(scope="session")
def make_tiny_config():
    """tiny_config itself (out_dir, maze=None, **overrides), for fixtures wider than one test."""
    return tiny_config


@pytest.fixture
def tiny_train_config(tmp_path):
    """tiny_train_config(**overrides) -> TrainConfig writing under tmp_path/run (out_dir overrides)."""

    def make(**overrides):
        out_dir = overrides.pop("out_dir", tmp_path / "run")
        return tiny_config(out_dir, **overrides)

    return make
