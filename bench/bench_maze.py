"""Maze simulator throughput: our C++ core (CPU, CUDA) vs the pure-Python reference vs Jumanji.

Figures, each for size 100 and B envs:
- steps/s: env-steps per second of observe (action mask) + pick + step, with long episodes so no
  reset falls inside the timing; "+tokens" also renders every env's user turn to token ids.
- episode steps/s: the paper's 15-move episodes with same-step autoreset, so maze generation is
  paid inside the loop (the figure an RL rollout actually sees).
- resets/s and us per maze per core: maze generation alone.
Peer: Jumanji's Maze (JAX, jit + vmap) on the same machine in the same run. Jumanji's generator is
very slow on CPU (a 1024-env vmapped reset took 320 s here), so its batched states are built from
one reset state broadcast to B, and its resets/s is measured at B=1.

Each run appends rows to bench/results/maze.csv with date, machine (the CPU and its vector
extensions, or the GPU), device, git commit; ratios are against Jumanji's steps/s measured in the
same run (when Jumanji is not installed the run says so, on stdout and in a note row), and the B=1
notes carry the ratio against the pure-Python reference of the same run. CPU rows note the maze
generator routine in use (avx512, avx2 or portable); the portable routine's reset figures are
measured in the same run too (a subprocess with WS_NO_SIMD=1), as the SIMD routine's baseline.

    python bench/bench_maze.py                 # CPU: B = 1, 1024, 16384
    python bench/bench_maze.py --quick         # smaller, for a smoke run
    python bench/bench_maze.py --device cuda   # the CUDA backend too (+ bitwise CPU/GPU parity)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, sync, utc_now  # bench/ is sys.path[0]; _common adds the repo root
from welfare_server.maze import MazeBatch, MazeConfig, MazeTokenTable
from welfare_server import _maze_core
from welfare_server.maze.reference import ReferenceMaze

RESULTS = RESULTS_DIR / "maze.csv"
FIELDS = ["date", "machine", "device", "commit", "provider", "size", "num_envs", "metric", "value",
          "ratio_vs_jumanji", "note"]


def timed(fn, min_seconds: float, max_iterations: int = 10**9) -> float:
    """Seconds per call of fn, repeating until min_seconds have passed (after one warm-up)."""
    fn()
    iterations, started = 0, time.perf_counter()
    while True:
        fn()
        iterations += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds or iterations >= max_iterations:
            return elapsed / iterations




def bench_core(device, size, num_envs, table_builder, seconds, threads):
    """steps/s (with and without tokens), episode steps/s, resets/s of MazeBatch."""
    rows = []
    long_config = MazeConfig(size=size, episode_steps=4096)
    batch = MazeBatch(long_config, num_envs, seed=1, device=device, num_threads=threads)
    preference = torch.rand(64, num_envs, 4, device=device)
    step_counter = [0]

    def one_step(render=None):
        valid = batch.observe().valid
        actions = (preference[step_counter[0] % 64] + valid).argmax(dim=1).to(torch.int32)
        step_counter[0] += 1
        if step_counter[0] >= 4000:  # stay inside the long episode
            batch.reset()
            step_counter[0] = 0
        batch.step(actions)
        if render is not None:
            batch.render_tokens(*render)
        sync(device)

    per_step = timed(one_step, seconds)
    rows.append(("steps_per_s", num_envs / per_step, ""))
    table = table_builder(long_config)
    out = torch.empty(num_envs, table.max_len, dtype=torch.int32, device=device)
    lengths = torch.empty(num_envs, dtype=torch.int32, device=device)
    per_step_tokens = timed(lambda: one_step((table, out, lengths)), seconds)
    rows.append(("steps_per_s_with_tokens", num_envs / per_step_tokens, f"{table.max_len} ids/env buffer"))

    episode_config = MazeConfig(size=size, autoreset=True)
    episodes = MazeBatch(episode_config, num_envs, seed=2, device=device, num_threads=threads)
    episode_table = table_builder(episode_config)

    def episode_step():
        valid = episodes.observe().valid
        actions = (preference[step_counter[0] % 64] + valid).argmax(dim=1).to(torch.int32)
        step_counter[0] += 1
        episodes.step(actions)
        episodes.render_tokens(episode_table, out, lengths)
        sync(device)

    per_episode_step = timed(episode_step, seconds)
    rows.append(("episode_steps_per_s_with_tokens", num_envs / per_episode_step, "15-move episodes, autoreset"))

    def reset_all():
        batch.reset()
        sync(device)

    per_reset = timed(reset_all, seconds)
    resets = num_envs / per_reset
    rows.append(("resets_per_s", resets, ""))
    if device == "cpu":
        cores = min(threads or os.cpu_count(), os.cpu_count(), num_envs)
        rows.append(("us_per_maze_per_core", 1e6 * cores / resets, f"{cores} threads"))
    return rows


def bench_reference(size, seconds):
    ref = ReferenceMaze(MazeConfig(size=size, episode_steps=4096), 1, 0)
    rng = np.random.default_rng(0)

    def one_step():
        if ref.t[0] >= 4000:  # stay inside the long episode
            ref.reset()
        neighbours, _ = ref.observe()
        valid = [d for d in range(4) if neighbours[0][d] >= 0]
        ref.step([valid[rng.integers(len(valid))]])
        ref.prompt_text(0)

    per_step = timed(one_step, seconds)
    per_reset = timed(lambda: ref.reset(), seconds, max_iterations=20)
    return [("steps_per_s_with_text", 1 / per_step, ""), ("resets_per_s", 1 / per_reset, "")]


def jumanji_missing() -> str | None:
    """Why Jumanji cannot be measured here (None when it can)."""
    try:
        import jax  # noqa: F401
        from jumanji.environments import Maze  # noqa: F401
    except ImportError as error:
        return f"Jumanji not installed ({error}); pip install 'welfare_server[bench]' (jax[cpu], jumanji)"
    return None


def bench_jumanji(size, num_envs, seconds, measure_reset):
    """Jumanji Maze (JAX jit + vmap) steps/s (check jumanji_missing() first)."""
    import jax
    from jumanji.environments import Maze
    from jumanji.environments.routing.maze.generator import RandomGenerator

    env = Maze(generator=RandomGenerator(size, size), time_limit=10**9)
    reset_one = jax.jit(env.reset)
    state, _ = reset_one(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    rows = []
    if measure_reset:
        keys = iter(jax.random.split(jax.random.PRNGKey(1), 10**5))

        def reset():
            jax.block_until_ready(reset_one(next(keys)))

        rows.append(("resets_per_s", 1 / timed(reset, seconds, max_iterations=200), "B=1, jit"))
    batched = jax.tree_util.tree_map(lambda x: jax.numpy.broadcast_to(x, (num_envs,) + x.shape).copy(), state)
    step = jax.jit(jax.vmap(env.step))
    actions = jax.random.randint(jax.random.PRNGKey(2), (64, num_envs), 0, 4)
    holder = {"state": batched, "i": 0}

    def one_step():
        holder["state"], timestep = step(holder["state"], actions[holder["i"] % 64])
        holder["i"] += 1
        jax.block_until_ready(timestep.reward)

    rows.append(("steps_per_s", num_envs / timed(one_step, seconds), "no rendering (grid observation)"))
    return rows


def bench_resets_only(size, num_envs, seconds, threads):
    """(resets/s, us per maze per core, cores) of MazeBatch at B=num_envs, on this process's routine."""
    batch = MazeBatch(MazeConfig(size=size), num_envs, seed=1, num_threads=threads)
    resets = num_envs / timed(batch.reset, seconds)
    cores = min(threads or os.cpu_count(), os.cpu_count(), num_envs)
    return resets, 1e6 * cores / resets, cores


