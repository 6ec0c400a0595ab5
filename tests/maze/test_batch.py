"""MazeBatch's Python face: config validation, bad inputs, token rendering, gym adapter."""

import numpy as np
import pytest
import torch

from welfare_server.maze import GOLD, MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.maze import text as T
from welfare_server.maze.reference import ReferenceMaze


@pytest.mark.parametrize("field,value,fragment", [
    ("size", 3, "size=3 is out of bounds [4, 1000]"),
    ("size", 1001, "size=1001 is out of bounds"),
    ("size", 10.0, "size must be an int"),
    ("episode_steps", 0, "episode_steps=0 is out of bounds"),
    ("wind_prob", 1.5, "wind_prob=1.5 is out of bounds [0.0, 1.0]"),
    ("wind_prob", float("nan"), "wind_prob=nan"),
    ("mold_reward", float("inf"), "mold_reward=inf"),
    ("walk_max_mult", 2, "walk_max_mult=2 is out of bounds [5, 1000]"),
    ("mold_fraction_max", 0.05, "mold_fraction_max=0.05 is out of bounds [0.1, 1.0]"),
    ("glyphs", "emoji", "glyphs must be one of"),
    ("melting", 1, "melting must be a bool"),
    ("gold_ratio", 1.5, "gold_ratio=1.5 is out of bounds [0.0, 1.0]"),
])
def test_config_rejects_out_of_range_fields(field, value, fragment):
    with pytest.raises(ValueError, match="MazeConfig." + field) as error:
        MazeConfig(**{field: value})
    assert fragment in str(error.value)


def test_config_rejects_gold_that_could_cover_every_path_cell():
    with pytest.raises(ValueError, match="MazeConfig.gold_ratio=1.0: .* no start cell"):
        MazeConfig(gold_ratio=1.0, mold_fraction_max=0.6)
    with pytest.raises(ValueError, match="MazeConfig.mold_fraction_min/max: the Mold count range"):
        MazeConfig(size=4, mold_fraction_min=0.5, mold_fraction_max=0.6)


def test_config_derives_the_papers_bounds():
    config = MazeConfig()
    assert config.interior_cells == 98 * 98
    assert (config.mold_count_lo, config.mold_count_hi) == (int(0.1 * 9604) + 1, int(0.5 * 9604) - 1)
    assert config.wind_threshold == int(0.1 * 2**32)
    assert MazeConfig(wind_prob=1.0).wind_threshold == 2**32


def test_batch_rejects_bad_arguments():
    config = MazeConfig(size=10)
    with pytest.raises(ValueError, match="num_envs"):
        MazeBatch(config, 0)
    with pytest.raises(ValueError, match="max_state_bytes"):
        MazeBatch(MazeConfig(size=100, max_state_bytes=1 << 20), 1000)
    with pytest.raises(ValueError, match="seed"):
        MazeBatch(config, 2, seed=-1)
    with pytest.raises(ValueError, match="device"):
        MazeBatch(config, 2, device="meta")


