"""Maze configuration: every rule of the paper's maze as a validated field.

The rules themselves, the RNG and the draw order are specified in docs/maze_spec.md; this module
only holds the numbers and checks their bounds. Both the C++ core and the pure-Python reference are
driven by one `MazeConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Tile codes shared with the C++ core (csrc/maze/rules.h) and the reference.
PATH, MOLD, GOLD = 0, 1, 2
# Direction codes: the order of actions, of [B, 4] arrays and of masks everywhere.
NORTH, EAST, SOUTH, WEST = 0, 1, 2, 3
DIRECTION_LETTERS = ("N", "E", "S", "W")
DIRECTION_WORDS = ("north", "east", "south", "west")
# Row/column offsets of one move in each direction (N is row - 1).
DIRECTION_DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1))

GLYPH_PRESETS: dict[str, tuple[str, str, str]] = {
    # (Path, Mold, Gold)
    "office": ("\U0001F9FE", "\U0001F4C7", "\U0001F4D0"),
    "dessert": ("\U0001F369", "\U0001F9C1", "\U0001F368"),
    "letters": ("X", "Y", "Z"),
}

# Bounds of the numeric fields. Named so that error messages and docs quote the same numbers.
MIN_SIZE = 4  # smaller grids have no Mold-fraction range with lo <= hi
MAX_SIZE = 1000  # coordinates stay <= 3 digits, which bounds the rendered token length
MAX_EPISODE_STEPS = 4096
MAX_WALK_MULT = 1000
MAX_ABS_REWARD = 1.0e6
DEFAULT_MAX_STATE_BYTES = 16 << 30

PYTHON_ONLY_FIELDS = ("glyphs", "max_state_bytes")
"""MazeConfig fields the C++ core never reads: the glyphs only reach it as token ids (MazeTokenTable)
and the memory limit is checked by MazeBatch. Every other constructor field is a rule of the core,
passed to it by name (MazeConfig.core_fields)."""


@dataclass(frozen=True)
class MazeConfig:
    """All rules of the maze (DESIGN.md, "The paper's maze"); defaults are the paper's."""

    size: int = 100
    """Side of the square grid, border included. Bounds: MIN_SIZE..MAX_SIZE."""

    episode_steps: int = 15
    """Moves per episode; nothing ends an episode earlier. Bounds: 1..MAX_EPISODE_STEPS."""

    wind_prob: float = 0.1
    """Probability of a wind push after each move. Bounds: 0..1."""

    melting: bool = True
    """Whether the tile the agent leaves (by a move or a push) turns into Mold."""

    step_reward: float = -0.1
    """Reward added on every move (once per step, not again for a push)."""

    mold_reward: float = -10.0
    """Reward added on entering a Mold tile (by a move or a push)."""

    gold_reward: float = 20.0
    """Reward added on entering a Gold tile (by a move or a push); the Gold is consumed."""

    walk_min_mult: int = 5
    """The generator's random walk takes at least walk_min_mult * (size - 2) steps."""

    walk_max_mult: int = 15
    """The generator's random walk takes at most walk_max_mult * (size - 2) steps."""

    mold_fraction_min: float = 0.10
    """Lower end of the interior Mold fraction drawn when the walk left too much Mold."""

    mold_fraction_max: float = 0.50
    """Upper end of the interior Mold fraction: above it, Mold cells are flipped to Path."""

    gold_ratio: float = 0.2
    """Gold tiles placed = max(1, int(gold_ratio * final interior Mold count)), capped by Path."""

    glyphs: str = "office"
    """Tile glyph preset for prompts: one of GLYPH_PRESETS (office, dessert, letters)."""

    shuffle_directions: bool = True
    """Shuffle the order of the listed directions in every prompt (else N, E, S, W)."""

    autoreset: bool = False
    """Same-step autoreset: an env whose episode ends in step() starts its next episode in the same
    call (see docs/maze_spec.md). False: stepping a finished env is an error."""

    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    """Memory limit for one batch's state (grids plus per-env fields); num_envs beyond it is refused."""

    # Derived once in __post_init__ (cleanRL habit); not constructor arguments.
    interior_cells: int = field(init=False)
    mold_count_lo: int = field(init=False)
    mold_count_hi: int = field(init=False)
    wind_threshold: int = field(init=False)

    def __post_init__(self) -> None:
        self._check_int("size", self.size, MIN_SIZE, MAX_SIZE)
        self._check_int("episode_steps", self.episode_steps, 1, MAX_EPISODE_STEPS)
        self._check_float("wind_prob", self.wind_prob, 0.0, 1.0)
        for name in ("step_reward", "mold_reward", "gold_reward"):
            self._check_float(name, getattr(self, name), -MAX_ABS_REWARD, MAX_ABS_REWARD)
        self._check_int("walk_min_mult", self.walk_min_mult, 0, MAX_WALK_MULT)
        self._check_int("walk_max_mult", self.walk_max_mult, self.walk_min_mult, MAX_WALK_MULT)
        self._check_float("mold_fraction_min", self.mold_fraction_min, 0.0, 1.0)
        self._check_float("mold_fraction_max", self.mold_fraction_max, self.mold_fraction_min, 1.0)
        self._check_float("gold_ratio", self.gold_ratio, 0.0, 1.0)
        for name in ("melting", "shuffle_directions", "autoreset"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MazeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.glyphs not in GLYPH_PRESETS:
            raise ValueError(
                f"MazeConfig.glyphs must be one of {sorted(GLYPH_PRESETS)}, got {self.glyphs!r}")
        self._check_int("max_state_bytes", self.max_state_bytes, 1, 1 << 50)

        interior = (self.size - 2) ** 2
        lo = int(self.mold_fraction_min * interior) + 1
        hi = int(self.mold_fraction_max * interior) - 1
        if lo > hi:
            raise ValueError(
                f"MazeConfig.mold_fraction_min/max: the Mold count range [{lo}, {hi}] of a "
                f"{self.size}x{self.size} grid is empty; widen the fractions or enlarge size")
        if interior - hi - max(1, int(self.gold_ratio * hi)) < 1:
            raise ValueError(
                f"MazeConfig.gold_ratio={self.gold_ratio}: with up to {hi} interior Mold cells the "
                f"Gold tiles could cover every Path cell, leaving no start cell; lower gold_ratio or "
                f"mold_fraction_max")
        object.__setattr__(self, "interior_cells", interior)
        object.__setattr__(self, "mold_count_lo", lo)
        object.__setattr__(self, "mold_count_hi", hi)
        object.__setattr__(self, "wind_threshold", min(1 << 32, math.floor(self.wind_prob * 4294967296.0)))

    @property
    def glyph_strings(self) -> tuple[str, str, str]:
        """(Path, Mold, Gold) glyphs of the chosen preset."""
        return GLYPH_PRESETS[self.glyphs]

    def core_fields(self, seed: int) -> dict:
        """The C++ core's Config fields by name (welfare_server._maze_core.Config(**fields)): every
        constructor field but PYTHON_ONLY_FIELDS, plus the seed. Built from the dataclass's fields,
        so a new rule reaches the core without another list to edit (and the core refuses a field
        it does not know)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.init and f.name not in PYTHON_ONLY_FIELDS}
        fields["seed"] = seed
        return fields

    def replace(self, **changes) -> "MazeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def _check_int(name: str, value, lo: int, hi: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"MazeConfig.{name} must be an int, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"MazeConfig.{name}={value} is out of bounds [{lo}, {hi}]")

    @staticmethod
    def _check_float(name: str, value, lo: float, hi: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"MazeConfig.{name} must be a number, got {value!r}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"MazeConfig.{name}={value} is out of bounds [{lo}, {hi}]")