def portable_reset_rows(size, num_envs, seconds, threads):
    """The portable generator's reset figures, from a subprocess with WS_NO_SIMD=1."""
    command = [sys.executable, __file__, "--reset-only", "--size", str(size), "--batches", str(num_envs),
               "--seconds", str(seconds), "--threads", str(threads)]
    done = subprocess.run(command, env={**os.environ, "WS_NO_SIMD": "1"}, capture_output=True, text=True,
                          check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    note = f"routine {figures['routine']} (WS_NO_SIMD=1 baseline)"
    return [("resets_per_s", figures["resets_per_s"], note),
            ("us_per_maze_per_core", figures["us_per_maze_per_core"], f"{figures['cores']} threads; {note}")]


def check_gpu_parity(size, num_envs):
    """Bitwise CPU/GPU parity of grids, trajectories, rewards and token ids; raises on a mismatch."""
    config = MazeConfig(size=size, wind_prob=0.3, autoreset=True)
    cpu, gpu = MazeBatch(config, num_envs, seed=3), MazeBatch(config, num_envs, seed=3, device="cuda")
    generator = torch.Generator().manual_seed(0)
    for t in range(40):
        for name in ("grids", "row", "col", "step_index", "wind_from", "episode", "step_key"):
            if not torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()):
                raise AssertionError(f"CPU/GPU mismatch in {name} at step {t}")
        valid = cpu.observe().valid
        actions = (torch.rand(num_envs, 4, generator=generator) + valid).argmax(dim=1).to(torch.int32)
        a, b = cpu.step(actions), gpu.step(actions.cuda())
        if not torch.equal(a.reward.view(torch.int32), b.reward.cpu().view(torch.int32)):
            raise AssertionError(f"CPU/GPU reward bits differ at step {t}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing window per figure")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-jumanji", action="store_true")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: the bundled model's)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default="", help="appended to every row's note (e.g. other load on the machine)")
    parser.add_argument("--reset-only", action="store_true", help=argparse.SUPPRESS)  # portable_reset_rows
    args = parser.parse_args()
    if args.reset_only:
        resets, us, cores = bench_resets_only(args.size, args.batches[0], args.seconds, args.threads)
        print(json.dumps({"routine": _maze_core.cpu_sampler_name(), "resets_per_s": resets,
                          "us_per_maze_per_core": us, "cores": cores}))
        return 0
    batches = args.batches or ([1, 1024] if args.quick else [1, 1024, 16384])
    if args.device == "cuda":
        batches = args.batches or [16384, 65536, 262144]  # 1e9 steps/s needs a big batch
    seconds = 0.3 if args.quick else args.seconds

    from transformers import AutoTokenizer

    if args.tokenizer:
        tokenizer_dir = args.tokenizer
    else:
        from welfare_server.model.bundled import ensure_default_model
        tokenizer_dir = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def table_builder(config):
        return MazeTokenTable.from_tokenizer(tokenizer, config)

    stamp = {"date": utc_now(), "machine": machine_name(args.device), "commit": git_commit()}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = []  # (provider, num_envs, metric, value, note)
    if args.device == "cuda":
        check_gpu_parity(args.size, 4096)
        results.append(("core-cuda", 4096, "bitwise_parity_with_cpu", 1.0, "grids, positions, keys, rewards"))
    routine = _maze_core.cpu_sampler_name()
    print(f"machine: {stamp['machine']}; maze generator routine: {routine}")
    missing = None if args.no_jumanji or args.device != "cpu" else jumanji_missing()
    if missing:
        print(missing)
        results.append(("jumanji", 0, "not_measured", float("nan"), missing))
    for num_envs in batches:
        for metric, value, note in bench_core(args.device, args.size, num_envs, table_builder, seconds, args.threads):
            if args.device == "cpu":
                note = "; ".join(x for x in (note, f"routine {routine}") if x)
            results.append((f"core-{args.device}", num_envs, metric, value, note))
        if args.device == "cpu":
            for metric, value, note in portable_reset_rows(args.size, num_envs, seconds, args.threads):
                results.append(("core-cpu", num_envs, metric, value, note))
        if not args.no_jumanji and not missing and args.device == "cpu":
            for metric, value, note in bench_jumanji(args.size, num_envs, seconds, measure_reset=num_envs == batches[0]):
                results.append(("jumanji", num_envs if metric == "steps_per_s" else 1, metric, value, note))
    if args.device == "cpu":
        for metric, value, note in bench_reference(args.size, seconds):
            results.append(("python-reference", 1, metric, value, note))
        # B=1 against the pure-Python reference of this run (whose loop also renders the text)
        reference = {m: v for p, n, m, v, _ in results if p == "python-reference"}
        for k, (provider, num_envs, metric, value, note) in enumerate(results):
            if provider != "core-cpu" or num_envs != 1:
                continue
            if metric.startswith(("steps_per_s", "episode_steps")):
                ratio = f"{value / reference['steps_per_s_with_text']:.2f}x python-reference steps/s"
            elif metric == "resets_per_s":
                ratio = f"{value / reference['resets_per_s']:.0f}x python-reference resets/s"
            else:
                continue
            results[k] = (provider, num_envs, metric, value, f"{note}; {ratio}")

    jumanji_steps = {n: v for p, n, m, v, _ in results if p == "jumanji" and m == "steps_per_s"}
    rows = []
    print(f"{'provider':18} {'B':>6} {'metric':34} {'value':>14} {'vs jumanji':>10}")
    for provider, num_envs, metric, value, note in results:
        ratio = ""
        if metric.startswith(("steps_per_s", "episode_steps")) and num_envs in jumanji_steps:
            ratio = f"{value / jumanji_steps[num_envs]:.1f}"
        rows.append({**stamp, "device": device_name, "provider": provider, "size": args.size,
                     "num_envs": num_envs, "metric": metric, "value": f"{value:.6g}",
                     "ratio_vs_jumanji": ratio, "note": "; ".join(x for x in (note, args.note) if x)})
        print(f"{provider:18} {num_envs:>6} {metric:34} {value:>14.4g} {ratio:>10}")
    append_rows(args.out, FIELDS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