def test_step_rejects_bad_actions_and_changes_nothing():
    config = MazeConfig(size=6, wind_prob=0.5)
    batch = MazeBatch(config, 4, seed=3)
    before = batch.grids.clone(), batch.row.clone(), batch.col.clone(), batch.step_index.clone()
    with pytest.raises(ValueError, match=r"actions must have shape \[4\]"):
        batch.step(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="actions must hold integers"):
        batch.step(torch.zeros(4))
    with pytest.raises(ValueError, match="actions is on meta, the batch is on cpu"):
        batch.step(torch.zeros(4, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"actions\[2\]=7"):
        batch.step(torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"actions\[0\]=-1"):
        batch.step(torch.tensor([-1, 1, 1, 2]))
    assert all(torch.equal(x, y) for x, y in zip(before, (batch.grids, batch.row, batch.col, batch.step_index)))


def test_step_into_a_direction_that_leaves_the_grid_is_refused():
    # size 4, no wind: the agent starts on row 1 or 2 and reaches row 0 by going north.
    batch = MazeBatch(MazeConfig(size=4, wind_prob=0.0), 1, seed=3)
    while batch.row[0] > 0:
        batch.step(torch.tensor([0]))
    snapshot = batch.grids.clone(), batch.row.clone(), batch.step_index.clone()
    assert not batch.observe().valid[0, 0]
    with pytest.raises(ValueError, match=r"actions\[0\]=0"):
        batch.step(torch.tensor([0]))
    assert torch.equal(batch.grids, snapshot[0]) and torch.equal(batch.row, snapshot[1])
    assert torch.equal(batch.step_index, snapshot[2])


def test_stepping_a_finished_episode_is_an_error_without_autoreset():
    config = MazeConfig(size=8, episode_steps=2, wind_prob=0.0)
    batch = MazeBatch(config, 2, seed=1)
    for _ in range(2):
        valid = batch.observe().valid
        batch.step(valid.int().argmax(dim=1))
    assert batch.done.tolist() == [1, 1]
    with pytest.raises(ValueError, match="reset"):
        batch.step(batch.observe().valid.int().argmax(dim=1))
    batch.reset()
    assert batch.episode.tolist() == [1, 1] and batch.step_index.tolist() == [0, 0]


def test_clone_rejects_bad_ranges():
    batch = MazeBatch(MazeConfig(size=8), 6, seed=1)
    for args in [(6, 0, 2), (0, 3, 7), (2, 1, 4), (0, 4, 2)]:
        with pytest.raises(ValueError):
            batch.clone(*args)
    with pytest.raises(ValueError, match="src must be an int"):
        batch.clone(1.0, 2, 3)


def test_same_seed_same_mazes_other_seed_differs():
    config = MazeConfig(size=30)
    first, again, other = (MazeBatch(config, 8, seed=s) for s in (7, 7, 8))
    assert torch.equal(first.grids, again.grids)
    assert not torch.equal(first.grids, other.grids)
    # Each env's maze depends on its index too, and on the episode index.
    assert not torch.equal(first.grids[0], first.grids[1])
    before = first.grids.clone()
    first.reset()
    assert not torch.equal(first.grids, before)


def tokenized_turn(tokenizer, table, text):
    """tokenizer(...) of a whole user turn: the chat wrapper around the prompt text."""
    prefix = tokenizer.decode(table.fragment_ids[T.TURN_PREFIX])
    suffix = tokenizer.decode(table.fragment_ids[T.TURN_SUFFIX])
    return tokenizer(prefix + text + suffix, add_special_tokens=False)["input_ids"]


def test_render_tokens_equal_real_tokenizer_ids(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    for glyphs in ("office", "dessert", "letters"):
        config = MazeConfig(size=100, glyphs=glyphs, wind_prob=0.5)
        table = MazeTokenTable.from_tokenizer(tokenizer, config)
        batch = MazeBatch(config, 24, seed=4)
        ref = ReferenceMaze(config, 24, 4)
        rng = np.random.default_rng(0)
        for t in range(6):
            ids, lengths = batch.render_tokens(table)
            for i in range(batch.num_envs):
                want = tokenized_turn(tokenizer, table, ref.prompt_text(i))
                got = ids[i, : lengths[i]].tolist()
                assert got == want, f"{glyphs} step {t} env {i}"
                assert (ids[i, lengths[i]:] == table.pad_id).all()
            valid = batch.observe().valid.numpy()
            actions = (rng.random(valid.shape) + valid).argmax(axis=1)
            batch.step(torch.from_numpy(actions))
            ref.step(actions.tolist())


def test_token_table_refuses_a_non_compositional_tokenizer():
    class CharPairTokenizer:
        """Merges character pairs across fragment boundaries: concatenation is not compositional."""

        pad_token_id, eos_token_id = 0, 0

        def __call__(self, texts, add_special_tokens=False):
            def encode(text):
                return [hash(text[i:i + 2]) % 50000 + 1 for i in range(0, len(text), 2)]
            if isinstance(texts, str):
                return {"input_ids": encode(texts)}
            return {"input_ids": [encode(t) for t in texts]}

    with pytest.raises(ValueError, match="does not tokenize maze prompts"):
        MazeTokenTable.from_tokenizer(CharPairTokenizer(), MazeConfig(size=10), chat_wrapper=False)


def test_render_tokens_rejects_bad_buffers(smollm2_tokenizer):
    config = MazeConfig(size=10)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 3)
    with pytest.raises(ValueError, match="out must have shape"):
        batch.render_tokens(table, out=torch.empty(3, table.max_len - 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must have dtype"):
        batch.render_tokens(table, out=torch.empty(3, table.max_len, dtype=torch.int64))
    with pytest.raises(ValueError, match="table was built for another MazeConfig"):
        MazeBatch(MazeConfig(size=11), 3).render_tokens(table)


def test_following_the_oracle_shortens_the_distance_to_gold():
    # Without wind a move along a shortest path to Gold shortens it by one (melting only closes
    # cells behind the agent, which a shortest path never revisits); distance 1 means Gold next.
    batch = MazeBatch(MazeConfig(size=20, wind_prob=0.0), 32, seed=2)
    checked = 0
    for _ in range(batch.config.episode_steps):
        dist, optimal = (x.clone() for x in batch.oracle())  # the next oracle() overwrites them
        valid = batch.observe().valid
        assert (optimal.any(dim=1)).all() and not (optimal & ~valid).any()
        result = batch.step(optimal.int().argmax(dim=1))
        new_dist, _ = batch.oracle()
        for i in range(batch.num_envs):
            if dist[i] == 1:
                assert result.tile_entered[i] == GOLD
                checked += 1
            elif dist[i] > 1:
                assert new_dist[i] == dist[i] - 1
                checked += 1
    assert checked > 100


def test_gym_adapter_steps_and_autoresets(smollm2_tokenizer):
    from welfare_server.maze.gym_env import MazeVectorEnv

    config = MazeConfig(size=12, episode_steps=3, autoreset=True)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    env = MazeVectorEnv(config, 5, seed=1, token_table=table)
    obs, info = env.reset(seed=1)
    assert obs["tokens"].shape == (5, table.max_len)
    for t in range(3):
        actions = info["action_mask"].argmax(axis=1)
        obs, reward, terminated, truncated, info = env.step(actions)
        assert reward.dtype == np.float32 and not truncated.any()
    assert terminated.all() and "final_obs" in info
    assert (obs["step_index"] == 0).all()  # already in the next episode
    assert env.observation_space.contains(obs)


def test_gym_final_observation_is_not_overwritten_by_the_reset(smollm2_tokenizer):
    from welfare_server.maze.gym_env import MazeVectorEnv

    config = MazeConfig(size=12, episode_steps=2, autoreset=True)
    env = MazeVectorEnv(config, 3, seed=2)
    obs, info = env.reset(seed=2)
    for _ in range(2):
        obs, _, terminated, _, info = env.step(info["action_mask"].argmax(axis=1))
    assert (info["final_obs"]["step_index"] == 2).all()
    assert (obs["step_index"] == 0).all()


def test_sixty_five_thousand_envs_step_and_render(smollm2_tokenizer):
    # The issue asks for B up to at least 65536; a small grid keeps the test cheap.
    config = MazeConfig(size=10, autoreset=True)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 65536, seed=1)
    for _ in range(config.episode_steps + 1):
        batch.step(batch.observe().valid.int().argmax(dim=1))
    ids, lengths = batch.render_tokens(table)
    assert (lengths > 40).all() and (lengths <= table.max_len).all()
    assert (batch.episode == 1).all() and (batch.step_index == 1).all()
    # Spot-check a far env against the pure-Python prompt of the same state.
    i = 65535
    assert ids[i, : lengths[i]].tolist() == tokenized_turn(smollm2_tokenizer, table, batch.render_text([i])[0])


def test_batch_calls_release_the_gil():
    # While a long reset runs in C++ on another thread, this thread keeps running Python. With the
    # GIL held it could not take a single timestamp inside the call (a C call is never preempted).
    import sys
    import threading
    import time

    batch = MazeBatch(MazeConfig(size=100), 40000, seed=1, num_threads=1)
    finished, spans, stamps = threading.Event(), [], []

    def work():
        for _ in range(3):
            started = time.perf_counter()
            batch.reset()
            spans.append((started, time.perf_counter()))
        finished.set()

    worker = threading.Thread(target=work)
    worker.start()
    count = 0
    while not finished.is_set():
        count += 1
        if count % 100 == 0:
            stamps.append(time.perf_counter())
    worker.join()
    # The worker may lose the GIL for a switch interval between taking a timestamp and entering
    # the call (and after leaving it): only stamps well inside a span count. (Checked: a call
    # that holds the GIL, such as sum(range(10**7)), leaves 0 stamps inside; sleep leaves 44k.)
    margin = 2.5 * sys.getswitchinterval()
    inside = sum(1 for t in stamps for a, b in spans if a + margin < t < b - margin)
    assert all(b - a > 4 * margin for a, b in spans)
    assert inside > 10


def test_wind_message_is_capitalised_in_text_and_tokens(smollm2_tokenizer):
    # The paper's code writes "A strong wind from the North blew you South! "; the clauses' words
    # stay lowercase. Text (render_text), token ids (C++ fragments) and the real tokenizer agree.
    config = MazeConfig(size=12, wind_prob=1.0)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 32, seed=5)
    batch.step(batch.observe().valid.int().argmax(dim=1))
    names = ("North", "East", "South", "West")
    texts = batch.render_text()
    ids, lengths = batch.render_tokens(table)
    winds = batch.wind_from.tolist()
    assert any(w >= 0 for w in winds)
    for i, (text, wind) in enumerate(zip(texts, winds)):
        if wind >= 0:
            assert text.startswith(f"A strong wind from the {names[wind]} blew you {names[(wind + 2) % 4]}! "
                                   "You are in a maze.")
        else:
            assert text.startswith("You are in a maze.")
        assert not any(f"o the {name} there" in text for name in names)  # clause words stay lowercase
        assert ids[i, : lengths[i]].tolist() == tokenized_turn(smollm2_tokenizer, table, text)


# ---- the output rule (MazeBatch's docstring): a returned tensor is the batch's buffer for that
# method, overwritten in place by the next call of the same method and by nothing else.

def _clones(obj):
    return {name: value.clone() for name, value in vars(obj).items()}


def _unchanged(obj, snapshot):
    return all(torch.equal(getattr(obj, name), value) for name, value in snapshot.items())


def test_a_kept_step_result_changes_only_at_the_next_step(smollm2_tokenizer):
    config = MazeConfig(size=12, episode_steps=3, wind_prob=0.5)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 16, seed=3)
    kept = batch.step(batch.observe().valid.int().argmax(dim=1))
    assert kept.done.dtype == torch.bool
    snapshot = _clones(kept)
    batch.observe()
    batch.render_text()
    batch.render_tokens(table)
    batch.oracle()
    batch.clone(0, 1, 4)
    assert _unchanged(kept, snapshot)
    pointers = {name: value.data_ptr() for name, value in vars(kept).items()}
    rng = torch.Generator().manual_seed(0)
    changed = False
    for _ in range(2):  # to the episode's end: done flips to True in place
        valid = batch.observe().valid
        result = batch.step((torch.rand(16, 4, generator=rng) + valid).argmax(dim=1))
        assert {name: value.data_ptr() for name, value in vars(result).items()} == pointers
        changed |= not _unchanged(kept, snapshot)
    assert changed and kept.done.all()
    batch.reset()  # reset writes no step output
    assert kept.done.all()


