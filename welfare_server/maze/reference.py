"""Independent pure-Python reference of the maze (docs/maze_spec.md), the oracle for the C++ core.

Written from the spec alone, never from the C++ sources, so that a misreading of the spec shows up
as a disagreement instead of being copied. Clarity beats speed here: the RNG uses Python ints with
explicit 64-bit masks, rewards are summed in numpy float32 (each addition rounded to float32, in the
spec's order) so that sums match the C++ core bit for bit. Per-env state is kept in plain lists.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np

from welfare_server.maze.config import (
    DIRECTION_DELTAS,
    DIRECTION_WORDS,
    GOLD,
    MOLD,
    PATH,
    MazeConfig,
)

MASK64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15

# Salts of the key derivations (ASCII tags, see the spec).
_SEED_SALT = 0x57454C4641524531  # "WELFARE1"
_EPISODE_MULT = 0xC2B2AE3D27D4EB4F
_GEN_SALT = 0x47454E4552415445  # "GENERATE"
_STEP_SALT = 0x5354455053545550  # "STEPSTUP"
_CLONE_SALT = 0x434C4F4E45000000  # "CLONE\0\0\0"

# Per-step slots of the episode stream: counter = 4 * t + slot.
SLOT_WIND, SLOT_WIND_FROM, SLOT_SHUFFLE = 0, 1, 2

# Opposite direction: N<->S, E<->W.
OPPOSITE = (2, 3, 0, 1)


# --------------------------------------------------------------------------------------------- RNG
def mix64(z: int) -> int:
    """SplitMix64 finaliser on an unsigned 64-bit integer."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def episode_key(seed: int, env: int, episode: int) -> int:
    """Key of env `env`'s episode `episode` under `seed`: any maze is regenerated from these."""
    k = mix64((seed & MASK64) ^ _SEED_SALT)
    k = mix64(k ^ ((env * GOLDEN) & MASK64))
    return mix64(k ^ ((episode * _EPISODE_MULT) & MASK64))


def gen_key(k: int) -> int:
    """The maze generator's stream key of episode key k."""
    return mix64(k ^ _GEN_SALT)


def step_key(k: int) -> int:
    """The episode's per-step stream key of episode key k."""
    return mix64(k ^ _STEP_SALT)


def draw(key: int, counter: int) -> int:
    """The 64-bit draw at address (key, counter)."""
    return mix64((key + (counter + 1) * GOLDEN) & MASK64)


def uniform(key: int, counter: int, n: int) -> int:
    """Integer in [0, n) from the high 32 bits of the draw (multiply-shift, n < 2^32)."""
    return ((draw(key, counter) >> 32) * n) >> 32


def bernoulli(key: int, counter: int, threshold: int) -> bool:
    """True with probability threshold / 2^32 (threshold = config.wind_threshold)."""
    return (draw(key, counter) >> 32) < threshold


def gen_word(key: int, w: int) -> int:
    """Word w of the generator's 32-bit word stream: the low (w even) or high (w odd) half of
    draw(key, w // 2)."""
    return (draw(key, w >> 1) >> (32 * (w & 1))) & 0xFFFFFFFF


def gen_uniform(key: int, w: int, n: int) -> int:
    """Integer in [0, n) from word w of the generator's stream (multiply-shift, n < 2^32)."""
    return (gen_word(key, w) * n) >> 32


