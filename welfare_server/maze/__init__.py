"""The paper's text maze as a batched simulator with a C++ core (rules: docs/maze_spec.md)."""

from welfare_server.maze.batch import MazeBatch, Observation, StepResult
from welfare_server.maze.config import (
    DIRECTION_LETTERS, DIRECTION_WORDS, EAST, GLYPH_PRESETS, GOLD, MOLD, NORTH, PATH, SOUTH, WEST,
    MazeConfig,
)
from welfare_server.maze.tokens import MazeTokenTable

__all__ = [
    "MazeBatch", "MazeConfig", "MazeTokenTable", "Observation", "StepResult",
    "NORTH", "EAST", "SOUTH", "WEST", "PATH", "MOLD", "GOLD",
    "DIRECTION_LETTERS", "DIRECTION_WORDS", "GLYPH_PRESETS",
]
