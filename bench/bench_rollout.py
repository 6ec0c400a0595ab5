"""Maze rollouts with a model: the engine rollout (play_episodes) against the Hugging Face reference
rollout (reference_rollout: the model's own forward with a DynamicCache), in one run, on the paper's
maze (100x100, 15 moves, wind). Rows appended to bench/results/rollout.csv.

Figures per provider and number of envs: moves/s (env-moves per second of wall time, model load
excluded), tokens/s (conversation tokens the model processed), and for the engine its achieved
GFLOP/s beside the machine's fp32 GEMM roof measured in the same run: a rollout turn prefills every
env's new user turn (~90 tokens each), so on a CPU it is compute-bound, and the roof says how much
faster any implementation of the same work could be. ratio = engine moves/s / reference moves/s at
the same number of envs.

    python bench/bench_rollout.py                      # envs 4, 16, 64 on the bundled model
    python bench/bench_rollout.py --envs 4 --steps 3   # a smoke run
    python bench/bench_rollout.py --device cuda --dtype bfloat16 --envs 64,256 --no-reference
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS_DIR, append_rows, gemm_roof, git_commit, machine_name, sync, utc_now  # bench/ is sys.path[0]
from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.model.loading import load_model
from welfare_server.train.rollout import RolloutConfig, episode_context_tokens, play_episodes, reference_rollout

FIELDS = ["date", "machine", "commit", "provider", "model", "dtype", "envs", "steps", "moves_per_s",
          "tokens_per_s", "gflop_per_s", "roof_gflop_per_s", "ratio_vs_reference", "note"]


def engine_flops(model_config, result, end_len: int) -> float:
    """FLOPs the engine spends on a rollout: every conversation token once through the layers
    (2 x layer parameters, plus causal attention over what precedes it) and one logits row per move."""
    c = model_config
    D, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or D // c.num_attention_heads
    q_width, kv_width = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = D * (q_width + 2 * kv_width) + q_width * D + 3 * D * c.intermediate_size
    total = 0.0
    for conversation in result.token_ids:
        n = len(conversation) - end_len  # the last end-of-turn ids are never fed
        total += n * 2 * per_layer * L + 2 * L * q_width * n * n  # linears + QK^T and PV (causal)
    total += result.actions.numel() * 2 * V * D
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--envs", default="4,16,64")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="time the engine only (e.g. on a GPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new env count after this many seconds")
    ap.add_argument("--out", default=str(RESULTS_DIR / "rollout.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    config = MazeConfig(episode_steps=args.steps)
    table = MazeTokenTable.from_tokenizer(loaded.tokenizer, config)
    roof = gemm_roof(loaded.device, loaded.dtype)
    stamp = dict(date=utc_now(), machine=machine_name(loaded.device), commit=git_commit(), model=args.model,
                 dtype=str(loaded.dtype).replace("torch.", ""), steps=args.steps,
                 roof_gflop_per_s=f"{roof:.1f}")
    print(f"{stamp['machine']}: GEMM roof {roof:.1f} GFLOP/s ({stamp['dtype']})")
    rollout_config = RolloutConfig(temperature=1.0, seed=args.seed)
    started = time.perf_counter()
    for envs in [int(e) for e in args.envs.split(",")]:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"# time budget spent: skipping {envs} envs")
            continue
        engine = Engine(loaded, EngineConfig(max_batch_slots=envs, max_context_len=episode_context_tokens(table),
                                             max_prefill_tokens=max(8192, envs * table.max_len * 2)))
        # Warm-up of both on a short episode (allocations, oneDNN/MKL primitive creation, graphs).
        warm = MazeConfig(episode_steps=2)
        warm_table = MazeTokenTable.from_tokenizer(loaded.tokenizer, warm)
        play_episodes(engine, warm_table, MazeBatch(warm, envs), rollout_config)
        if not args.no_reference:
            reference_rollout(loaded.model, warm_table, MazeBatch(warm, envs), rollout_config)
        rows = []
        timings = {}
        providers = [("engine", lambda maze: play_episodes(engine, table, maze, rollout_config))]
        if not args.no_reference:
            providers.append(("hf_reference", lambda maze: reference_rollout(loaded.model, table, maze, rollout_config)))
        for name, play in providers:
            maze = MazeBatch(config, envs, seed=args.seed)
            sync(loaded.device)
            t0 = time.perf_counter()
            result = play(maze)
            sync(loaded.device)
            seconds = time.perf_counter() - t0
            tokens = sum(len(c) for c in result.token_ids)
            flops = engine_flops(loaded.config, result, len(table.assistant_end_ids)) if name == "engine" else None
            timings[name] = envs * args.steps / seconds
            rows.append(dict(stamp, provider=name, envs=envs, moves_per_s=f"{timings[name]:.2f}",
                             tokens_per_s=f"{tokens / seconds:.0f}",
                             gflop_per_s="" if flops is None else f"{flops / seconds / 1e9:.1f}",
                             ratio_vs_reference="", note=args.note))
            print(f"{name:13s} envs={envs:4d}: {timings[name]:8.2f} moves/s, {tokens / seconds:8.0f} tokens/s"
                  + ("" if flops is None else f", {flops / seconds / 1e9:.1f} GFLOP/s ({flops / seconds / 1e9 / roof:.0%} "
                                                  "of the GEMM roof)"))
        if "hf_reference" in timings:
            for row in rows:
                row["ratio_vs_reference"] = f"{timings[row['provider']] / timings['hf_reference']:.2f}"
            print(f"engine / reference at {envs} envs: {timings['engine'] / timings['hf_reference']:.2f}x")
        append_rows(args.out, FIELDS, rows)
        del engine


if __name__ == "__main__":
    main()
