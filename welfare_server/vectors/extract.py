"""Concept-vector extraction through the engine (docs/architecture.md, "Concept-vector protocol").

Examples (token-id conversations, each read at its last token) are split per class into a training
and a held-out part (seeded). The training part goes through Engine.capture once, with the true
labels and `permutations` label permutations accumulated in the same pass: class means at every
layer (the residual entering each block), the vectors v_c = mean_c - mean of the other classes'
means, and the permutation null. The held-out part goes through once more, projected onto every
class's vector at every layer, for the layer selection (selection.py). Memory does not grow with
the number of examples: only class sums and the held-out projections are kept.

Three sources of examples:
- maze_vectors: the paper's synthetic Mold-/Gold-/Path-final trajectories (trajectories.py);
- contrast_vectors: two sets of chats (repeng's contrast pairs, any two conditions);
- rollout_vectors: live episodes played by the model, labelled by the tile their last move entered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.model.prompts import render_chat
from welfare_server.vectors.selection import select_layer
from welfare_server.vectors.trajectories import CLASS_TILES, synthetic_trajectories
from welfare_server.vectors.types import ConceptVectors, ModelIdentity


@dataclass(frozen=True)
class ExtractionConfig:
    """Sizes and seeds of one extraction (defaults run on 2 CPU cores in minutes; the paper's
    sizes are PAPER_EXTRACTION)."""

    per_class: int = 300
    """Examples per class (maze trajectories; the paper used 5000)."""
    heldout_fraction: float = 0.2
    """Share of each class kept out of the means, for the layer selection."""
    permutations: int = 64
    """Label permutations accumulated beside the true labels: the null of every cosine."""
    seed: int = 0
    """Seeds the trajectories' mazes and walks, the split and the permutations."""
    num_envs: int = 1024
    """Mazes played at once while drawing trajectories."""

    def __post_init__(self):
        for name, lo in (("per_class", 2), ("permutations", 0), ("seed", 0), ("num_envs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"ExtractionConfig.{name}: {value!r} must be an int >= {lo}")
        if not (isinstance(self.heldout_fraction, (int, float)) and 0.0 < self.heldout_fraction < 1.0):
            raise ValueError(f"ExtractionConfig.heldout_fraction: {self.heldout_fraction!r} must be in (0, 1)")


PAPER_EXTRACTION = ExtractionConfig(per_class=5000)
"""The paper's sizes: 5000 trajectories per class."""


def _split(labels: list[int], num_classes: int, fraction: float, generator: torch.Generator):
    """Per class, a seeded share of the examples held out (at least one each side)."""
    train, held = [], []
    for c in range(num_classes):
        members = [i for i, label in enumerate(labels) if label == c]
        order = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
        n_held = min(max(1, round(fraction * len(order))), len(order) - 1)
        held += order[:n_held]
        train += order[n_held:]
    return sorted(train), sorted(held)


def extract(engine, identity: ModelIdentity, prompts: Sequence[Sequence[int]], labels: Sequence[int],
            classes: Sequence[str], method: str, config: ExtractionConfig = ExtractionConfig(),
            source: dict | None = None, on_progress: Callable[[str, int, int], None] | None = None) -> ConceptVectors:
    """Class means, permutation null and layer selection of examples read at their last token (see
    the module docstring). on_progress(stage, done, total)."""
    C = len(classes)
    if len(prompts) != len(labels):
        raise ValueError(f"labels: {len(labels)} labels for {len(prompts)} examples")
    generator = torch.Generator().manual_seed(config.seed)
    train, held = _split(list(labels), C, config.heldout_fraction, generator)
    train_labels = torch.tensor([labels[i] for i in train])
    columns = [train_labels] + [train_labels[torch.randperm(len(train), generator=generator)]
                                for _ in range(config.permutations)]
    table = torch.stack(columns, dim=1).tolist()  # [N_train, 1 + K]

    def progress(stage, total):
        return None if on_progress is None else (lambda done: on_progress(stage, done, total))

    result = engine.capture([prompts[i] for i in train], table, C, on_progress=progress("train", len(train)))
    means = result.means  # [L, 1 + K, C, D]
    cv = ConceptVectors(model=identity, classes=tuple(classes), means=means[:, 0].contiguous(),
                        counts=result.counts[0].tolist(), method=method,
                        permuted_means=means[:, 1:].permute(1, 0, 2, 3).contiguous() if config.permutations else None,
                        source=dict(source or {}, extraction=asdict(config), heldout=len(held), train=len(train)))
    vectors = torch.stack([cv.vector(name) for name in classes], dim=1)  # [L, C, D]
    held_result = engine.capture([prompts[i] for i in held], [labels[i] for i in held], C,
                                 proj_vectors=vectors, on_progress=progress("held-out", len(held)))
    held_labels = torch.tensor([labels[i] for i in held])
    for c, name in enumerate(classes):
        cv.selection[name] = select_layer(held_result.projections[:, :, c], held_labels == c)
    return cv


def maze_vectors(engine, identity: ModelIdentity, table: MazeTokenTable, config: ExtractionConfig = ExtractionConfig(),
                 classes: Sequence[str] = ("mold", "gold", "path"), on_progress=None) -> ConceptVectors:
    """The paper's v_Mold, v_Gold (and v_Path) from synthetic trajectories (trajectories.py)."""
    trajectories = synthetic_trajectories(
        table, config.per_class, classes=tuple(classes), seed=config.seed, num_envs=config.num_envs,
        on_progress=None if on_progress is None else (lambda done: on_progress("trajectories", done,
                                                                               config.per_class * len(classes))))
    source = dict(kind="synthetic_trajectories", maze=_maze_source(table.config), seed=config.seed,
                  mean_length=sum(t.length for t in trajectories) / len(trajectories))
    return extract(engine, identity, [t.token_ids for t in trajectories], [t.label for t in trajectories],
                   classes, "maze_classes", config, source, on_progress)


def contrast_vectors(engine, identity: ModelIdentity, positive: Sequence, negative: Sequence,
                     config: ExtractionConfig = ExtractionConfig(), names: tuple[str, str] = ("positive", "negative"),
                     on_progress=None) -> ConceptVectors:
    """v_positive = mean(positive) - mean(negative) from two sets of examples, each a chat (a list of
    {"role", "content"} messages, rendered by the tokenizer's template; a chat ending in a user
    turn gets the generation prompt) or a list of token ids; each is read at its last token."""
    prompts = [_as_ids(engine.tokenizer, example) for example in list(positive) + list(negative)]
    labels = [0] * len(positive) + [1] * len(negative)
    return extract(engine, identity, prompts, labels, names, "contrast", config,
                   dict(kind="contrast", sizes=[len(positive), len(negative)]), on_progress)


def rollout_vectors(engine, identity: ModelIdentity, table: MazeTokenTable, maze: MazeBatch,
                    rollout_config=None, config: ExtractionConfig = ExtractionConfig(),
                    classes: Sequence[str] = ("mold", "gold", "path"), on_progress=None) -> ConceptVectors:
    """Vectors from live episodes the engine plays in `maze` (fresh), each read at its last move's
    token and labelled by the tile that move entered. Episodes whose last tile is not one of
    `classes` are dropped."""
    from welfare_server.train.rollout import RolloutConfig, play_episodes

    result = play_episodes(engine, table, maze, rollout_config or RolloutConfig())
    tile_to_class = {CLASS_TILES[name]: c for c, name in enumerate(classes)}
    prompts, labels = [], []
    for i in range(maze.num_envs):
        label = tile_to_class.get(int(result.tiles_entered[i, -1]))
        if label is not None:
            prompts.append(result.token_ids[i][:result.answer_positions[i][-1] + 1])
            labels.append(label)
    return extract(engine, identity, prompts, labels, classes, "rollouts", config,
                   dict(kind="rollouts", episodes=maze.num_envs, maze=_maze_source(maze.config)), on_progress)


def _as_ids(tokenizer, example) -> list[int]:
    if isinstance(example, (list, tuple)) and example and isinstance(example[0], dict):
        add_prompt = example[-1].get("role") != "assistant"
        return render_chat(tokenizer, example, add_generation_prompt=add_prompt)[0]
    return list(example)


def _maze_source(config: MazeConfig) -> dict:
    return {name: getattr(config, name) for name in ("size", "episode_steps", "wind_prob", "melting", "glyphs")}