class _Stream:
    """The generator's running counter over gen_key's word stream: one word per uniform, from 0."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.counter = 0

    def uniform(self, n: int) -> int:
        value = gen_uniform(self.key, self.counter, n)
        self.counter += 1
        return value


# ------------------------------------------------------------------------------------- generation
@lru_cache(maxsize=None)
def _bfs_order_cached(size: int) -> tuple[int, ...]:
    centre = (size // 2) * size + size // 2
    seen = bytearray(size * size)
    seen[centre] = 1
    queue = deque([centre])
    order = []
    # Neighbours pushed in the order N, S, E, W (DESIGN.md), not the N, E, S, W of actions.
    nsew = (DIRECTION_DELTAS[0], DIRECTION_DELTAS[2], DIRECTION_DELTAS[1], DIRECTION_DELTAS[3])
    while queue:
        cell = queue.popleft()
        order.append(cell)
        r, c = divmod(cell, size)
        for dr, dc in nsew:
            nr, nc = r + dr, c + dc
            if 0 <= nr < size and 0 <= nc < size:
                nxt = nr * size + nc
                if not seen[nxt]:
                    seen[nxt] = 1  # marked when enqueued: each cell visited exactly once
                    queue.append(nxt)
    return tuple(order)


def bfs_order(size: int) -> list[int]:
    """Cell indices in BFS visiting order from (size//2, size//2), neighbours pushed N, S, E, W."""
    return list(_bfs_order_cached(size))


def _select(grid: bytearray, cells: list[int], need: int, new_tile: int, rng: _Stream) -> None:
    """Knuth's Algorithm S: turn exactly `need` of `cells` (in increasing index) into new_tile."""
    remaining = len(cells)
    for cell in cells:
        if need == 0:
            break  # no draw once the selection is complete
        if rng.uniform(remaining) < need:
            grid[cell] = new_tile
            need -= 1
        remaining -= 1


def generate_maze(config: MazeConfig, key: int) -> tuple[bytearray, int, int]:
    """The maze of episode key `key` (= episode_key(seed, env, episode)).

    Returns (grid as a row-major bytearray of size*size tile codes, start_row, start_col).
    """
    size = config.size
    n = size - 2
    interior = n * n
    rng = _Stream(gen_key(key))
    grid = bytearray([MOLD]) * (size * size)

    def cell_of(i: int) -> int:
        return (1 + i // n) * size + (1 + i % n)

    # Random walk over the interior, carving Path.
    pos = rng.uniform(interior)
    grid[cell_of(pos)] = PATH
    lo_len = config.walk_min_mult * n
    length = lo_len + rng.uniform(config.walk_max_mult * n - lo_len + 1)
    if n > 1:  # n == 1 has no interior neighbours: no draws (unreachable while MIN_SIZE >= 4)
        for _ in range(length):
            r, c = divmod(pos, n)
            options = []
            for dr, dc in DIRECTION_DELTAS:  # N, E, S, W
                nr, nc = r + dr, c + dc
                if 0 <= nr < n and 0 <= nc < n:
                    options.append(nr * n + nc)
            pos = options[rng.uniform(len(options))]
            grid[cell_of(pos)] = PATH

    # Too much Mold: flip a uniformly chosen subset back to Path, down to a drawn target count.
    interior_cells = [cell_of(i) for i in range(interior)]
    molds = [cell for cell in interior_cells if grid[cell] == MOLD]
    m = len(molds)
    lo, hi = config.mold_count_lo, config.mold_count_hi
    if m > hi:
        target = lo + rng.uniform(hi - lo + 1)
        _select(grid, molds, m - target, PATH, rng)
        m = target

    # Gold on a uniformly chosen subset of the interior Path cells.
    paths = [cell for cell in interior_cells if grid[cell] == PATH]
    gold = min(max(1, int(config.gold_ratio * m)), len(paths))
    _select(grid, paths, gold, GOLD, rng)

    for cell in _bfs_order_cached(size):
        if grid[cell] == PATH:
            return grid, cell // size, cell % size
    raise AssertionError("no Path cell: config validation should have made this impossible")


def permutation(r: int) -> list[int]:
    """Lehmer code r in [0, 24) over [N, E, S, W]: r/6, then (r%6)/2, then r%2, then the last."""
    pool = [0, 1, 2, 3]
    out = [pool.pop(r // 6)]
    out.append(pool.pop((r % 6) // 2))
    out.append(pool.pop(r % 2))
    out.append(pool.pop())
    return out


# ----------------------------------------------------------------------------------------- batch
class ReferenceMaze:
    """A batch of `num_envs` mazes with the spec's episode rules, state in plain Python lists."""

    def __init__(self, config: MazeConfig, num_envs: int, seed: int) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.config = config
        self.num_envs = num_envs
        self.seed = seed
        self._f_step = np.float32(config.step_reward)
        self._f_mold = np.float32(config.mold_reward)
        self._f_gold = np.float32(config.gold_reward)
        b = num_envs
        self.grid: list[bytearray] = [bytearray() for _ in range(b)]
        self.row = [0] * b
        self.col = [0] * b
        self.t = [0] * b
        self.wind_from = [-1] * b
        self.episode = [0] * b
        self.step_key = [0] * b
        self.done = [False] * b
        self.origin_env = [0] * b
        self.origin_episode = [0] * b
        for e in range(b):
            self._reset_env(e, 0)

    # ------------------------------------------------------------------ reset / clone
    def _reset_env(self, e: int, episode: int) -> None:
        key = episode_key(self.seed, e, episode)
        self.grid[e], self.row[e], self.col[e] = generate_maze(self.config, key)
        self.t[e] = 0
        self.wind_from[e] = -1
        self.episode[e] = episode
        self.step_key[e] = step_key(key)
        self.done[e] = False
        self.origin_env[e] = e
        self.origin_episode[e] = episode

    def reset(self, mask=None, episodes=None) -> None:
        """Start a new episode in each masked env (all when mask is None).

        Each masked env moves to episode index + 1, unless `episodes` (a list of num_envs ints; only
        the masked entries are read) gives the index explicitly.
        """
        b = self.num_envs
        if mask is None:
            mask = [True] * b
        if len(mask) != b:
            raise ValueError(f"reset: mask has {len(mask)} entries, expected num_envs={b}")
        if episodes is not None:
            if len(episodes) != b:
                raise ValueError(f"reset: episodes has {len(episodes)} entries, expected {b}")
            for e in range(b):
                if mask[e] and int(episodes[e]) < 0:
                    raise ValueError(f"reset: env {e}: episode index {episodes[e]} is negative")
        for e in range(b):
            if mask[e]:
                k = int(episodes[e]) if episodes is not None else self.episode[e] + 1
                self._reset_env(e, k)

    def clone(self, src: int, dst_begin: int, dst_end: int, independent: bool = True) -> None:
        """Copy env src's state into envs [dst_begin, dst_end) (see the spec's Clone rule)."""
        b = self.num_envs
        if not 0 <= src < b:
            raise ValueError(f"clone: src={src} is outside 0..{b - 1}")
        if not 0 <= dst_begin <= dst_end <= b:
            raise ValueError(f"clone: dst range [{dst_begin}, {dst_end}) is not inside [0, {b})")
        if dst_begin <= src < dst_end:
            raise ValueError(f"clone: src={src} lies inside the dst range [{dst_begin}, {dst_end})")
        for d in range(dst_begin, dst_end):
            self.grid[d] = bytearray(self.grid[src])
            self.row[d] = self.row[src]
            self.col[d] = self.col[src]
            self.t[d] = self.t[src]
            self.wind_from[d] = self.wind_from[src]
            self.done[d] = self.done[src]
            self.episode[d] = self.episode[src]
            self.origin_env[d] = self.origin_env[src]
            self.origin_episode[d] = self.origin_episode[src]
            if independent:
                self.step_key[d] = mix64(self.step_key[src] ^ mix64((_CLONE_SALT + d) & MASK64))
            else:
                self.step_key[d] = self.step_key[src]

    # ------------------------------------------------------------------------- step
    def _inside(self, r: int, c: int) -> bool:
        return 0 <= r < self.config.size and 0 <= c < self.config.size

    def valid_directions(self, e: int) -> list[int]:
        """Directions (N, E, S, W order) whose neighbour cell is inside the grid."""
        r, c = self.row[e], self.col[e]
        return [d for d, (dr, dc) in enumerate(DIRECTION_DELTAS) if self._inside(r + dr, c + dc)]

    def _enter(self, e: int, d: int, reward: np.float32) -> tuple[int, np.float32]:
        """Leave the current cell toward d (melting it) and enter the neighbour; score the entry."""
        size = self.config.size
        grid = self.grid[e]
        if self.config.melting:
            grid[self.row[e] * size + self.col[e]] = MOLD
        dr, dc = DIRECTION_DELTAS[d]
        self.row[e] += dr
        self.col[e] += dc
        cell = self.row[e] * size + self.col[e]
        tile = grid[cell]
        if tile == MOLD:
            reward = np.float32(reward + self._f_mold)
        elif tile == GOLD:
            reward = np.float32(reward + self._f_gold)
            grid[cell] = PATH  # consumed
        return tile, reward

    def step(self, actions) -> dict[str, list]:
        """Apply one action per env. Validates every env before changing any state."""
        b = self.num_envs
        cfg = self.config
        if len(actions) != b:
            raise ValueError(f"step: got {len(actions)} actions, expected num_envs={b}")
        acts = []
        for e in range(b):
            a = actions[e]
            if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
                raise ValueError(f"step: env {e}: action {a!r} is not an integer direction 0..3")
            a = int(a)
            if not 0 <= a <= 3:
                raise ValueError(f"step: env {e}: action {a} is outside 0..3 (N, E, S, W)")
            if self.done[e] and not cfg.autoreset:
                raise ValueError(
                    f"step: env {e}: action {a} on a finished episode (autoreset=False); "
                    f"call reset")
            dr, dc = DIRECTION_DELTAS[a]
            if not self._inside(self.row[e] + dr, self.col[e] + dc):
                raise ValueError(
                    f"step: env {e}: action {a} ({DIRECTION_WORDS[a]}) leaves the grid from "
                    f"(row {self.row[e]}, col {self.col[e]})")
            acts.append(a)

        out = {"reward": [], "tile_entered": [], "tile_pushed": [], "wind_from": [], "done": []}
        for e, a in enumerate(acts):
            t = self.t[e]
            reward = self._f_step
            tile_entered, reward = self._enter(e, a, reward)
            tile_pushed, from_dir = -1, -1
            if bernoulli(self.step_key[e], 4 * t + SLOT_WIND, cfg.wind_threshold):
                f = uniform(self.step_key[e], 4 * t + SLOT_WIND_FROM, 4)
                to = OPPOSITE[f]
                dr, dc = DIRECTION_DELTAS[to]
                if self._inside(self.row[e] + dr, self.col[e] + dc):
                    tile_pushed, reward = self._enter(e, to, reward)
                    from_dir = f
                # else: the push would leave the grid, so there is no wind event at all.
            self.wind_from[e] = from_dir
            self.t[e] = t + 1
            done = self.t[e] == cfg.episode_steps
            self.done[e] = done
            out["reward"].append(np.float32(reward))
            out["tile_entered"].append(tile_entered)
            out["tile_pushed"].append(tile_pushed)
            out["wind_from"].append(from_dir)
            out["done"].append(int(done))
            if done and cfg.autoreset:
                # Same-step autoreset: the returned values belong to the finished episode.
                self._reset_env(e, self.episode[e] + 1)
        return out

    # -------------------------------------------------------------------- observation
    def prompt_order(self, e: int) -> list[int]:
        """Valid directions of env e in the order of the prompt shown before its move t."""
        if self.config.shuffle_directions:
            order = permutation(uniform(self.step_key[e], 4 * self.t[e] + SLOT_SHUFFLE, 24))
        else:
            order = [0, 1, 2, 3]
        valid = set(self.valid_directions(e))
        return [d for d in order if d in valid]

    def observe(self) -> tuple[list[list[int]], list[list[int]]]:
        """(neighbours [B][4]: tile per direction N, E, S, W or -1 outside the grid,
        order [B][4]: the prompt's listed directions, padded with -1)."""
        size = self.config.size
        neighbours, orders = [], []
        for e in range(self.num_envs):
            row = []
            for dr, dc in DIRECTION_DELTAS:
                r, c = self.row[e] + dr, self.col[e] + dc
                row.append(self.grid[e][r * size + c] if self._inside(r, c) else -1)
            neighbours.append(row)
            order = self.prompt_order(e)
            orders.append(order + [-1] * (4 - len(order)))
        return neighbours, orders

    def prompt_text(self, i: int) -> str:
        """The user turn shown to env i before its next move, exactly the spec's template."""
        size = self.config.size
        glyphs = self.config.glyph_strings
        text = ""
        if self.wind_from[i] >= 0:
            f = self.wind_from[i]
            # capitalised, as the paper's code writes them (the clauses' words stay lowercase)
            text += (f"A strong wind from the {DIRECTION_WORDS[f].capitalize()} "
                     f"blew you {DIRECTION_WORDS[OPPOSITE[f]].capitalize()}! ")
        text += f"You are in a maze. Currently, you're at location ({self.col[i]}, {self.row[i]})."
        clauses = []
        for k, d in enumerate(self.prompt_order(i)):
            dr, dc = DIRECTION_DELTAS[d]
            tile = self.grid[i][(self.row[i] + dr) * size + self.col[i] + dc]
            lead = "To" if k == 0 else "to"
            clauses.append(f" {lead} the {DIRECTION_WORDS[d]} there is {glyphs[tile]}")
        text += ";".join(clauses) + "."
        text += " Where do you move? Output only N/E/S/W without punctuation."
        return text

    # ------------------------------------------------------------------------- oracle
    def oracle(self) -> tuple[list[int], list[list[int]]]:
        """Shortest-path oracle per env.

        dist: moves from the agent's cell to the nearest Gold through non-Mold cells, -1 if none.
        optimal[d] = 1 for each valid direction that starts some shortest path to Gold; with no Gold
        reachable, 1 for each valid direction whose neighbour is not Mold, else every valid one.
        (Wind and melting are ignored: this is the static shortest path in the current grid.)
        """
        size = self.config.size
        dists, optimal = [], []
        for e in range(self.num_envs):
            grid = self.grid[e]
            # Multi-source BFS from every Gold through non-Mold cells: gd[cell] = moves to Gold.
            gd = [-1] * (size * size)
            queue = deque()
            for cell in range(size * size):
                if grid[cell] == GOLD:
                    gd[cell] = 0
                    queue.append(cell)
            while queue:
                cell = queue.popleft()
                r, c = divmod(cell, size)
                for dr, dc in DIRECTION_DELTAS:
                    nr, nc = r + dr, c + dc
                    if self._inside(nr, nc):
                        nxt = nr * size + nc
                        if gd[nxt] < 0 and grid[nxt] != MOLD:
                            gd[nxt] = gd[cell] + 1
                            queue.append(nxt)
            # The agent's own cell may be Mold (standing on Mold is allowed), so combine its
            # neighbours' distances rather than reading gd at the agent's cell.
            valid = self.valid_directions(e)
            nd = {}
            for d in valid:
                dr, dc = DIRECTION_DELTAS[d]
                nd[d] = gd[(self.row[e] + dr) * size + self.col[e] + dc]
            reach = [v for v in nd.values() if v >= 0]
            opt = [0, 0, 0, 0]
            if reach:
                best = min(reach)
                dists.append(best + 1)
                for d in valid:
                    if nd[d] == best:
                        opt[d] = 1
            else:
                dists.append(-1)
                free = [d for d in valid
                        if grid[(self.row[e] + DIRECTION_DELTAS[d][0]) * size
                                + self.col[e] + DIRECTION_DELTAS[d][1]] != MOLD]
                for d in (free or valid):
                    opt[d] = 1
            optimal.append(opt)
        return dists, optimal
