"""Steering / capture kernels vs eager PyTorch, torch.compile and the copy roof, side by side.

Providers, each on the same inputs in the same run:
- eager:   the torch reference (welfare_server.kernels.*_reference), what a hook-based
           implementation does: several launches and several passes over h
- compile: torch.compile of that reference (only at the target shapes by default: compiling every
           shape costs minutes; --compile all to force)
- triton:  our kernel (CUDA only; the CPU interpreter is not a speed provider)
- copy:    hidden.clone(), the same read+write bytes as one steering pass: the roof on this card
For steer_rmsnorm also "triton+norm": the Triton steer followed by a separate (compiled on CUDA)
RMSNorm, i.e. what the fused kernel saves one pass over.
With --sweep, at the shapes with T*D >= 16M, "triton[R..w..]" times the steer kernels under other
LaunchTunings (rows per program R, warps w) than the default, to choose the default from data.

Bytes per call = read + write of hidden (+ the normed write for steer_rmsnorm; capture reads only)
+ the distinct bank rows read. Figures: us (median) and GB/s; frac_copy = GB/s / copy GB/s.
Targets (H100/H200): every mode >= 90% of copy for T*D >= 16M; >= 4x eager for ADD and 15x for
ADD_RENORM at 65536 x 4096; fused steer+norm faster than triton+norm; one launch for T <= 256.

    python bench/bench_steer.py --device cuda             # the whole GPU benchmark
    python bench/bench_steer.py --device cuda --sweep     # plus alternative launch tunings
    python bench/bench_steer.py --device cpu --quick      # smoke run (eager / compile / copy)
Rows are appended to bench/results/steer.csv (or --out) with device name, git commit and date.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]; _common adds the repo root
from welfare_server.kernels import (SteerMode, capture_reference, rmsnorm_reference,
                                    steer_reference, steer_rmsnorm_reference)
from welfare_server.kernels.rows import DEFAULT_TUNING, LaunchTuning, launch_config

RESULTS = RESULTS_DIR / "steer.csv"
FIELDS = ["date", "device", "commit", "op", "dtype", "T", "D", "provider", "us", "gbps",
          "frac_copy", "speedup_vs_eager", "note"]
TARGET_TD = 16 * 2**20  # T*D from which the 90%-of-copy target applies
BANK_K = 16
# Alternatives to DEFAULT_TUNING timed by --sweep: fewer registers per thread (more warps), and
# more rows per program (more bytes per program); duplicates of the default are skipped.
SWEEP_TUNINGS = [LaunchTuning(4096, 8), LaunchTuning(8192, 16), LaunchTuning(2048, 8), LaunchTuning(16384, 16)]


def tuning_variants(D: int, T: int) -> dict:
    """Provider name -> LaunchTuning, for the distinct launch configurations SWEEP_TUNINGS give."""
    seen = {launch_config(D, T, DEFAULT_TUNING)}
    out = {}
    for tuning in SWEEP_TUNINGS:
        cfg = launch_config(D, T, tuning)
        if cfg not in seen:
            seen.add(cfg)
            out[f"triton[R{cfg[0]}w{cfg[2]}]"] = tuning
    return out


def timer(device: str, quick: bool):
    if device == "cuda":
        from triton.testing import do_bench

        # Short windows: the whole GPU run has to fit the lead's 120 s budget (gpu_check.sh).
        return lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3

    def cpu_time(fn):
        fn()
        times, t_end = [], time.perf_counter() + (0.3 if quick else 1.0)
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    return cpu_time


def count_launches(fn) -> int:
    """CUDA kernels one call launches (the decode-size target is exactly one)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make_inputs(T, D, dtype, device, mode, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype).to(device)
    bank = torch.randn(BANK_K, D, generator=g).to(dtype).to(device)
    # Every row steered (the engine's decode case), one term, vectors spread over the bank.
    tv = (torch.arange(T, dtype=torch.int32) % BANK_K)[:, None].to(device)
    tc = torch.full((T, 1), 4.0, device=device)
    tm = torch.full((T, 1), int(mode), dtype=torch.int32, device=device)
    return hidden, bank, tv, tc, tm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--compile", default="target", choices=["none", "target", "all"],
                    help="torch.compile provider: none, only at the largest shape (default), all shapes")
    ap.add_argument("--ops", default="add,add_renorm,steer_rmsnorm,capture,ablate,clamp")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the steer kernels under SWEEP_TUNINGS at the T*D >= 16M shapes (CUDA)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop starting new shapes after this many seconds (gpu_check.sh allows 120)")
    args = ap.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda but CUDA is not available")
        from welfare_server.kernels.capture import capture_triton
        from welfare_server.kernels.steer import steer_triton
        from welfare_server.kernels.steer_rmsnorm import steer_rmsnorm_triton
    if args.quick:
        Ts, Ds = ([1, 64, 4096], [576, 2048]) if device == "cpu" else ([1, 256, 65536], [576, 4096])
    else:
        Ts, Ds = [1, 64, 256, 4096, 65536], [576, 2048, 4096]
        if device == "cpu":
            Ts = [t for t in Ts if t <= 4096]  # 65536 x 4096 eager on CPU: minutes per shape
    biggest = (max(Ts), max(Ds))
    torch._dynamo.config.cache_size_limit = 64
    time_us = timer(device, args.quick)
    es = torch.tensor([], dtype=dtype).element_size()
    dev_name, commit = machine_name(device), git_commit()
    date = utc_now()
    rows = []
    compiled = {}

    def get_compiled(name, fn, dynamic=False):
        if name not in compiled:
            compiled[name] = torch.compile(fn, dynamic=dynamic)
        return compiled[name]

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def flush():
        # Appended after every shape, so a run cut short by a timeout still leaves its rows.
        append_rows(args.out, FIELDS, rows)
        n = len(rows)
        rows.clear()
        return n

    t_start, written = time.perf_counter(), 0

    print(f"# {dev_name}  dtype={args.dtype}  commit={commit[:12] or '-'}  {date}")
    print(f"{'op':>14} {'T':>6} {'D':>5} {'provider':>12} {'us':>10} {'GB/s':>8} {'%copy':>6} {'xeager':>7}")
    # Most important first (target shape, ADD/ADD_RENORM), so a cut-short run keeps what matters.
    shapes = sorted(((T, D) for T in Ts for D in Ds), key=lambda td: (-td[0] * td[1], -td[1]))
    for op in args.ops.split(","):
        for T, D in shapes:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"# time budget {args.budget_s:.0f}s spent: skipping {op} T={T} D={D}")
                continue
            mode = {"add": SteerMode.ADD, "add_renorm": SteerMode.ADD_RENORM, "ablate": SteerMode.ABLATE,
                    "clamp": SteerMode.CLAMP}.get(op, SteerMode.ADD)
            hidden, bank, tv, tc, tm = make_inputs(T, D, dtype, device, mode)
            w = torch.ones(D, dtype=dtype, device=device)
            bank_bytes = min(BANK_K, T) * D * es
            passes = {"steer_rmsnorm": 3, "capture": 1}.get(op, 2)
            nbytes = passes * T * D * es + (bank_bytes if op != "capture" else 0)
            provs = {}
            sweep_here = args.sweep and T * D >= TARGET_TD
            if op == "capture":
                labels = (torch.arange(T, device=device) % 3)
                sums = torch.zeros(3, D, device=device)
                counts = torch.zeros(3, dtype=torch.int64, device=device)
                provs["eager"] = lambda: capture_reference(hidden, labels, sums, counts)
                cfn = lambda f: (lambda: f(hidden, labels, sums, counts))  # noqa: E731
                ref_fn = capture_reference
                if device == "cuda":
                    provs["triton"] = lambda: capture_triton(hidden, labels, sums, counts)
            elif op == "steer_rmsnorm":
                provs["eager"] = lambda: steer_rmsnorm_reference(hidden, bank, tv, tc, tm, w, 1e-6)
                cfn = lambda f: (lambda: f(hidden, bank, tv, tc, tm, w, 1e-6))  # noqa: E731
                ref_fn = steer_rmsnorm_reference
                if device == "cuda":
                    provs["triton"] = lambda: steer_rmsnorm_triton(hidden, bank, tv, tc, tm, w, 1e-6)
                    if sweep_here:
                        for name, tun in tuning_variants(D, T).items():
                            provs[name] = (lambda tun=tun: steer_rmsnorm_triton(hidden, bank, tv, tc, tm, w, 1e-6,
                                                                                 tuning=tun))
                    # A good separate norm (one read + one write), compiled once for all shapes.
                    norm_c = get_compiled("rmsnorm", rmsnorm_reference, dynamic=True)
                    provs["triton+norm"] = lambda: norm_c(steer_triton(hidden, bank, tv, tc, tm)[0], w, 1e-6)
            else:
                provs["eager"] = lambda: steer_reference(hidden, bank, tv, tc, tm)
                cfn = lambda f: (lambda: f(hidden, bank, tv, tc, tm))  # noqa: E731
                ref_fn = steer_reference
                if device == "cuda":
                    provs["triton"] = lambda: steer_triton(hidden, bank, tv, tc, tm)
                    if sweep_here:
                        for name, tun in tuning_variants(D, T).items():
                            provs[name] = lambda tun=tun: steer_triton(hidden, bank, tv, tc, tm, tuning=tun)
            want_compile = args.compile == "all" or (args.compile == "target" and (T, D) == biggest
                                                     and op in ("add", "add_renorm", "steer_rmsnorm"))
            if want_compile:
                provs["compile"] = cfn(get_compiled(op if op in ("capture", "steer_rmsnorm") else "steer", ref_fn))
            provs["copy"] = lambda: hidden.clone()
            res = {}
            for name, fn in provs.items():
                try:
                    res[name] = time_us(fn)
                except Exception as e:  # a provider failing (e.g. compile) must not sink the run
                    print(f"  {op} T={T} D={D} {name}: {type(e).__name__}: {str(e)[:200]}")
            copy_gbps = 2 * T * D * es / res["copy"] / 1e3 if "copy" in res else float("nan")
            launches = ""
            if device == "cuda" and "triton" in res and T == 1 and D == max(Ds):
                launches = f"launches={count_launches(provs['triton'])}"
            for name, us in res.items():
                b = 2 * T * D * es if name == "copy" else nbytes
                gbps = b / us / 1e3
                spd = res.get("eager", float("nan")) / us
                note = "roof" if name == "copy" else ("T*D>=16M" if T * D >= TARGET_TD else "")
                if name == "triton" and launches:
                    note = launches
                rows.append(dict(date=date, device=dev_name, commit=commit, op=op, dtype=args.dtype,
                                 T=T, D=D, provider=name, us=f"{us:.2f}", gbps=f"{gbps:.1f}",
                                 frac_copy=f"{gbps / copy_gbps:.3f}", speedup_vs_eager=f"{spd:.2f}", note=note))
                print(f"{op:>14} {T:>6} {D:>5} {name:>12} {us:>10.1f} {gbps:>8.1f} "
                      f"{100 * gbps / copy_gbps:>5.0f}% {spd:>7.2f}")
            del hidden, bank, tv, tc, tm, provs
            written += flush()
    print(f"# appended {written} rows to {args.out} in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
