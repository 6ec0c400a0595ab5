"""`welfare-server train`: the options are TrainConfig's and MazeConfig's fields (config_cli), their
defaults those of the chosen preset; an option given on the command line overrides the preset.

    welfare-server train --preset cpu-demo
    welfare-server train --preset paper --model /models/Qwen3-4B-Instruct-2507
    torchrun --nproc-per-node 2 -m welfare_server.cli train --preset cpu-demo --groups-per-step 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from welfare_server import config_cli


class _PresetDefault:
    """An option's default: the preset's value when a preset sets the field, else the dataclass's
    (shown in --help as both)."""

    def __init__(self, value):
        self.value = value

    def __str__(self) -> str:
        return f"{self.value!r} unless the preset sets it"


def _field_defaults(cls, exclude=()) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


MAZE_EXCLUDE = ("autoreset", "max_state_bytes")


def add_train_command(commands) -> argparse.ArgumentParser:
    """Add the `train` subcommand to a subparsers object."""
    from welfare_server.maze import MazeConfig
    from welfare_server.train.config import PRESETS, TrainConfig

    train = commands.add_parser("train", help="train a model with RL (Dr. GRPO, GRPO, token REINFORCE) or SFT "
                                "in the maze, the engine serving each update's weights",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__,
                                )
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="start from a preset's settings (welfare_server/train/config.py documents them)")
    defaults = {k: _PresetDefault(v) for k, v in _field_defaults(TrainConfig, ("maze",)).items()}
    config_cli.add_options(train.add_argument_group("training (TrainConfig)"), TrainConfig, exclude=("maze",),
                           overrides=defaults)
    maze_defaults = {k: _PresetDefault(v) for k, v in _field_defaults(MazeConfig, MAZE_EXCLUDE).items()}
    config_cli.add_options(train.add_argument_group("maze rules (MazeConfig)"), MazeConfig, exclude=MAZE_EXCLUDE,
                           prefix="maze-", overrides=maze_defaults)
    train.set_defaults(run=run_train)
    return train


def _given(args, cls) -> dict:
    """The fields of cls given on the command line (an option left at its default is not given)."""
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items()
            if k.startswith(prefix) and not isinstance(v, _PresetDefault)}


def build_config(args):
    """TrainConfig from the preset and the options given (each dataclass validates its fields)."""
    from welfare_server.maze import MazeConfig
    from welfare_server.train.config import PRESETS, TrainConfig

    preset = dict(PRESETS[args.preset]) if args.preset else {}
    base_maze = preset.pop("maze", MazeConfig())
    maze_values = {f.name: getattr(base_maze, f.name) for f in dataclasses.fields(MazeConfig) if f.init}
    maze_values.update(_given(args, MazeConfig))
    maze = config_cli.build(MazeConfig, argparse.Namespace(**{f"MazeConfig.{k}": v for k, v in maze_values.items()}))
    values = dict(_field_defaults(TrainConfig, ("maze",)), **preset)
    values.update(_given(args, TrainConfig))
    namespace = argparse.Namespace(**{f"TrainConfig.{k}": v for k, v in values.items()})
    return config_cli.build(TrainConfig, namespace, maze=maze)


def run_train(args) -> int:
    from welfare_server.train.trainer import Trainer

    config = build_config(args)  # a bad option is refused here, before anything is loaded
    try:
        trainer = Trainer(config)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    try:
        history = trainer.run()
        if trainer.world.is_main:
            evals = [r for r in history if r["kind"] == "eval"]
            for r in evals:
                print(f"eval at step {r['step']:>4}: return {r['return']:+.2f} ± {r['return_ci95']:.2f}  "
                      f"gold {r['gold']:.2f} ± {r['gold_ci95']:.2f}  mold {r['mold']:.2f} ± {r['mold_ci95']:.2f}  "
                      f"regret {r['regret']:+.2f}")
            print(f"metrics: {trainer.metrics_path}; checkpoints: {trainer.out_dir / 'checkpoints'}", file=sys.stderr)
    finally:
        trainer.close()
    return 0
