"""The gRPC server under streaming load, beside the engine's offline throughput in the same run.
Rows appended to bench/results/server.csv.

A load generator (asyncio client, this process) keeps `concurrency` streams busy against a server
process (`welfare-server serve`, same model, same engine limits): each stream sends pre-tokenised
prompts back to back. Per request it records the time to first token, the gaps between tokens
(inter-token latency) and the time per output token; per run the throughput (completion tokens
per second of wall time) and its ratio to the engine serving the same requests offline (one
generate() call with the same number of slots, in this process, before the server starts).
Steered runs give every stream its own random vector at the middle layer.

    python bench/bench_server.py                                  # concurrency 1, 16, 64
    python bench/bench_server.py --model tiny-llama --concurrency 4 --requests 2   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams, Scope, SteeringSpec, SteeringTerm
from welfare_server.model.loading import load_model
from welfare_server.server.client import AsyncWelfareClient

FIELDS = ["date", "machine", "commit", "model", "dtype", "concurrency", "steered", "requests", "prompt_len",
          "new_tokens", "tok_s", "offline_tok_s", "ratio_vs_offline", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
          "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "note"]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_server(args, slots):
    command = [sys.executable, "-m", "welfare_server.cli", "serve", "--model", args.model, "--port", "0",
               "--no-extract-on-start", "--no-log-json", "--registry-root", args.registry,
               "--max-concurrent-requests", str(max(1024, slots * 4)), "--engine-max-batch-slots", str(slots),
               "--engine-max-context-len", str(args.prompt_len + args.new_tokens + 8), "--dtype", args.dtype,
               "--device", args.device, "--engine-max-bank-vectors", str(max(256, 2 * slots))]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in process.stderr:
        match = re.search(r"serving .* on [^:]+:(\d+)", line)
        if match:
            return process, int(match.group(1))
    raise RuntimeError("the server did not start")


async def load(address, prompts, vectors, layer, args):
    """Streams `len(prompts)` requests over `concurrency` workers; returns per-request timings."""
    timings, queue = [], asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))

    async def worker(client):
        while not queue.empty():
            i, prompt = queue.get_nowait()
            steering = [client.term(vectors[i], [layer], 4.0)] if vectors is not None else []
            started, stamps = time.perf_counter(), []
            async for event in client.generate(tokens=prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                                               steering=steering, scope="all", tokens_only=True):
                if event.DESCRIPTOR.name == "TokenDelta":
                    stamps.append(time.perf_counter())
            timings.append((started, stamps))

    async with AsyncWelfareClient(address, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency_now)))
        wall = time.perf_counter() - t0
    return timings, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--registry", default="/tmp/welfare_bench_registry")
    ap.add_argument("--out", default=str(RESULTS_DIR / "server.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    slots = max(levels)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    D, L = loaded.config.hidden_size, loaded.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    stamp = dict(date=utc_now(), machine=machine_name(loaded.device), commit=git_commit(), model=args.model,
                 dtype=str(loaded.dtype).replace("torch.", ""), prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    plans = []
    for c in levels:
        n = c * args.requests
        prompts = [torch.randint(3, loaded.config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
        vectors = torch.randn(n, D, generator=g)
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        plans.append((c, prompts, vectors))
    # Offline: the engine serving the same requests in this process, `c` slots, before any server.
    offline = {}
    for c, prompts, vectors in plans:
        engine = Engine(loaded, EngineConfig(max_batch_slots=c, max_context_len=args.prompt_len + args.new_tokens + 8,
                                             max_bank_vectors=max(256, 2 * c)))
        for steered in (False, True):
            requests = [Request(prompt=p, sampling=SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True),
                                steering=SteeringSpec([SteeringTerm(vectors[i], [L // 2], 4.0)], Scope.ALL)
                                if steered else None) for i, p in enumerate(prompts)]
            engine.generate(requests[:1])
            t0 = time.perf_counter()
            engine.generate(requests)
            offline[(c, steered)] = len(prompts) * args.new_tokens / (time.perf_counter() - t0)
        del engine
    process, port = start_server(args, slots)
    rows = []
    try:
        for c, prompts, vectors in plans:
            for steered in (False, True):
                args.concurrency_now = c
                asyncio.run(load(f"127.0.0.1:{port}", prompts[:c], vectors if steered else None, L // 2, args))
                timings, wall = asyncio.run(load(f"127.0.0.1:{port}", prompts, vectors if steered else None, L // 2,
                                                 args))
                tokens = sum(len(s) for _, s in timings)
                ttft = [1000 * (s[0] - t) for t, s in timings if s]
                tpot = [1000 * (s[-1] - s[0]) / (len(s) - 1) for _, s in timings if len(s) > 1]
                itl = [1000 * (b - a) for _, s in timings for a, b in zip(s, s[1:])]
                tps = tokens / wall
                row = dict(stamp, concurrency=c, steered=steered, requests=len(prompts), tok_s=f"{tps:.1f}",
                           offline_tok_s=f"{offline[(c, steered)]:.1f}",
                           ratio_vs_offline=f"{tps / offline[(c, steered)]:.3f}",
                           ttft_p50_ms=f"{percentile(ttft, 50):.1f}", ttft_p99_ms=f"{percentile(ttft, 99):.1f}",
                           tpot_p50_ms=f"{percentile(tpot, 50):.1f}", tpot_p99_ms=f"{percentile(tpot, 99):.1f}",
                           itl_p50_ms=f"{percentile(itl, 50):.1f}", itl_p99_ms=f"{percentile(itl, 99):.1f}",
                           note=args.note)
                rows.append(row)
                print(f"c={c:3d} {'steered' if steered else 'plain  '}: {tps:8.1f} tok/s "
                      f"({tps / offline[(c, steered)]:.2f} of offline {offline[(c, steered)]:.1f}); "
                      f"TTFT p50 {row['ttft_p50_ms']} ms p99 {row['ttft_p99_ms']}; TPOT p50 {row['tpot_p50_ms']} ms; "
                      f"ITL p99 {row['itl_p99_ms']} ms")
    finally:
        process.terminate()
        process.wait(60)
    append_rows(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
