"""Data parallelism: two processes (torchrun, gloo on loopback) train exactly what one process
trains on the same global batch: the same episodes, and adapters equal up to the order in which
the all-reduce sums the ranks' gradients."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from welfare_server.train.trainer import Trainer


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is "
                                "not available in this torch build")

RUN = dict(steps=2, groups_per_step=2, group_size=2, micro_batch_size=2, eval_episodes=1, eval_every=1,
           kl_metric_every=1, checkpoint_every=1)

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from welfare_server.maze import MazeConfig
    from welfare_server.train.config import TrainConfig
    from welfare_server.train.trainer import Trainer

    values, out = json.loads(sys.argv[1]), sys.argv[2]
    values["maze"] = MazeConfig(**values["maze"])
    trainer = Trainer(TrainConfig(**values))
    try:
        history = trainer.run()
        rank = trainer.world.rank
        assert trainer.world.size == 2 and trainer.local_groups == [rank]
        save_file({n: p.detach().contiguous() for n, p in trainer.weights.named_parameters()},
                  f"{out}/weights_rank{rank}.safetensors")
        with open(f"{out}/history_rank{rank}.json", "w") as f:
            json.dump(history, f)
    finally:
        trainer.close()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _selected(history: list[dict], keys: tuple[str, ...]) -> list[tuple]:
    return [(r["kind"], r["step"]) + tuple(r.get(k) for k in keys) for r in history]


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_train_config):
    from safetensors.torch import load_file

    from welfare_server.maze import MazeConfig

    single_config = tiny_train_config(out_dir=tmp_path / "single", **RUN)
    single = Trainer(single_config)
    single_history = single.run()
    single_weights = {n: p.detach().clone() for n, p in single.weights.named_parameters()}

    out = tmp_path / "ddp"
    out.mkdir()
    config = tiny_train_config(out_dir=out / "run", **RUN)
    values = {f: getattr(config, f) for f in config.__dataclass_fields__ if f != "maze"}
    values["maze"] = {f.name: getattr(config.maze, f.name) for f in dataclasses.fields(MazeConfig) if f.init}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(script), json.dumps(values), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    ranks = [load_file(str(out / f"weights_rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == single_weights.keys()
    moved = 0
    for name, tensor in single_weights.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank applies the same update
        assert torch.allclose(ranks[0][name], tensor, rtol=0, atol=1e-6), (name, (ranks[0][name] - tensor).abs().max())
        moved += int(not torch.equal(tensor, torch.zeros_like(tensor)) and "lora_B" in name)
    assert moved > 0  # the adapters did train

    histories = [json.load(open(out / f"history_rank{r}.json")) for r in (0, 1)]
    episodes = ("return", "gold", "mold", "regret", "oracle_return")
    assert _selected(histories[0], episodes) == _selected(single_history, episodes)
    assert _selected(histories[1], episodes) == _selected(single_history, episodes)
    train = [r for r in histories[0] if r["kind"] == "train"]
    single_train = [r for r in single_history if r["kind"] == "train"]
    assert [r["moves_checked"] for r in train] == [r["moves_checked"] for r in single_train] == [12, 12]
    for mine, theirs in zip(train, single_train):
        for key in ("loss", "entropy", "entropy_eq", "kl", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # Only rank 0 writes the metrics and the checkpoints; the file has every record once.
    with open(out / "run" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert _selected(lines, episodes) == _selected(single_history, episodes)
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step_000002\n"
