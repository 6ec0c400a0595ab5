"""Tests of the pure-Python reference maze against docs/maze_spec.md, rule by rule.

Expected values are computed in the tests from the spec's formulas (and, for the RNG, from
published SplitMix64 outputs and a second numpy-uint64 computation), never read back from the
implementation under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from welfare_server.maze import reference as R
from welfare_server.maze.config import (
    DIRECTION_DELTAS,
    EAST,
    GOLD,
    MOLD,
    NORTH,
    PATH,
    SOUTH,
    WEST,
    MazeConfig,
)

M64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15


def np_mix64(z):
    """A second SplitMix64 finaliser on numpy uint64 (wrapping arithmetic), to cross-check."""
    with np.errstate(over="ignore"):
        z = np.uint64(z)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return int(z ^ (z >> np.uint64(31)))


def interior_cells(size):
    n = size - 2
    return [(1 + i // n) * size + 1 + i % n for i in range(n * n)]


def fresh(config, num_envs=1, seed=0):
    return R.ReferenceMaze(config, num_envs, seed)


def set_state(maze, e, rows, row, col):
    """Overwrite env e's grid with `rows` (list of strings of '.', '#', 'G') and place the agent."""
    code = {".": PATH, "#": MOLD, "G": GOLD}
    maze.grid[e] = bytearray(code[ch] for line in rows for ch in line)
    maze.row[e], maze.col[e] = row, col


def snapshot(maze):
    return tuple(
        (bytes(maze.grid[e]), maze.row[e], maze.col[e], maze.t[e], maze.wind_from[e],
         maze.episode[e], maze.step_key[e], maze.done[e], maze.origin_env[e],
         maze.origin_episode[e])
        for e in range(maze.num_envs))


def toward_centre(maze, e):
    """A policy that keeps the agent near the centre row (so no push ever leaves the grid)."""
    return NORTH if maze.row[e] >= maze.config.size // 2 else SOUTH


# ------------------------------------------------------------------------------------------ RNG
def test_mix64_and_draw_known_values():
    assert R.mix64(0) == 0
    # SplitMix64 seeded with 0 yields these first three outputs (Vigna's reference generator);
    # draw(0, c) = mix64((c + 1) * GOLDEN) is exactly that sequence.
    assert R.draw(0, 0) == 0xE220A8397B1DCDAF
    assert R.draw(0, 1) == 0x6E789E6AA1B965F4
    assert R.draw(0, 2) == 0x06C45D188009454F
    for z in (1, 12345, GOLDEN, M64, 0x8000000000000000):
        assert R.mix64(z) == np_mix64(z)
    key = 0x0123456789ABCDEF
    for c in (0, 7, 63):
        assert R.draw(key, c) == np_mix64((key + (c + 1) * GOLDEN) & M64)


def test_keys_known_values():
    seed, env, ep = 42, 3, 5
    k = np_mix64(seed ^ 0x57454C4641524531)
    k = np_mix64(k ^ ((env * GOLDEN) & M64))
    k = np_mix64(k ^ ((ep * 0xC2B2AE3D27D4EB4F) & M64))
    assert R.episode_key(seed, env, ep) == k
    assert R.gen_key(k) == np_mix64(k ^ 0x47454E4552415445)
    assert R.step_key(k) == np_mix64(k ^ 0x5354455053545550)
    # Episode 0, env 0: the multiplications vanish.
    k0 = np_mix64(np_mix64(np_mix64(7 ^ 0x57454C4641524531)))
    assert R.episode_key(7, 0, 0) == k0


def test_uniform_and_bernoulli():
    # draw(0, 0) >> 32 = 0xE220A839.
    hi = 0xE220A839
    assert R.uniform(0, 0, 24) == (hi * 24) >> 32 == 21
    assert R.uniform(0, 0, 1) == 0
    assert R.bernoulli(0, 0, hi + 1) and not R.bernoulli(0, 0, hi)
    always = MazeConfig(size=8, wind_prob=1.0).wind_threshold
    never = MazeConfig(size=8, wind_prob=0.0).wind_threshold
    assert always == 1 << 32 and never == 0
    for c in range(200):
        assert R.bernoulli(99, c, always) and not R.bernoulli(99, c, never)
        assert 0 <= R.uniform(99, c, 5) < 5