def test_a_kept_observation_changes_only_at_the_next_observe(smollm2_tokenizer):
    config = MazeConfig(size=12, wind_prob=1.0)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 16, seed=4)
    kept = batch.observe()
    snapshot = _clones(kept)
    assert kept.step_index.eq(0).all()
    batch.step(kept.valid.int().argmax(dim=1))
    batch.render_text()  # reads the state through buffers of its own
    batch.render_tokens(table)
    batch.oracle()
    assert _unchanged(kept, snapshot)  # a snapshot: the live step index has moved on
    assert batch.step_index.eq(1).all() and not torch.equal(batch.wind_from, kept.wind_from)
    again = batch.observe()
    assert again is kept or all(getattr(again, n).data_ptr() == getattr(kept, n).data_ptr() for n in snapshot)
    assert kept.step_index.eq(1).all() and torch.equal(kept.wind_from, batch.wind_from)
    assert torch.equal(kept.position, torch.stack([batch.col, batch.row], dim=1))
    assert torch.equal(kept.valid, kept.neighbours.ge(0))


def test_kept_tokens_and_oracle_change_only_at_their_next_call(smollm2_tokenizer):
    config = MazeConfig(size=12, wind_prob=0.0)
    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    batch = MazeBatch(config, 8, seed=6)
    ids, lengths = batch.render_tokens(table)
    dist, optimal = batch.oracle()
    kept = ids.clone(), lengths.clone(), dist.clone(), optimal.clone()
    batch.step(optimal.int().argmax(dim=1))
    batch.observe()
    batch.render_text()
    assert all(torch.equal(a, b) for a, b in zip((ids, lengths, dist, optimal), kept))
    ids2, lengths2 = batch.render_tokens(table)
    dist2, optimal2 = batch.oracle()
    assert ids2.data_ptr() == ids.data_ptr() and dist2.data_ptr() == dist.data_ptr()
    assert not torch.equal(ids, kept[0])  # the prompts moved with the agents
    # a caller's own buffers are written and returned instead
    out = torch.full_like(ids, -5)
    mine, _ = batch.render_tokens(table, out=out)
    assert mine is out and torch.equal(out, ids2)


