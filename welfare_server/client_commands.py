"""The command line's client side: commands that talk to a running `welfare-server serve` over gRPC
(generate, info, maze, and `vectors list|export|import|delete --address`), through the blocking
client in welfare_server.server.client. Nothing here loads a model."""

from __future__ import annotations

import json
import sys


def add_client_options(parser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server's host:port")
    parser.add_argument("--token", default=None, help="bearer token (default: $WELFARE_SERVER_TOKEN)")


def _client(args):
    from welfare_server.server.client import WelfareClient

    return WelfareClient(args.address, token=args.token)


def _steering(client, args) -> list:
    return [client.term(args.vector_id, args.layers, args.coefficient, args.mode)] if args.vector_id else []


def add_steering_options(parser, default_layers=(15,)) -> None:
    parser.add_argument("--vector-id", help="steer along this registry record")
    parser.add_argument("--layers", type=int, nargs="+", default=list(default_layers), help="layers to steer at")
    parser.add_argument("--coefficient", type=float, default=4.0)
    parser.add_argument("--mode", default="add", choices=["add", "add_renorm", "ablate", "clamp"])


# ---------------------------------------------------------------------------------- generation
def run_generate(args) -> int:
    with _client(args) as client:
        source = dict(text=args.text) if args.raw else dict(chat=[{"role": "user", "content": args.text}])
        for event in client.generate(steering=_steering(client, args), max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, **source):
            if event.DESCRIPTOR.name == "TokenDelta":
                print(event.text, end="", flush=True)
            else:
                print(event.text)
                print(f"[{event.completion_tokens} tokens, {finish_name(event.finish_reason)}]", file=sys.stderr)
    return 0


def finish_name(value: int) -> str:
    from welfare_server.server.proto import generation_pb2

    return generation_pb2.FinishReason.Name(value).replace("FINISH_REASON_", "").lower()


def run_info(args) -> int:
    from google.protobuf import json_format

    with _client(args) as client:
        print(json_format.MessageToJson(client.info(), preserving_proto_field_name=True))
    return 0


# ---------------------------------------------------------------------------------- maze
def run_maze(args) -> int:
    """Maze rollouts played by the server (its model, RANDOM or ORACLE); one line per episode and
    the means, or every episode as a JSON line with --out."""
    from welfare_server.maze import GOLD, MOLD

    rules = {k: v for k, v in (("size", args.size), ("episode_steps", args.episode_steps),
                               ("wind_prob", args.wind_prob)) if v is not None}
    totals = {"return": 0.0, "gold": 0, "mold": 0}
    count = 0
    out = open(args.out, "w") if args.out else None
    try:
        with _client(args) as client:
            for episode in client.rollout(num_mazes=args.num_mazes, group_size=args.group_size, policy=args.policy,
                                          temperature=args.temperature, seed=args.seed, rules=rules,
                                          steering=_steering(client, args), include_tokens=bool(args.out)):
                entered = list(episode.tiles_entered) + [t for t in episode.tiles_pushed if t >= 0]
                gold, mold = entered.count(GOLD), entered.count(MOLD)
                count += 1
                totals["return"] += episode.episode_return
                totals["gold"] += gold
                totals["mold"] += mold
                print(f"maze {episode.maze:3d} member {episode.member:3d}: return {episode.episode_return:+7.1f}  "
                      f"gold {gold}  mold {mold}  moves {''.join('NESW'[a] for a in episode.actions)}")
                if out is not None:
                    record = {"maze": episode.maze, "member": episode.member, "actions": list(episode.actions),
                              "rewards": list(episode.rewards), "tiles_entered": list(episode.tiles_entered),
                              "tiles_pushed": list(episode.tiles_pushed), "wind_from": list(episode.wind_from),
                              "logprobs": list(episode.logprobs), "return": episode.episode_return,
                              "gold": gold, "mold": mold, "token_ids": list(episode.token_ids)}
                    out.write(json.dumps(record) + "\n")
    finally:
        if out is not None:
            out.close()
    if count:
        print(f"{count} episodes: mean return {totals['return'] / count:+.2f}, gold {totals['gold'] / count:.2f}, "
              f"mold {totals['mold'] / count:.2f}", file=sys.stderr)
    return 0


def add_maze_command(commands, formatter) -> None:
    maze = commands.add_parser("maze", formatter_class=formatter,
                               help="maze rollouts played by a running server (its model, random or oracle)")
    add_client_options(maze)
    maze.add_argument("--num-mazes", type=int, default=4, help="mazes (B)")
    maze.add_argument("--group-size", type=int, default=1, help="episodes per maze, independent futures (G)")
    maze.add_argument("--policy", default="model", choices=["model", "random", "oracle"])
    maze.add_argument("--temperature", type=float, default=None, help="model policy: 0 greedy (server default 1)")
    maze.add_argument("--seed", type=int, default=0)
    maze.add_argument("--size", type=int, default=None, help="maze side (server default: the paper's 100)")
    maze.add_argument("--episode-steps", type=int, default=None, help="moves per episode (default: the paper's 15)")
    maze.add_argument("--wind-prob", type=float, default=None, help="wind probability (default: the paper's 0.1)")
    maze.add_argument("--out", help="write every episode (with its token ids) as a JSON line to this file")
    add_steering_options(maze)
    maze.set_defaults(run=run_maze)


# ---------------------------------------------------------------------------------- vectors
def run_vectors_list(args) -> int:
    with _client(args) as client:
        for meta in client.list_vectors(name=args.name or "", method=args.method or ""):
            print(f"{meta.id}  {meta.name:12} {meta.method:14} layers {len(meta.layers):3}  {meta.model_name} "
                  f"({meta.model_fingerprint[:12]})  {meta.created}")
    return 0


def run_vectors_export(args) -> int:
    with _client(args) as client:
        data = client.export_vector(args.id, scale=args.scale, layers=args.layers or ())
    with open(args.path, "wb") as f:
        f.write(data)
    print(f"wrote {args.path} ({len(data)} bytes) from the server's record {args.id}")
    return 0


def run_vectors_import(args) -> int:
    with open(args.path, "rb") as f:
        data = f.read()
    with _client(args) as client:
        record = client.import_vector(data, name=args.name)
    print(f"imported {args.path} into the server's registry as record {record}")
    return 0


def run_vectors_delete(args) -> int:
    import grpc

    try:
        with _client(args) as client:
            client.delete_vector(args.id)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        print(f"record {args.id}: not found")
        return 1
    print(f"record {args.id}: deleted")
    return 0
