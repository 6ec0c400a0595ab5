"""The user-turn prompt as a sequence of fragments: the one definition of the template's pieces.

A prompt is a concatenation of fixed fragments (docs/maze_spec.md, "Prompt text"). Text rendering
joins fragment strings; token rendering (C++ and CUDA) joins the fragments' token ids from a table
built once per tokenizer (welfare_server.maze.tokens). Both read the fragment list defined here, so
the text and the tokens cannot drift apart. The fragment indices are shared with
csrc/maze/rules.h (render_one_env_tokens).
"""

from __future__ import annotations

from welfare_server.maze.config import DIRECTION_WORDS, MazeConfig

# Fragment index layout (must match csrc/maze/rules.h).
WIND_BASE = 0  # WIND[from] for from in 0..3
HEAD_PLAIN = 4
HEAD_AFTER_WIND = 5
CLOSE = 6
TAIL = 7
TURN_PREFIX = 8
TURN_SUFFIX = 9
CLAUSE_BASE = 10  # + ((dir * 3 + tile) * 2 + first) * 2 + last
NUMBER_BASE = 58  # XNUM[v] = NUMBER_BASE + v; YNUM[v] = NUMBER_BASE + size + v

HEAD_TEXT = "You are in a maze. Currently, you're at location ("
TAIL_TEXT = " Where do you move? Output only N/E/S/W without punctuation."


def opposite(direction: int) -> int:
    """N<->S, E<->W (direction codes 0..3)."""
    return (direction + 2) % 4


WIND_WORDS = ("North", "East", "South", "West")
"""Direction names of the wind message, capitalised as in the paper's code (the clauses' direction
words stay lowercase: DIRECTION_WORDS)."""


def wind_text(wind_from: int) -> str:
    """The wind sentence (without the space before the head that follows it)."""
    return f"A strong wind from the {WIND_WORDS[wind_from]} blew you {WIND_WORDS[opposite(wind_from)]}!"


def clause_index(direction: int, tile: int, first: bool, last: bool) -> int:
    return CLAUSE_BASE + ((direction * 3 + tile) * 2 + int(first)) * 2 + int(last)


def clause_text(direction: int, tile: int, first: bool, last: bool, glyphs: tuple[str, str, str]) -> str:
    opener = " To" if first else " to"
    return f"{opener} the {DIRECTION_WORDS[direction]} there is {glyphs[tile]}{'.' if last else ';'}"


def num_fragments(config: MazeConfig) -> int:
    return NUMBER_BASE + 2 * config.size


def fragment_texts(config: MazeConfig, turn_prefix: str = "", turn_suffix: str = "") -> list[str]:
    """Every fragment's text, indexed by the layout above."""
    texts = [""] * num_fragments(config)
    for wind_from in range(4):
        texts[WIND_BASE + wind_from] = wind_text(wind_from)
    texts[HEAD_PLAIN] = HEAD_TEXT
    texts[HEAD_AFTER_WIND] = " " + HEAD_TEXT
    texts[CLOSE] = ")."
    texts[TAIL] = TAIL_TEXT
    texts[TURN_PREFIX] = turn_prefix
    texts[TURN_SUFFIX] = turn_suffix
    glyphs = config.glyph_strings
    for direction in range(4):
        for tile in range(3):
            for first in (False, True):
                for last in (False, True):
                    texts[clause_index(direction, tile, first, last)] = clause_text(
                        direction, tile, first, last, glyphs)
    for value in range(config.size):
        texts[NUMBER_BASE + value] = str(value)
        texts[NUMBER_BASE + config.size + value] = f", {value}"
    return texts


def prompt_fragments(config: MazeConfig, row: int, col: int, wind_from: int,
                     listed: list[tuple[int, int]], *, with_wrapper: bool = False) -> list[int]:
    """Fragment indices of one user turn. listed: (direction, tile) in prompt order."""
    fragments = [TURN_PREFIX] if with_wrapper else []
    if wind_from >= 0:
        fragments += [WIND_BASE + wind_from, HEAD_AFTER_WIND]
    else:
        fragments.append(HEAD_PLAIN)
    fragments += [NUMBER_BASE + col, NUMBER_BASE + config.size + row, CLOSE]
    for position, (direction, tile) in enumerate(listed):
        fragments.append(clause_index(direction, tile, position == 0, position == len(listed) - 1))
    fragments.append(TAIL)
    if with_wrapper:
        fragments.append(TURN_SUFFIX)
    return fragments


def prompt_text(config: MazeConfig, row: int, col: int, wind_from: int,
                listed: list[tuple[int, int]], texts: list[str] | None = None) -> str:
    """The user-turn text (without any chat-template wrapper)."""
    texts = texts if texts is not None else fragment_texts(config)
    return "".join(texts[f] for f in prompt_fragments(config, row, col, wind_from, listed))