def test_b1_calls_take_int32_actions_as_they_are():
    # The B=1 fast path must still refuse what the general path refuses.
    batch = MazeBatch(MazeConfig(size=8, wind_prob=0.0), 1, seed=2)
    action = batch.observe().valid.int().argmax(dim=1).to(torch.int32)
    batch.step(action)
    with pytest.raises(ValueError, match=r"actions must have shape \[1\]"):
        batch.step(torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="actions must have shape"):
        batch.step(torch.zeros(2, dtype=torch.int32)[::2][:0])
    strided = torch.zeros(2, dtype=torch.int32)[::2]  # shape [1], contiguous by torch's rule
    strided[0] = int(batch.observe().valid.int().argmax())
    batch.step(strided)


def test_no_simd_forces_the_portable_generator_with_the_same_mazes():
    # WS_NO_SIMD=1 (read once, at the first generation) picks the portable routine; the mazes are
    # bitwise those of the SIMD routine this CPU runs by default (on a CPU without one, both runs
    # are portable and the test still checks the switch).
    import os
    import subprocess
    import sys

    script = ("import torch, sys\n"
              "from welfare_server import _maze_core as core\n"
              "from welfare_server.maze import MazeBatch, MazeConfig\n"
              "b = MazeBatch(MazeConfig(size=67, autoreset=True), 6, seed=11)\n"
              "b.reset()\n"
              "sys.stdout.write(core.cpu_sampler_name() + ' ' + ','.join(core.cpu_supported_routines()) + ' '\n"
              "                 + b.grids.flatten().numpy().tobytes().hex() + ' ' + str(b.row.tolist()))\n")
    runs = {}
    for flag in ("0", "1"):
        env = {**os.environ, "WS_NO_SIMD": flag}
        runs[flag] = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                    check=True).stdout.split(" ", 3)
    default, forced = runs["0"], runs["1"]
    supported = default[1].split(",")
    assert forced[0] == "portable" and default[0] == supported[-1] and supported[0] == "portable"
    assert default[2:] == forced[2:]
