"""Work the server does beside serving: at start, the served model's welfare vectors (v_Mold,
v_Gold from the paper's maze classes) are extracted once and kept in the registry, so steering
along them needs no set-up; generation is served meanwhile (the extraction runs between the
engine's steps)."""

from __future__ import annotations

import logging
import time

from welfare_server.maze import MazeConfig, MazeTokenTable
from welfare_server.vectors.extract import ExtractionConfig, maze_vectors

log = logging.getLogger("welfare_server.server")

WELFARE_NAME = "welfare"
"""Registry name of the vectors extracted at start."""


def welfare_vector_ids(state) -> dict[str, str] | None:
    """{"mold": id, "gold": id} of the served model's maze-class vectors in the registry, or None."""
    found = {}
    for meta in state.registry.list(model_sha256=state.identity.weights_sha256, method="maze_classes"):
        if meta.concept in ("mold", "gold"):
            found[meta.concept] = meta.id  # the newest of each wins (list is sorted by time)
    return found if set(found) == {"mold", "gold"} else None


def _fitting_table(engine) -> MazeTokenTable:
    """The paper's maze, with episodes shortened (longest first dropped) until a whole trajectory
    fits the engine's max_context_len."""
    from welfare_server.train.rollout import episode_context_tokens

    config = MazeConfig()
    table = MazeTokenTable.from_tokenizer(engine.tokenizer, config)
    while episode_context_tokens(table) > engine.cfg.max_context_len and config.episode_steps > 1:
        config = config.replace(episode_steps=config.episode_steps - 1)
        table = MazeTokenTable.from_tokenizer(engine.tokenizer, config)
    if config.episode_steps < MazeConfig().episode_steps:
        log.warning("max_context_len=%d holds trajectories of at most %d moves (the paper's: %d)",
                    engine.cfg.max_context_len, config.episode_steps, MazeConfig().episode_steps)
    return table


def ensure_welfare_vectors(state) -> dict[str, str] | None:
    """Extract and store the welfare vectors unless the registry has them; records progress in
    state.background["extraction"]. Returns the ids (None when the model cannot play the maze)."""
    ids = welfare_vector_ids(state)
    if ids is not None:
        state.background["extraction"] = "cached"
        state.background["vector_ids"] = ids
        return ids
    engine = state.engine
    if engine.tokenizer is None:
        state.background["extraction"] = "skipped: the model has no tokenizer"
        return None
    started = time.perf_counter()
    try:
        table = _fitting_table(engine)
        config = ExtractionConfig(per_class=state.config.extract_per_class)

        def progress(stage, done, total):
            state.background["extraction"] = f"{stage} {done}/{total}"

        log.info("extracting the welfare vectors of %s (%d trajectories per class) in the background",
                 state.identity.name, config.per_class)
        cv = maze_vectors(engine, state.identity, table, config, on_progress=progress)
        ids = state.registry.put_concept_vectors(cv, ("mold", "gold"), name=WELFARE_NAME)
    except Exception as error:  # noqa: BLE001 - logged; serving goes on without the vectors
        state.background["extraction"] = f"failed: {error!r}"
        log.exception("welfare vector extraction failed")
        return None
    state.background["extraction"] = "done"
    state.background["vector_ids"] = ids
    log.info("welfare vectors stored in %.0f s: %s", time.perf_counter() - started, ids)
    return ids
