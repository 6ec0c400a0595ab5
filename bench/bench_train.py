"""Training throughput: policy moves/s of whole RL steps (rollout plus update) through the trainer,
beside the same steps with the rollouts played by the Hugging Face reference (the model's own
forward with a DynamicCache, what a hook-based trainer does), in one run. Rows appended to
bench/results/train.csv.

Each step plays groups x group_size episodes of the paper's maze (100x100, 15 moves, wind) with
the current policy and updates it once. Figures per provider:
  moves_per_s        env-moves of the step / wall time of the whole step (rollout + update)
  rollout_moves_per_s  env-moves / rollout time alone
  update_s           the training forward/backward and optimizer step
  ratio_vs_reference moves_per_s / the reference's moves_per_s in the same run
The reference rows replay the trainer's own update (the same episodes' update time) after an HF
reference rollout of the same mazes with the merged weights, so the ratio isolates what the
engine's rollouts buy in a training loop.

    python bench/bench_train.py                                   # the bundled model, cpu-demo sizes
    python bench/bench_train.py --groups 1 --group-size 2 --steps-per-episode 3 --train-steps 1   # smoke
    python bench/bench_train.py --device cuda --dtype bfloat16 --groups 8 --group-size 32 --no-reference
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, sync, utc_now  # bench/ is sys.path[0]
from welfare_server.maze import MazeConfig
from welfare_server.train.config import preset_config
from welfare_server.train.episodes import shard
from welfare_server.train.rollout import reference_rollout
from welfare_server.train.trainer import Trainer, derive_seed

FIELDS = ["date", "machine", "commit", "provider", "model", "dtype", "algorithm", "finetune", "episodes",
          "steps_per_episode", "train_steps", "moves_per_s", "rollout_moves_per_s", "rollout_s", "update_s",
          "ratio_vs_reference", "note"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="cpu-demo", help="the trainer preset the other options override")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps-per-episode", type=int, default=15, help="maze moves per episode")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up step)")
    ap.add_argument("--lora-layers", default=None, help="override the preset's adapted layers (\"\" = all)")
    ap.add_argument("--no-reference", action="store_true", help="time the trainer only (e.g. on a GPU)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "train.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        config = preset_config(args.preset, model=args.model, device=args.device, dtype=args.dtype,
                               groups_per_step=args.groups, group_size=args.group_size,
                               steps=args.train_steps + 1, eval_episodes=0, checkpoint_every=0, progress=False,
                               resume=False, kl_metric_every=0, out_dir=out_dir,
                               maze=MazeConfig(episode_steps=args.steps_per_episode),
                               max_rollout_envs=args.groups * args.group_size,
                               **({} if args.lora_layers is None else {"lora_layers": args.lora_layers}))
        trainer = Trainer(config)
        device = trainer.device
        stamp = dict(date=utc_now(), machine=machine_name(device), commit=git_commit(), model=args.model,
                     dtype=str(trainer.dtype).replace("torch.", ""), algorithm=config.algorithm,
                     finetune=config.finetune, episodes=config.episodes_per_step,
                     steps_per_episode=args.steps_per_episode, train_steps=args.train_steps, note=args.note)
        moves = config.episodes_per_step * args.steps_per_episode
        trainer.train_step()  # warm-up: allocations, primitive creation, the engine's graphs
        records = []
        for _ in range(args.train_steps):
            sync(device)
            records.append(trainer.train_step())
        rollout_s = sum(r["rollout_s"] for r in records)
        update_s = sum(r["update_s"] for r in records)
        engine_rate = moves * args.train_steps / (rollout_s + update_s)
        rows = [dict(stamp, provider="trainer_engine", moves_per_s=f"{engine_rate:.2f}",
                     rollout_moves_per_s=f"{moves * args.train_steps / rollout_s:.2f}",
                     rollout_s=f"{rollout_s:.2f}", update_s=f"{update_s:.2f}", ratio_vs_reference="")]
        print(f"trainer (engine rollouts): {engine_rate:.2f} moves/s (rollout {rollout_s:.1f} s, update {update_s:.1f} s)")

        if not args.no_reference:
            # The same steps' mazes, played by the HF reference with the policy's merged weights.
            ref_s = 0.0
            for step in range(1, args.train_steps + 1):
                sub = shard(trainer.step_mazes(step), list(range(config.episodes_per_step)))
                with trainer.weights.policy_model() as model:
                    sync(device)
                    t0 = time.perf_counter()
                    reference_rollout(model, trainer.table, sub,
                                      trainer.rollout_config(config.temperature, derive_seed(config.seed, "moves", step)))
                    sync(device)
                    ref_s += time.perf_counter() - t0
            ref_rate = moves * args.train_steps / (ref_s + update_s)
            rows.append(dict(stamp, provider="trainer_hf_reference_rollout", moves_per_s=f"{ref_rate:.2f}",
                             rollout_moves_per_s=f"{moves * args.train_steps / ref_s:.2f}",
                             rollout_s=f"{ref_s:.2f}", update_s=f"{update_s:.2f}", ratio_vs_reference="1.00"))
            rows[0]["ratio_vs_reference"] = f"{engine_rate / ref_rate:.2f}"
            print(f"trainer (HF reference rollouts): {ref_rate:.2f} moves/s (rollout {ref_s:.1f} s, same update); "
                  f"engine / reference {engine_rate / ref_rate:.2f}x")
        trainer.close()
    append_rows(args.out, FIELDS, rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
