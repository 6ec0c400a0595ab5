"""Generation throughput, providers side by side in one run; rows appended to
bench/results/generate.csv.

Providers (greedy, ignore eos, every row generates exactly --new-tokens):
  hf_generate              HF generate, no steering
  hf_hooks_K=B_l1          HF generate + forward pre-hooks, every row its own vector, one layer
  engine                   the engine, no steering
  engine_noprepack         (CPU only) the engine with EngineConfig.cpu_prepack=False: F.linear
                           (MKL) on the HF weights, the linear path before cpu_linear.py
  engine_K={k}_{l1|all}    the engine, k distinct vectors spread over the rows, at one layer
                           (the middle one) or at every layer (block input)
tok/s = batch * new_tokens / wall time of the whole generate call (prefill included).
ratio = tok/s / hf_generate tok/s measured in the same run (HF and the engine share one model
object, hence one dtype: compare fp32 with fp32, bf16 with bf16).

Model: random-init SmolLM2-135M shape (preset smollm2-135m-random) unless --model is given.
Examples:
  python bench/bench_generate.py --device cpu --dtype float32 --batches 1,8 --quick
  python bench/bench_generate.py --device cuda --dtype bfloat16 --batches 1,8,32,128,256
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, sync, utc_now  # bench/ is sys.path[0]; _common adds the repo root
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.hf_reference import hf_generate_steered
from welfare_server.model.loading import load_model
from welfare_server.model.steering import Scope, SteeringSpec, SteeringTerm



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default="smollm2-135m-random")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="32 new tokens, K in {1, batch} only, and HF hooks only at batch <= 8")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per provider (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new batch size after this many seconds (rows are appended per batch size)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "generate.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.new_tokens is None:
        args.new_tokens = 32 if args.quick else 128
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    dev = lm.device
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(max(batches), D, generator=g)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * 4.0
    n_new, T = args.new_tokens, args.prompt_len
    rows = []
    machine, commit = machine_name(dev), git_commit()
    date = utc_now()

    def spec_for(i, k, layers):
        if k == 0:
            return None
        return SteeringSpec([SteeringTerm(vectors[i % k], layers, 1.0, SteerMode.ADD)], Scope.ALL)

    t_start = time.perf_counter()
    for B in batches:
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            print(f"# time budget {args.budget_s:.0f}s spent: skipping batch {B}")
            continue
        prompts = [torch.randint(3, lm.config.vocab_size, (T,), generator=g).tolist() for _ in range(B)]
        runs: dict[str, callable] = {}
        runs["hf_generate"] = lambda n: hf_generate_steered(lm.model, prompts, [None] * B, n)
        if not args.quick or B <= 8:
            hook_specs = [spec_for(i, B, [L // 2]) for i in range(B)]
            runs[f"hf_hooks_K={B}_l1"] = lambda n: hf_generate_steered(lm.model, prompts, hook_specs, n)
        eng = Engine(lm, EngineConfig(max_batch_slots=B, max_context_len=T + n_new,
                                      max_bank_vectors=max(B, 8), max_prefill_tokens=max(8192, B * T)))
        t0 = time.perf_counter()
        warm = eng.warmup([eng.passes.bucket(B)], ctx=T + n_new)
        if warm:
            print(f"graph warm-up: {warm:.2f}s ({time.perf_counter() - t0:.2f}s)")

        def engine_run(specs):
            return lambda n: eng.generate([Request(prompt=p, steering=s, sampling=SamplingParams(
                max_new_tokens=n, ignore_eos=True)) for p, s in zip(prompts, specs)])

        runs["engine"] = engine_run([None] * B)
        if dev.type == "cpu":
            eng_ref = Engine(lm, EngineConfig(max_batch_slots=B, max_context_len=T + n_new, max_bank_vectors=8,
                                              max_prefill_tokens=max(8192, B * T), cpu_prepack=False))
            runs["engine_noprepack"] = lambda n: eng_ref.generate([Request(prompt=p, sampling=SamplingParams(
                max_new_tokens=n, ignore_eos=True)) for p in prompts])
        ks = sorted({1, B} if args.quick else {1, 8, B})
        for k in ks:
            for tag, layers in (("l1", [L // 2]), ("all", list(range(L)))):
                runs[f"engine_K={k}_{tag}"] = engine_run([spec_for(i, k, layers) for i in range(B)])
        # Providers run round-robin, best of --repeats: on a shared machine a burst of foreign
        # load then hits one repeat of one provider, not one provider as a whole.
        results = {name: 0.0 for name in runs}
        for name, fn in runs.items():
            fn(min(4, n_new))  # warm-up (and, on CUDA, graph capture for this batch)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                sync(dev)
                t0 = time.perf_counter()
                fn(n_new)
                sync(dev)
                results[name] = max(results[name], B * n_new / (time.perf_counter() - t0))
        base = results["hf_generate"]
        for name, tps in results.items():
            rows.append(dict(date=date, machine=machine, commit=commit, provider=name, batch=B,
                             prompt_len=T, new_tokens=n_new, dtype=str(lm.dtype).replace("torch.", ""),
                             tok_s=round(tps, 2), ratio_vs_hf=round(tps / base, 3),
                             note=f"best of {args.repeats}; {torch.get_num_threads()} threads; {args.note}".strip("; ")))
            print(f"B={B:4d} {name:22s} {tps:10.1f} tok/s  x{tps / base:.2f} vs HF generate"
                  f"  ({tps / results['engine']:.3f} of engine unsteered)" if name.startswith("engine") else
                  f"B={B:4d} {name:22s} {tps:10.1f} tok/s  x{tps / base:.2f} vs HF generate")
        del eng
        eng_ref = None
        # Appended per batch size, so a run cut short by a time limit keeps what it measured.
        append_rows(args.out, list(rows[0].keys()), rows)
        print(f"appended {len(rows)} rows to {args.out}")
        rows.clear()


if __name__ == "__main__":
    main()