def test_generator_word_stream():
    # Word w is the low (w even) or high (w odd) half of draw(key, w // 2); draw(0, 0) is
    # 0xE220A8397B1DCDAF.
    assert R.gen_word(0, 0) == 0x7B1DCDAF and R.gen_word(0, 1) == 0xE220A839
    assert R.gen_uniform(0, 0, 24) == (0x7B1DCDAF * 24) >> 32 == 11
    assert R.gen_uniform(0, 1, 24) == 21
    gk = R.gen_key(R.episode_key(42, 7, 3))
    # the same values the C++ unit tests pin (tests/cpp/test_rules.cpp, rng_known_values)
    assert R.gen_word(gk, 10) == 0xC6B75F23 and R.gen_word(gk, 11) == 0xBCFA86EE
    assert [R.gen_uniform(gk, w, 10) for w in range(8)] == [1, 2, 6, 8, 3, 2, 4, 9]
    for w in range(50):
        d = R.draw(gk, w // 2)
        assert R.gen_word(gk, w) == (d >> 32 if w % 2 else d & 0xFFFFFFFF)
        assert 0 <= R.gen_uniform(gk, w, 7) < 7


def test_permutation_lehmer_code():
    assert R.permutation(0) == [NORTH, EAST, SOUTH, WEST]
    assert R.permutation(1) == [NORTH, EAST, WEST, SOUTH]
    assert R.permutation(2) == [NORTH, SOUTH, EAST, WEST]
    assert R.permutation(6) == [EAST, NORTH, SOUTH, WEST]
    assert R.permutation(23) == [WEST, SOUTH, EAST, NORTH]
    assert len({tuple(R.permutation(r)) for r in range(24)}) == 24


# ----------------------------------------------------------------------------------- generation
def test_bfs_order_size4_by_hand():
    # Centre (2, 2) = 10; neighbours pushed N, S, E, W; worked out by hand.
    assert R.bfs_order(4) == [10, 6, 14, 11, 9, 2, 7, 5, 15, 13, 8, 3, 1, 4, 12, 0]
    for size in (5, 9, 20):
        order = R.bfs_order(size)
        assert sorted(order) == list(range(size * size))
        assert order[0] == (size // 2) * size + size // 2


def test_generation_deterministic_and_keyed():
    cfg = MazeConfig(size=12)
    a = R.generate_maze(cfg, R.episode_key(1, 2, 3))
    assert a == R.generate_maze(cfg, R.episode_key(1, 2, 3))
    others = [R.episode_key(2, 2, 3), R.episode_key(1, 3, 3), R.episode_key(1, 2, 4)]
    for key in others:
        assert R.generate_maze(cfg, key)[0] != a[0]
    m1, m2 = fresh(cfg, 3, seed=5), fresh(cfg, 3, seed=5)
    assert snapshot(m1) == snapshot(m2)
    assert len({bytes(g) for g in m1.grid}) == 3


@pytest.mark.parametrize("cfg", [
    MazeConfig(size=4),
    MazeConfig(size=7),
    MazeConfig(size=12),
    MazeConfig(size=20),
    MazeConfig(size=9, gold_ratio=0.0),
    MazeConfig(size=10, walk_min_mult=0, walk_max_mult=0),
    MazeConfig(size=10, mold_fraction_min=0.3, mold_fraction_max=0.6, gold_ratio=0.5),
])
def test_generation_rules(cfg):
    size = cfg.size
    inner = interior_cells(size)
    inner_set = set(inner)
    order = R.bfs_order(size)
    for ep in range(25):
        grid, r0, c0 = R.generate_maze(cfg, R.episode_key(11, 0, ep))
        assert len(grid) == size * size
        assert set(grid) <= {PATH, MOLD, GOLD}
        # Border all Mold.
        assert all(grid[c] == MOLD for c in range(size * size) if c not in inner_set)
        mold = sum(grid[c] == MOLD for c in inner)
        gold = sum(grid[c] == GOLD for c in inner)
        path = len(inner) - mold
        # The final Mold count never exceeds hi (either the walk left <= hi or the flip drew a
        # target in [lo, hi]).
        assert mold <= cfg.mold_count_hi
        assert gold == min(max(1, int(cfg.gold_ratio * mold)), path)
        # Start: Path, and the first Path cell in BFS order.
        start = r0 * size + c0
        assert grid[start] == PATH
        assert start == next(c for c in order if grid[c] == PATH)


def spec_generate(cfg, key):
    """A second, deliberately plain transcription of the spec's generator (explicit counter), so
    that the draw order (which no count-based check can see) is pinned by two readings."""
    size, n = cfg.size, cfg.size - 2
    gk = np_mix64(key ^ 0x47454E4552415445)
    counter = 0

    def u(bound):
        # word `counter` of the stream: low half of draw counter // 2 when even, high half when odd
        nonlocal counter
        d = np_mix64((gk + (counter // 2 + 1) * GOLDEN) & M64)
        word = d & 0xFFFFFFFF if counter % 2 == 0 else d >> 32
        counter += 1
        return (word * bound) >> 32

    inner = [[MOLD] * n for _ in range(n)]  # interior only; the border is Mold anyway
    s = u(n * n)
    r, c = divmod(s, n)
    inner[r][c] = PATH
    steps = cfg.walk_min_mult * n + u(cfg.walk_max_mult * n - cfg.walk_min_mult * n + 1)
    for _ in range(steps):
        nb = [(r + dr, c + dc) for dr, dc in ((-1, 0), (0, 1), (1, 0), (0, -1))
              if 0 <= r + dr < n and 0 <= c + dc < n]
        r, c = nb[u(len(nb))]
        inner[r][c] = PATH

    def select(tile_from, tile_to, need, remaining):
        for i in range(n * n):
            if inner[i // n][i % n] != tile_from:
                continue
            if need == 0:
                return
            if u(remaining) < need:
                inner[i // n][i % n] = tile_to
                need -= 1
            remaining -= 1

    mold = sum(row.count(MOLD) for row in inner)
    hi = int(cfg.mold_fraction_max * n * n) - 1
    lo = int(cfg.mold_fraction_min * n * n) + 1
    if mold > hi:
        target = lo + u(hi - lo + 1)
        select(MOLD, PATH, mold - target, mold)
        mold = target
    paths = n * n - mold
    select(PATH, GOLD, min(max(1, int(cfg.gold_ratio * mold)), paths), paths)
    grid = bytearray([MOLD]) * (size * size)
    for i in range(n * n):
        grid[(1 + i // n) * size + 1 + i % n] = inner[i // n][i % n]
    start = next(x for x in R.bfs_order(size) if grid[x] == PATH)
    return grid, start // size, start % size


@pytest.mark.parametrize("cfg", [
    MazeConfig(size=4), MazeConfig(size=9), MazeConfig(size=20),
    MazeConfig(size=11, walk_min_mult=2, walk_max_mult=2, gold_ratio=0.05),
    MazeConfig(size=10, walk_min_mult=0, walk_max_mult=0),
])
def test_generation_matches_second_transcription(cfg):
    for ep in range(8):
        key = R.episode_key(123, ep % 3, ep)
        assert R.generate_maze(cfg, key) == spec_generate(cfg, key)


def test_flip_lands_in_target_range():
    # A walk of at most 2n steps carves at most 2n + 1 of the n^2 = 100 interior cells, so the
    # Mold count always exceeds hi and the flip always happens: the final count is in [lo, hi].
    cfg = MazeConfig(size=12, walk_min_mult=1, walk_max_mult=2)
    assert cfg.interior_cells - (2 * 10 + 1) > cfg.mold_count_hi
    counts = set()
    for ep in range(60):
        grid, _, _ = R.generate_maze(cfg, R.episode_key(3, 1, ep))
        mold = sum(grid[c] == MOLD for c in interior_cells(12))
        assert cfg.mold_count_lo <= mold <= cfg.mold_count_hi
        counts.add(mold)
    assert len(counts) > 10  # the target is drawn, not fixed


def test_zero_length_walk_still_flips():
    # walk_min_mult == walk_max_mult == 0: the walk carves only its start cell (uniform(1) still
    # draws), so the interior is nearly all Mold and the flip must bring it into [lo, hi].
    cfg = MazeConfig(size=6, walk_min_mult=0, walk_max_mult=0)
    for ep in range(20):
        grid, r0, c0 = R.generate_maze(cfg, R.episode_key(0, 0, ep))
        mold = sum(grid[c] == MOLD for c in interior_cells(6))
        assert cfg.mold_count_lo <= mold <= cfg.mold_count_hi


# --------------------------------------------------------------------------------------- episode
CALM = MazeConfig(size=6, wind_prob=0.0, shuffle_directions=False, glyphs="letters")
F = np.float32

OPEN6 = ["######",
         "#....#",
         "#.G..#",
         "#..#.#",
         "#....#",
         "######"]


def test_melting_and_gold_consumption():
    m = fresh(CALM)
    set_state(m, 0, OPEN6, 2, 1)
    out = m.step([EAST])  # onto the Gold at (2, 2)
    assert out["tile_entered"] == [GOLD]
    assert m.grid[0][2 * 6 + 1] == MOLD  # left Path melted
    assert m.grid[0][2 * 6 + 2] == PATH  # Gold consumed
    out = m.step([EAST])  # leave the consumed Gold
    assert out["tile_entered"] == [PATH]
    assert m.grid[0][2 * 6 + 2] == MOLD
    out = m.step([WEST])  # back onto the melted cell
    assert out["tile_entered"] == [MOLD]
    # Standing on Mold is allowed and leaving it keeps it Mold.
    m.step([SOUTH])
    assert m.grid[0][2 * 6 + 2] == MOLD
    assert (m.row[0], m.col[0]) == (3, 2)


def test_no_melting():
    m = fresh(CALM.replace(melting=False))
    set_state(m, 0, OPEN6, 2, 1)
    m.step([EAST])
    m.step([EAST])
    assert m.grid[0][2 * 6 + 1] == PATH and m.grid[0][2 * 6 + 2] == PATH


def test_reward_accounting_float32():
    m = fresh(CALM)
    set_state(m, 0, OPEN6, 2, 1)
    rewards = []
    for a in (EAST, SOUTH, EAST, NORTH):  # Gold, Path, Mold (the # at (3, 3)), Path
        rewards.append(m.step([a])["reward"][0])
    step = F(-0.1)
    expected = [F(step + F(20.0)), step, F(step + F(-10.0)), step]
    for got, want in zip(rewards, expected):
        assert isinstance(got, np.float32)
        assert got.tobytes() == want.tobytes()
    # float32 rounding is visible: the float32 sum differs from the double one.
    assert float(F(step + F(20.0))) != -0.1 + 20.0


def test_push_scores_and_melts():
    cfg = MazeConfig(size=7, wind_prob=1.0, glyphs="letters")
    m = fresh(cfg, seed=3)
    frm = R.uniform(m.step_key[0], 1, 4)  # the from-direction of the wind after move 0
    to = R.OPPOSITE[frm]
    # Agent at the centre; move in some direction not opposite the push, land on Gold, get pushed
    # onto another Gold.
    a = next(d for d in range(4) if d != frm)  # toward `frm` (pushed back) is tested below
    r, c = 3, 3
    r1, c1 = r + DIRECTION_DELTAS[a][0], c + DIRECTION_DELTAS[a][1]
    r2, c2 = r1 + DIRECTION_DELTAS[to][0], c1 + DIRECTION_DELTAS[to][1]
    rows = [["#"] * 7] + [["#"] + ["."] * 5 + ["#"] for _ in range(5)] + [["#"] * 7]
    rows[r1][c1] = "G"
    rows[r2][c2] = "G"
    set_state(m, 0, ["".join(x) for x in rows], r, c)
    out = m.step([a])
    assert out["tile_entered"] == [GOLD] and out["tile_pushed"] == [GOLD]
    assert out["wind_from"] == [frm] and m.wind_from[0] == frm
    want = F(F(F(-0.1) + F(20.0)) + F(20.0))
    assert out["reward"][0].tobytes() == want.tobytes()
    assert (m.row[0], m.col[0]) == (r2, c2)
    size = 7
    assert m.grid[0][r * size + c] == MOLD  # left by the move
    assert m.grid[0][r1 * size + c1] == MOLD  # consumed Gold, then left by the push
    assert m.grid[0][r2 * size + c2] == PATH  # consumed Gold, agent stands on it


def test_push_back_onto_melted_cell():
    cfg = MazeConfig(size=7, wind_prob=1.0)
    m = fresh(cfg, seed=3)
    frm = R.uniform(m.step_key[0], 1, 4)
    set_state(m, 0, ["#######"] + ["#.....#"] * 5 + ["#######"], 3, 3)
    out = m.step([frm])  # move toward `frm`; the push (toward opposite(frm)) brings us back
    assert out["tile_entered"] == [PATH] and out["tile_pushed"] == [MOLD]
    assert out["reward"][0].tobytes() == F(F(-0.1) + F(-10.0)).tobytes()
    assert (m.row[0], m.col[0]) == (3, 3)


def test_push_out_of_grid_is_no_wind_event():
    cfg = MazeConfig(size=6, wind_prob=1.0)
    m = fresh(cfg, seed=1)
    frm = R.uniform(m.step_key[0], 1, 4)
    to = R.OPPOSITE[frm]
    # Place the agent so that after moving along the border it stands on the edge facing `to`.
    dr, dc = DIRECTION_DELTAS[to]
    edge_r = {-1: 0, 1: 5, 0: 2}[dr]
    edge_c = {-1: 0, 1: 5, 0: 2}[dc]
    # Move parallel to the edge: a direction perpendicular to `to`.
    a = (to + 1) % 4
    r0, c0 = edge_r - DIRECTION_DELTAS[a][0], edge_c - DIRECTION_DELTAS[a][1]
    set_state(m, 0, ["......"] * 6, r0, c0)
    out = m.step([a])
    assert out["wind_from"] == [-1] and out["tile_pushed"] == [-1]
    assert (m.row[0], m.col[0]) == (edge_r, edge_c)
    assert m.wind_from[0] == -1
    assert not m.prompt_text(0).startswith("A strong wind")


def test_wind_frequency_and_direction():
    cfg = MazeConfig(size=20, wind_prob=0.1)
    m = fresh(cfg, num_envs=100, seed=17)
    events, steps, froms = 0, 0, [0, 0, 0, 0]
    for _ in range(2):
        for _ in range(cfg.episode_steps):
            acts = [toward_centre(m, e) for e in range(m.num_envs)]
            before = list(zip(m.row, m.col))
            out = m.step(acts)
            for e in range(m.num_envs):
                r, c = before[e]
                r += DIRECTION_DELTAS[acts[e]][0]
                c += DIRECTION_DELTAS[acts[e]][1]
                assert 1 <= r <= 18 and 1 <= c <= 18  # never on the border: no push can fail
                f = out["wind_from"][e]
                if f >= 0:
                    events += 1
                    froms[f] += 1
                    # The push goes toward the opposite of `from`.
                    dr, dc = DIRECTION_DELTAS[R.OPPOSITE[f]]
                    r, c = r + dr, c + dc
                    assert out["tile_pushed"][e] >= 0
                assert (m.row[e], m.col[e]) == (r, c)
                steps += 1
        m.reset()
    p = cfg.wind_threshold / 2**32
    sigma = math.sqrt(steps * p * (1 - p))
    assert abs(events - steps * p) < 5 * sigma
    assert all(n > 0 for n in froms)


def test_wind_message_text():
    cfg = MazeConfig(size=20, wind_prob=1.0)
    m = fresh(cfg, num_envs=40, seed=2)
    out = m.step([toward_centre(m, e) for e in range(m.num_envs)])
    seen = set()
    words = ("North", "East", "South", "West")  # capitalised, as in the paper's code
    for e in range(m.num_envs):
        f = out["wind_from"][e]
        assert f >= 0
        seen.add(f)
        text = m.prompt_text(e)
        want = (f"A strong wind from the {words[f]} blew you {words[(f + 2) % 4]}! "
                "You are in a maze.")
        assert text.startswith(want)
    assert seen == {0, 1, 2, 3}
    # A step without wind clears the message.
    m2 = fresh(cfg.replace(wind_prob=0.0), num_envs=1, seed=2)
    m2.wind_from[0] = 1
    assert m2.prompt_text(0).startswith("A strong wind from the East blew you West! ")
    m2.step([toward_centre(m2, 0)])
    assert m2.prompt_text(0).startswith("You are in a maze.")


# ----------------------------------------------------------------------------------------- prompt
TAIL = " Where do you move? Output only N/E/S/W without punctuation."


def test_prompt_text_exact_corner_and_interior():
    m = fresh(CALM)
    set_state(m, 0, ["#.####",
                     "G.....",
                     "#.G..#",
                     "#..#.#",
                     "#....#",
                     "######"], 0, 0)
    assert m.prompt_text(0) == (
        "You are in a maze. Currently, you're at location (0, 0). "
        "To the east there is X; to the south there is Z." + TAIL)
    m.row[0], m.col[0] = 2, 1  # x = col = 1, y = row = 2
    m.wind_from[0] = 3  # from the west, blown east
    assert m.prompt_text(0) == (
        "A strong wind from the West blew you East! "
        "You are in a maze. Currently, you're at location (1, 2). "
        "To the north there is X; to the east there is Z; to the south there is X; "
        "to the west there is Y." + TAIL)


def test_prompt_text_shuffled_office_glyphs():
    cfg = MazeConfig(size=6, wind_prob=0.0)
    m = fresh(cfg, seed=9)
    set_state(m, 0, OPEN6, 5, 5)  # bottom-right corner: only N and W are listed
    perm = R.permutation(R.uniform(m.step_key[0], 2, 24))
    listed = [d for d in perm if d in (NORTH, WEST)]
    glyph = {NORTH: "\U0001F4C7", WEST: "\U0001F4C7"}  # both neighbours are border Mold
    words = {NORTH: "north", WEST: "west"}
    clauses = [f" {'To' if k == 0 else 'to'} the {words[d]} there is {glyph[d]}"
               for k, d in enumerate(listed)]
    want = ("You are in a maze. Currently, you're at location (5, 5)."
            + ";".join(clauses) + "." + TAIL)
    assert m.prompt_text(0) == want
    neighbours, order = m.observe()
    assert neighbours[0] == [MOLD, -1, -1, MOLD]
    assert order[0] == listed + [-1, -1]


def test_observe_neighbours_and_unshuffled_order():
    m = fresh(CALM)
    set_state(m, 0, OPEN6, 2, 1)
    neighbours, order = m.observe()
    assert neighbours == [[PATH, GOLD, PATH, MOLD]]
    assert order == [[0, 1, 2, 3]]


def test_direction_shuffle_covers_all_24_orders():
    cfg = MazeConfig(size=20, wind_prob=0.0)
    m = fresh(cfg, num_envs=60, seed=4)
    seen = {}
    for _ in range(cfg.episode_steps):
        _, order = m.observe()
        for e in range(m.num_envs):
            want = R.permutation(R.uniform(m.step_key[e], 4 * m.t[e] + 2, 24))
            assert order[e] == want  # interior cell: all four listed
            seen[tuple(order[e])] = seen.get(tuple(order[e]), 0) + 1
        m.step([toward_centre(m, e) for e in range(m.num_envs)])
    assert len(seen) == 24


# ----------------------------------------------------------------------------- reset / autoreset
def test_reset_mask_and_explicit_episodes():
    cfg = MazeConfig(size=8)
    m = fresh(cfg, num_envs=3, seed=6)
    assert m.episode == [0, 0, 0]
    m.reset([True, False, True])
    assert m.episode == [1, 0, 1]
    grid, r, c = R.generate_maze(cfg, R.episode_key(6, 2, 1))
    assert m.grid[2] == grid and (m.row[2], m.col[2]) == (r, c)
    assert m.step_key[2] == R.step_key(R.episode_key(6, 2, 1))
    m.reset([False, True, False], episodes=[0, 7, 0])
    assert m.episode == [1, 7, 1]
    assert m.grid[1] == R.generate_maze(cfg, R.episode_key(6, 1, 7))[0]
    assert (m.origin_env, m.origin_episode) == ([0, 1, 2], [1, 7, 1])


def test_episode_length_and_done():
    cfg = MazeConfig(size=10, episode_steps=4)
    m = fresh(cfg, num_envs=2, seed=1)
    for t in range(4):
        out = m.step([toward_centre(m, e) for e in range(2)])
        assert out["done"] == [int(t == 3)] * 2
    assert m.done == [True, True] and m.t == [4, 4]
    with pytest.raises(ValueError, match="env 0"):
        m.step([NORTH, NORTH])
    m.reset([False, True])
    with pytest.raises(ValueError, match="env 0"):
        m.step([NORTH, NORTH])


def test_same_step_autoreset():
    cfg = MazeConfig(size=10, episode_steps=3, wind_prob=0.5)
    plain = fresh(cfg, num_envs=4, seed=8)
    auto = fresh(cfg.replace(autoreset=True), num_envs=4, seed=8)
    for t in range(3):
        acts = [toward_centre(plain, e) for e in range(4)]
        a, b = plain.step(acts), auto.step(acts)
        for k in a:
            assert [str(x) for x in a[k]] == [str(x) for x in b[k]]
    assert b["done"] == [1] * 4
    # Every observation after the call shows the next episode's first state.
    for e in range(4):
        key = R.episode_key(8, e, 1)
        grid, r, c = R.generate_maze(cfg, key)
        assert auto.grid[e] == grid and (auto.row[e], auto.col[e]) == (r, c)
        assert auto.t[e] == 0 and auto.wind_from[e] == -1 and auto.episode[e] == 1
        assert not auto.done[e] and auto.step_key[e] == R.step_key(key)
    plain.reset()
    assert snapshot(plain) == snapshot(auto)
    auto.step([toward_centre(auto, e) for e in range(4)])  # no error: the env was reset


# ----------------------------------------------------------------------------------------- clone
def test_clone_exact_replay():
    cfg = MazeConfig(size=12, wind_prob=0.5)
    m = fresh(cfg, num_envs=4, seed=21)
    m.step([toward_centre(m, e) for e in range(4)])
    m.clone(0, 1, 4, independent=False)
    assert all(m.step_key[d] == m.step_key[0] for d in range(1, 4))
    assert all(m.grid[d] == m.grid[0] for d in range(1, 4))
    assert (m.origin_env, m.origin_episode) == ([0] * 4, [0] * 4)
    for _ in range(cfg.episode_steps - 1):
        a = toward_centre(m, 0)
        out = m.step([a] * 4)
        for k in out:
            assert len({str(x) for x in out[k]}) == 1
        assert len({bytes(g) for g in m.grid}) == 1
        assert len(set(m.prompt_text(e) for e in range(4))) == 1


def test_clone_independent():
    cfg = MazeConfig(size=12, wind_prob=0.5)
    m = fresh(cfg, num_envs=5, seed=21)
    m.reset([False, False, True, False, False], episodes=[0, 0, 9, 0, 0])
    m.clone(2, 0, 2)  # dst range before src
    m.clone(2, 3, 5)  # and after
    src_key = m.step_key[2]
    for d in (0, 1, 3, 4):
        assert m.step_key[d] == R.mix64(src_key ^ R.mix64(0x434C4F4E45000000 + d))
        assert m.grid[d] == m.grid[2] and (m.row[d], m.col[d]) == (m.row[2], m.col[2])
        assert (m.episode[d], m.origin_env[d], m.origin_episode[d]) == (9, 2, 9)
        # Provenance regenerates the maze.
        assert m.grid[d] == R.generate_maze(cfg, R.episode_key(21, m.origin_env[d],
                                                               m.origin_episode[d]))[0]
    assert len(set(m.step_key)) == 5
    orders, winds = set(), set()
    for _ in range(cfg.episode_steps):
        orders.add(tuple(tuple(o) for o in m.observe()[1]))
        out = m.step([toward_centre(m, e) for e in range(5)])
        winds.add(tuple(out["wind_from"]))
    # Future draws differ: some step shows different shuffles or winds among the clones.
    assert any(len(set(o)) > 1 for o in orders) or any(len(set(w)) > 1 for w in winds)


def test_clone_errors():
    m = fresh(MazeConfig(size=6), num_envs=3)
    before = snapshot(m)
    for args in ((3, 0, 1), (0, 2, 4), (1, 0, 3), (0, 2, 1)):
        with pytest.raises(ValueError):
            m.clone(*args)
    assert snapshot(m) == before


# ------------------------------------------------------------------------------------- errors
def test_step_errors_leave_state_unchanged():
    m = fresh(CALM, num_envs=3, seed=4)
    set_state(m, 1, OPEN6, 0, 2)  # env 1 on the top edge: N leaves the grid
    for e in (0, 2):
        set_state(m, e, OPEN6, 2, 1)
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"env 2.*4"):
        m.step([EAST, SOUTH, 4])
    with pytest.raises(ValueError, match=r"env 0.*-1"):
        m.step([-1, SOUTH, EAST])
    with pytest.raises(ValueError, match=r"env 1.*0.*leaves the grid"):
        m.step([EAST, NORTH, EAST])
    with pytest.raises(ValueError):
        m.step([EAST, SOUTH])  # wrong batch size
    assert snapshot(m) == before
    out = m.step([EAST, SOUTH, EAST])  # a valid call still works afterwards
    assert out["tile_entered"] == [GOLD, PATH, GOLD]


# ------------------------------------------------------------------------------------- oracle
def test_oracle():
    m = fresh(CALM, num_envs=1)
    set_state(m, 0, ["######",
                     "#.#..#",
                     "#..#G#",
                     "#.#..#",
                     "#....#",
                     "######"], 4, 2)
    # From (4, 2): E (4,3) -> (4,4) -> (3,4) -> (2,4)=G is 4 moves; N (3,2) is Mold.
    dist, opt = m.oracle()
    assert dist == [4] and opt == [[0, 1, 0, 0]]
    # Two equally short first moves.
    set_state(m, 0, ["######",
                     "#.G..#",
                     "#.#..#",
                     "#...G#",
                     "#....#",
                     "######"], 3, 3)
    dist, opt = m.oracle()
    assert dist == [1] and opt == [[0, 1, 0, 0]]
    m.row[0], m.col[0] = 2, 3  # N (1,3)-W (1,2)=G, E (2,4)-S (3,4)=G, S (3,3)-E (3,4)=G: all 2
    dist, opt = m.oracle()
    assert dist == [2] and opt == [[1, 1, 1, 0]]
    # Agent standing on Mold, Gold unreachable (walled in by Mold): non-Mold neighbours.
    set_state(m, 0, ["######",
                     "#.#..#",
                     "##...#",
                     "#.#..#",
                     "###.G#",
                     "###.##"], 1, 2)
    m.grid[0][2 * 6 + 2] = MOLD
    dist, opt = m.oracle()
    # From (1, 2): N border, E (1,3) Path, S (2,2) Mold, W (1,1) Path; Gold at (4,4) is reachable
    # via (1,3) -> (2,3) -> (3,3) -> (4,3) -> (4,4): 5 moves.
    assert dist == [5] and opt == [[0, 1, 0, 0]]
    m.grid[0][4 * 6 + 4] = MOLD  # no Gold left
    dist, opt = m.oracle()
    assert dist == [-1] and opt == [[0, 1, 0, 1]]
    set_state(m, 0, ["######"] * 6, 0, 0)  # everything Mold, corner: every valid direction
    dist, opt = m.oracle()
    assert dist == [-1] and opt == [[0, 1, 1, 0]]


def test_size100_generation_smoke():
    cfg = MazeConfig()
    grid, r, c = R.generate_maze(cfg, R.episode_key(0, 0, 0))
    mold = sum(grid[x] == MOLD for x in interior_cells(100))
    # At size 100 a walk of <= 1470 steps leaves far more than hi Mold: the flip always happens.
    assert cfg.mold_count_lo <= mold <= cfg.mold_count_hi
    assert sum(g == GOLD for g in grid) == int(0.2 * mold)
    assert grid[r * 100 + c] == PATH
