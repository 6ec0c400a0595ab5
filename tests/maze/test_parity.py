"""Bit-for-bit parity of the C++ core (MazeBatch) with the independent pure-Python reference.

Over 1000+ seeded episodes with random valid actions, on varied configs: grids, positions, rewards
(float32 bits), tiles, wind events, prompt texts, observations, episode indices, clone and oracle.
"""

import numpy as np
import pytest
import torch

from welfare_server.maze import MazeBatch, MazeConfig
from welfare_server.maze.reference import ReferenceMaze

# (config, num_envs, seed): sizes from the smallest legal grid up; wind made frequent in some so that
# pushes, push rewards and wind messages are exercised often.
CASES = [
    (MazeConfig(size=4), 40, 1),
    (MazeConfig(size=5, wind_prob=0.5), 40, 2),
    (MazeConfig(size=7, wind_prob=1.0, glyphs="letters"), 40, 3),
    (MazeConfig(size=9, melting=False, wind_prob=0.3), 40, 4),
    (MazeConfig(size=12, shuffle_directions=False, glyphs="dessert"), 40, 5),
    (MazeConfig(size=16, episode_steps=30, wind_prob=0.25), 40, 6),
    (MazeConfig(size=23, gold_ratio=0.5, mold_fraction_min=0.3, mold_fraction_max=0.45), 40, 7),
    (MazeConfig(size=31, walk_min_mult=0, walk_max_mult=2, step_reward=-0.37, mold_reward=-3.3,
                gold_reward=7.7), 40, 8),
    (MazeConfig(size=40, wind_prob=0.0), 30, 2**64 - 1),
    (MazeConfig(size=100), 6, 0),
]


def assert_same_state(batch: MazeBatch, ref: ReferenceMaze, where: str) -> None:
    B, S = batch.num_envs, batch.config.size
    grids = batch.grids.reshape(B, S * S).tolist()
    for i in range(B):
        assert bytes(grids[i]) == bytes(ref.grid[i]), f"{where}: grid of env {i} differs"
    assert batch.row.tolist() == list(ref.row), f"{where}: rows differ"
    assert batch.col.tolist() == list(ref.col), f"{where}: cols differ"
    assert batch.step_index.tolist() == list(ref.t), f"{where}: step indices differ"
    assert batch.wind_from.tolist() == list(ref.wind_from), f"{where}: wind messages differ"
    assert batch.episode.tolist() == list(ref.episode), f"{where}: episode indices differ"
    neighbours, order = ref.observe()
    observed = batch.observe()
    assert observed.neighbours.tolist() == neighbours, f"{where}: neighbours differ"
    assert observed.order.tolist() == order, f"{where}: prompt orders differ"
    assert batch.render_text() == [ref.prompt_text(i) for i in range(B)], f"{where}: prompts differ"


def random_valid_actions(rng: np.random.Generator, batch: MazeBatch) -> np.ndarray:
    valid = batch.observe().valid.numpy()
    scores = rng.random(valid.shape) + valid  # valid directions score >= 1, the rest < 1
    return scores.argmax(axis=1).astype(np.int32)


def play_and_compare(batch: MazeBatch, ref: ReferenceMaze, rng: np.random.Generator, tag: str) -> None:
    for t in range(batch.config.episode_steps):
        actions = random_valid_actions(rng, batch)
        got = batch.step(torch.from_numpy(actions))
        want = ref.step(actions.tolist())
        where = f"{tag} step {t}"
        # float32 bit patterns: exact equality, not a tolerance.
        assert got.reward.numpy().view(np.int32).tolist() == \
            np.asarray(want["reward"], dtype=np.float32).view(np.int32).tolist(), f"{where}: rewards differ"
        assert got.tile_entered.tolist() == list(want["tile_entered"]), f"{where}: tiles entered differ"
        assert got.tile_pushed.tolist() == list(want["tile_pushed"]), f"{where}: pushed tiles differ"
        assert got.wind_from.tolist() == list(want["wind_from"]), f"{where}: wind events differ"
        assert got.done.tolist() == [bool(d) for d in want["done"]], f"{where}: done flags differ"
        assert_same_state(batch, ref, where)


