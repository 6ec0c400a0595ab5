"""CPU linears at decode row counts, providers side by side in one run; rows appended to
bench/results/linear.csv.

The SmolLM2-135M shapes (fused as the engine runs them): 30 layers x [qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536] + lm_head 49152x576; y = x @ W.T for x of M rows.
Each figure streams the weights from memory as a decode step does: a shape's row times all 30
layers' weights of that shape back to back (the lm_head once, 113 MB in fp32), and the "model"
row every linear of the model in layer order with a small torch op between consecutive calls,
as the engine interleaves them (538 MB per pass in fp32, 269 MB in bf16).

Providers (all through welfare_server.model.cpu_linear.make_linear, so each pays what the
engine pays per call):
  mkl      F.linear on the weight (MKL / torch's own bf16 GEMM)
  onednn   oneDNN on the weight prepacked at construction (where this CPU packs the dtype)
  kernel   the C++ small-M kernel (welfare_server._cpu_linear) on the weight in place
  roof     read bandwidth measured in the same run: torch.sum of a 1 GB fp32 tensor
gbps = weight bytes / time; frac_roof = gbps / roof. Best of --repeats, providers round-robin.

Example:
  python bench/bench_linear.py --dtypes float32,bfloat16 --rows 1,2,4,8
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]; _common adds the repo root
from welfare_server.model import cpu_linear

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)
ROOF_BYTES = 1 << 30


def read_roof(repeats: int) -> float:
    """GB/s of torch.sum over a 1 GB fp32 tensor (best of repeats)."""
    big = torch.ones(ROOF_BYTES // 4)
    best = 0.0
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        big.sum()
        best = max(best, ROOF_BYTES / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,2,4,8", help="M values (rows of x)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per provider (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--providers", default="mkl,onednn,kernel")
    ap.add_argument("--out", default=str(RESULTS_DIR / "linear.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    # The kernel provider runs every M asked for, whatever cpu_linear's row limits say.
    for key in cpu_linear.KERNEL_MAX_ROWS:
        cpu_linear.KERNEL_MAX_ROWS[key] = 1 << 30
    machine, commit, date = machine_name("cpu"), git_commit(), utc_now()
    isa = cpu_linear.kernel_isa() or "none"
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        weights = {name: [torch.randn(*shape, generator=g).to(dtype) for _ in range(LAYERS)]
                   for name, shape in SHAPES.items()}
        weights["lm_head"] = [torch.randn(*LM_HEAD, generator=g).to(dtype)]
        order = [(name, i) for i in range(LAYERS) for name in SHAPES] + [("lm_head", 0)]
        providers = {}
        for p in args.providers.split(","):
            if p == "onednn" and not cpu_linear.packing_supported(dtype):
                print(f"# {dtype_name}: oneDNN does not pack this dtype on this CPU: no onednn rows")
                continue
            if p == "kernel" and not cpu_linear.kernel_available():
                print("# the small-M kernel is not built: no kernel rows")
                continue
            opts = {"mkl": dict(prepack=False, kernel=False), "onednn": dict(prepack=True, kernel=False),
                    "kernel": dict(prepack=False, kernel=True)}[p]
            providers[p] = {name: [cpu_linear.make_linear(w, **opts) for w in ws] for name, ws in weights.items()}
        nbytes = {name: sum(w.numel() * w.element_size() for w in ws) for name, ws in weights.items()}
        nbytes["model"] = sum(nbytes.values())
        for M in (int(m) for m in args.rows.split(",")):
            xs = {i: torch.randn(M, i, generator=g).to(dtype) for i in (576, 1536)}

            def shape_pass(lins):
                for lin in lins:
                    lin(xs[lin.weight.shape[1]])

            def model_pass(lins_by_name):
                a = torch.zeros(1, 576)
                for name, i in order:
                    lin = lins_by_name[name][i]
                    lin(xs[lin.weight.shape[1]])
                    a = a * 1.0001 + 0.1  # a small torch op between linears, as in the engine

            targets = list(weights) + ["model"]
            best = {(t, p): float("inf") for t in targets for p in providers}
            for p, lins in providers.items():  # warm-up (page faults, pool start)
                model_pass(lins)
            roof = read_roof(3)
            for _ in range(args.repeats):
                for t in targets:
                    for p, lins in providers.items():
                        t0 = time.perf_counter()
                        model_pass(lins) if t == "model" else shape_pass(lins[t])
                        best[(t, p)] = min(best[(t, p)], time.perf_counter() - t0)
            roof = max(roof, read_roof(2))
            for t in targets:
                shape = "x".join(map(str, SHAPES.get(t, LM_HEAD))) if t != "model" else "all"
                line = [f"{dtype_name:8s} M={M} {t:8s} {shape:10s}"]
                for p in providers:
                    s = best[(t, p)]
                    gbps = nbytes[t] / s / 1e9
                    rows_out.append(dict(date=date, machine=machine, commit=commit, dtype=dtype_name, target=t,
                                         shape=shape, M=M, provider=p, ms=round(s * 1e3, 3), gbps=round(gbps, 2),
                                         frac_roof=round(gbps / roof, 3), roof_gbps=round(roof, 2),
                                         isa=isa if p == "kernel" else "",
                                         note=f"best of {args.repeats}; {torch.get_num_threads()} threads; {args.note}".strip("; ")))
                    line.append(f"{p} {s * 1e3:7.2f} ms {gbps:5.1f} GB/s {gbps / roof:4.2f}")
                print("  ".join(line))
            print(f"{dtype_name} M={M}: read roof {roof:.1f} GB/s")
        del providers, weights
    append_rows(args.out, list(rows_out[0].keys()), rows_out)
    print(f"appended {len(rows_out)} rows to {args.out}")


if __name__ == "__main__":
    main()
