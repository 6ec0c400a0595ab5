"""Concept-vector extraction: the engine's capture pass against a Hugging Face forward with hooks
doing the same extraction (what repeng / steering-vectors do: padded batches, a forward pre-hook on
every decoder block keeping the residual at each sequence's last token, the model's full forward
including its logits), in one run, on the paper's synthetic trajectories. Rows appended to
bench/results/extract.csv.

Both providers read the same examples (per_class trajectories of each of Mold/Gold/Path, all
layers) and their class means are compared in the same run (max abs difference reported). Figures:
seconds, tokens/s, the engine's GFLOP/s beside the GEMM roof measured in the same run (extraction
is a prefill: compute-bound on a CPU), ratio = HF seconds / engine seconds.

    python bench/bench_extract.py                    # 3 x 300 trajectories, the bundled model
    python bench/bench_extract.py --per-class 30     # a quicker run
    python bench/bench_extract.py --device cuda --dtype bfloat16 --per-class 5000 --no-hf
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS_DIR, append_rows, gemm_roof, git_commit, machine_name, sync, utc_now  # bench/ is sys.path[0]
from welfare_server.maze import MazeConfig, MazeTokenTable
from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.model.loading import load_model
from welfare_server.vectors.trajectories import synthetic_trajectories

FIELDS = ["date", "machine", "commit", "provider", "model", "dtype", "examples", "tokens", "seconds",
          "tokens_per_s", "gflop_per_s", "roof_gflop_per_s", "ratio_vs_hf", "max_abs_diff", "note"]


def hf_hooks_means(model, prompts, labels, num_classes, batch: int):
    """Class means [L, C, D] of the residual entering each block at each prompt's last token, by
    forward pre-hooks on HF's own forward over left-padded batches (the last token at -1)."""
    layers = model.model.layers
    L, D = len(layers), model.config.hidden_size
    sums = torch.zeros(L, num_classes, D, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    captured = {}

    def hook(index):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden[:, -1].double().cpu()
        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding: a fair peer
        for start in range(0, len(order), batch):
            group = order[start:start + batch]
            width = max(len(prompts[i]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.inference_mode():
                model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
            for row, i in enumerate(group):
                for layer in range(L):
                    sums[layer, labels[i]] += captured[layer][row]
                counts[labels[i]] += 1
    finally:
        for h in handles:
            h.remove()
    return (sums / counts[None, :, None]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--hf-batch", type=int, default=8, help="sequences per HF forward (length-sorted)")
    ap.add_argument("--slots", type=int, default=16, help="engine cache slots (rows per capture pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "extract.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    table = MazeTokenTable.from_tokenizer(loaded.tokenizer, MazeConfig())
    t0 = time.perf_counter()
    trajectories = synthetic_trajectories(table, args.per_class, seed=args.seed)
    generation = time.perf_counter() - t0
    prompts, labels = [t.token_ids for t in trajectories], [t.label for t in trajectories]
    tokens = sum(len(p) for p in prompts)
    roof = gemm_roof(loaded.device, loaded.dtype)
    stamp = dict(date=utc_now(), machine=machine_name(loaded.device), commit=git_commit(), model=args.model,
                 dtype=str(loaded.dtype).replace("torch.", ""), examples=len(prompts), tokens=tokens,
                 roof_gflop_per_s=f"{roof:.1f}")
    print(f"{stamp['machine']}: {len(prompts)} trajectories, {tokens} tokens drawn in {generation:.1f} s; "
          f"GEMM roof {roof:.1f} GFLOP/s")
    c = loaded.config
    D, L = c.hidden_size, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or D // c.num_attention_heads
    q_width, kv_width = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_token = 2 * L * (D * (q_width + 2 * kv_width) + q_width * D + 3 * D * c.intermediate_size)
    flops = sum(n * per_token + 2 * L * q_width * n * n for n in map(len, prompts))  # linears + causal attention

    engine = Engine(loaded, EngineConfig(max_batch_slots=args.slots, max_context_len=max(map(len, prompts)) + 1,
                                         max_prefill_tokens=8192))
    engine.capture(prompts[:2], labels[:2], 3)  # warm-up
    sync(loaded.device)
    t0 = time.perf_counter()
    engine_means = engine.capture(prompts, labels, 3).means
    sync(loaded.device)
    seconds = {"engine": time.perf_counter() - t0}
    rows = [dict(stamp, provider="engine", seconds=f"{seconds['engine']:.1f}",
                 tokens_per_s=f"{tokens / seconds['engine']:.0f}", gflop_per_s=f"{flops / seconds['engine'] / 1e9:.1f}",
                 ratio_vs_hf="", max_abs_diff="", note=args.note)]
    print(f"engine: {seconds['engine']:.1f} s, {tokens / seconds['engine']:.0f} tokens/s, "
          f"{flops / seconds['engine'] / 1e9:.1f} GFLOP/s ({flops / seconds['engine'] / 1e9 / roof:.0%} of the roof)")
    if not args.no_hf:
        hf_hooks_means(loaded.model, prompts[:2], labels[:2], 3, args.hf_batch)  # warm-up
        t0 = time.perf_counter()
        hf_means = hf_hooks_means(loaded.model, prompts, labels, 3, args.hf_batch)
        seconds["hf_hooks"] = time.perf_counter() - t0
        diff = float((hf_means - engine_means).abs().max())
        ratio = seconds["hf_hooks"] / seconds["engine"]
        rows[0].update(ratio_vs_hf=f"{ratio:.2f}", max_abs_diff=f"{diff:.2e}")
        rows.append(dict(stamp, provider="hf_hooks", seconds=f"{seconds['hf_hooks']:.1f}",
                         tokens_per_s=f"{tokens / seconds['hf_hooks']:.0f}", gflop_per_s="", ratio_vs_hf="1.00",
                         max_abs_diff=f"{diff:.2e}", note=f"batch {args.hf_batch}, length-sorted; {args.note}".strip("; ")))
        print(f"hf_hooks: {seconds['hf_hooks']:.1f} s; engine {ratio:.2f}x faster; class means differ by at most {diff:.2e}")
    append_rows(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