@pytest.mark.parametrize("config,num_envs,seed", CASES, ids=[f"size{c.size}" for c, _, _ in CASES])
def test_core_matches_reference(config, num_envs, seed):
    rng = np.random.default_rng(seed % 2**32)
    batch = MazeBatch(config, num_envs, seed=seed)
    ref = ReferenceMaze(config, num_envs, seed)
    assert_same_state(batch, ref, "initial reset")
    episodes = 0
    for round_index in range(3):
        play_and_compare(batch, ref, rng, f"round {round_index}")
        episodes += num_envs
        if round_index == 0:
            mask = rng.random(num_envs) < 0.5
            mask[0] = True
            batch.reset(torch.from_numpy(mask))
            ref.reset(mask.tolist())
            # Envs left out of the reset are done; only the reset ones may step again.
            assert_same_state(batch, ref, "partial reset")
            batch.reset(torch.from_numpy(~mask))
            ref.reset((~mask).tolist())
        else:
            batch.reset()
            ref.reset()
        assert_same_state(batch, ref, f"reset after round {round_index}")
    dist, optimal = batch.oracle()
    want_dist, want_optimal = ref.oracle()
    assert dist.tolist() == want_dist
    assert optimal.int().tolist() == want_optimal


def test_parity_covers_a_thousand_episodes():
    # Each case plays 3 rounds of num_envs episodes (see test_core_matches_reference).
    assert sum(3 * num_envs for _, num_envs, _ in CASES) >= 1000


@pytest.mark.parametrize("independent", [True, False])
def test_clone_matches_reference(independent):
    config = MazeConfig(size=11, wind_prob=0.5)
    rng = np.random.default_rng(11)
    batch, ref = MazeBatch(config, 12, seed=5), ReferenceMaze(config, 12, 5)
    for _ in range(4):
        actions = random_valid_actions(rng, batch)
        batch.step(torch.from_numpy(actions))
        ref.step(actions.tolist())
    batch.clone(3, 6, 12, independent=independent)
    ref.clone(3, 6, 12, independent=independent)
    assert_same_state(batch, ref, "after clone")
    assert batch.origin_env.tolist() == list(ref.origin_env)
    assert batch.origin_episode.tolist() == list(ref.origin_episode)
    play_remaining = config.episode_steps - 4
    for t in range(play_remaining):
        actions = random_valid_actions(rng, batch)
        batch.step(torch.from_numpy(actions))
        ref.step(actions.tolist())
        assert_same_state(batch, ref, f"clone step {t}")


def test_autoreset_matches_reference():
    config = MazeConfig(size=8, episode_steps=5, autoreset=True, wind_prob=0.4)
    rng = np.random.default_rng(3)
    batch, ref = MazeBatch(config, 16, seed=9), ReferenceMaze(config, 16, 9)
    for t in range(12):  # crosses two episode boundaries without any reset call
        actions = random_valid_actions(rng, batch)
        got = batch.step(torch.from_numpy(actions))
        want = ref.step(actions.tolist())
        assert got.done.tolist() == [bool(d) for d in want["done"]]
        assert got.reward.tolist() == [float(r) for r in want["reward"]]
        assert_same_state(batch, ref, f"autoreset step {t}")
    assert batch.episode.tolist() == [2] * 16


def random_config(rng: np.random.Generator) -> MazeConfig:
    """A random legal config: every numeric rule field varied within its bounds."""
    while True:
        lo = float(rng.uniform(0.0, 0.6))
        try:
            return MazeConfig(
                size=int(rng.integers(4, 41)), episode_steps=int(rng.integers(1, 25)),
                wind_prob=float(rng.choice([0.0, 1.0, rng.uniform()])), melting=bool(rng.integers(2)),
                step_reward=float(rng.uniform(-2, 1)), mold_reward=float(rng.uniform(-30, 5)),
                gold_reward=float(rng.uniform(-5, 40)), walk_min_mult=int(rng.integers(0, 6)),
                walk_max_mult=int(rng.integers(6, 20)), mold_fraction_min=lo,
                mold_fraction_max=float(rng.uniform(lo, 1.0)), gold_ratio=float(rng.uniform(0, 0.6)),
                glyphs=str(rng.choice(["office", "dessert", "letters"])),
                shuffle_directions=bool(rng.integers(2)), autoreset=bool(rng.integers(2)))
        except ValueError:
            continue  # e.g. an empty Mold range on a small grid: draw again


def test_core_matches_reference_on_random_configs():
    rng = np.random.default_rng(2026)
    for case in range(40):
        config = random_config(rng)
        seed = int(rng.integers(0, 2**63))
        batch, ref = MazeBatch(config, 6, seed=seed), ReferenceMaze(config, 6, seed)
        assert_same_state(batch, ref, f"random case {case} ({config}) initial")
        for t in range(config.episode_steps + 2 if config.autoreset else config.episode_steps):
            actions = random_valid_actions(rng, batch)
            got, want = batch.step(torch.from_numpy(actions)), ref.step(actions.tolist())
            assert got.reward.numpy().view(np.int32).tolist() == \
                np.asarray(want["reward"], dtype=np.float32).view(np.int32).tolist(), f"case {case} step {t}"
            assert_same_state(batch, ref, f"random case {case} step {t}")
        assert batch.oracle()[0].tolist() == ref.oracle()[0]
