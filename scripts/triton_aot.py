"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and report its resources.

The kernels' launches are recorded, not run: each public wrapper (steer, steer_rmsnorm, capture) is
called on meta tensors with its kernel object swapped for a recorder, so the grid, the constexprs,
num_warps and the argument specialisation are exactly what a real launch on that shape would use
(Triton's own binder computes the specialisation). Each distinct launch is then compiled to a cubin
for the requested architectures, and Triton's bundled ptxas (-v) reports its registers and spill
bytes.

Why: CI has no GPU, and the interpreter (TRITON_INTERPRET=1) checks a kernel's arithmetic but not
that it compiles for a GPU, nor whether a row held in registers spills. A kernel that spills reads
and writes local memory on every element and is no longer one pass over the residual stream.

    python scripts/triton_aot.py                 # the full shape grid, sm_80 and sm_90
    python scripts/triton_aot.py --quick         # the subset CI compiles
Exit status 1 when a launch fails to compile, or spills at D <= SPILL_FREE_MAX_D. Rows wider than
that (up to MAX_TRITON_D) hold 32 fp32 values per thread per live tensor at 16 warps, and with
four terms or fp32 input ptxas spills a few bytes: those rows are reported, not failed.
Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels' compiled form).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from welfare_server.kernels import MAX_MONITORS, MAX_TERMS, MAX_TRITON_D  # noqa: E402

# The modules are shadowed by the functions of the same name in welfare_server.kernels.
STEER = importlib.import_module("welfare_server.kernels.steer")
STEER_RMSNORM = importlib.import_module("welfare_server.kernels.steer_rmsnorm")
CAPTURE = importlib.import_module("welfare_server.kernels.capture")
KERNELS = {  # module, the kernel's global name in it
    "steer": (STEER, "_steer_kernel"),
    "steer_rmsnorm": (STEER_RMSNORM, "_steer_rmsnorm_kernel"),
    "capture": (CAPTURE, "_capture_kernel"),
}
WARP_SIZE = 32
# Widest row the register-resident steer kernels must hold without spilling (Llama-70B's D).
SPILL_FREE_MAX_D = 8192


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded launch: what the wrapper would hand to Triton."""

    kernel: str
    shape: str
    D: int
    fn: object
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs: constexprs and launch options


@dataclasses.dataclass
class Compiled:
    launch: Launch
    arch: int
    regs: int
    spill_stores: int  # bytes per thread, as ptxas -v reports them
    spill_loads: int
    num_warps: int

    @property
    def register_cap(self) -> int:
        """Registers per thread a block of num_warps warps may use (64K per SM, 255 at most,
        allocated in units of 8)."""
        return min(255, 65536 // (WARP_SIZE * self.num_warps)) // 8 * 8

    @property
    def spills(self) -> bool:
        """Spill traffic forced by register pressure (registers at the cap). ptxas sometimes reports
        a few bytes of spill loads far below the cap, from how it places a value, not from a row
        that does not fit: those do not count."""
        return (self.spill_stores > 0 or self.spill_loads > 0) and self.regs >= self.register_cap


class _Recorder:
    def __init__(self, name: str, fn, sink: list, shape: str, D: int):
        self.name, self.fn, self.sink, self.shape, self.D = name, fn, sink, shape, D

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.shape, self.D, self.fn, args,
                                    tuple(sorted(kwargs.items()))))
        return launch


@contextlib.contextmanager
def recording(sink: list, shape: str, D: int):
    saved = {name: getattr(mod, attr) for name, (mod, attr) in KERNELS.items()}
    try:
        for name, (mod, attr) in KERNELS.items():
            setattr(mod, attr, _Recorder(name, saved[name], sink, shape, D))
        yield
    finally:
        for name, (mod, attr) in KERNELS.items():
            setattr(mod, attr, saved[name])


def record_launches(shapes, dtypes, term_counts, monitor_counts) -> list[Launch]:
    """Call each wrapper (and the norm-only rmsnorm) on meta tensors for every combination; keep one launch per distinct
    (kernel, constexprs, options, argument dtypes)."""
    launches: list[Launch] = []
    for T, D in shapes:
        for dt in dtypes:
            for nt in term_counts:
                for m in monitor_counts:
                    shape = f"T={T} D={D} {str(dt).removeprefix('torch.')} NT={nt} M={m}"
                    with recording(launches, shape, D):
                        _call_wrappers(T, D, dt, nt, m)
    unique: dict = {}
    for launch in launches:
        sig = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
        unique.setdefault((launch.kernel, launch.kwargs, sig), launch)
    return list(unique.values())


def _call_wrappers(T: int, D: int, dtype: torch.dtype, nt: int, m: int) -> None:
    meta = dict(device="meta")
    h = torch.empty(T, D, dtype=dtype, **meta)
    bank = torch.empty(16, D, dtype=dtype, **meta)
    tv = torch.empty(T, nt, dtype=torch.int32, **meta)
    tc = torch.empty(T, nt, dtype=torch.float32, **meta)
    tm = torch.empty(T, nt, dtype=torch.int32, **meta)
    mon = torch.empty(m, D, dtype=dtype, **meta) if m else None
    for inplace in (False, True):
        STEER.steer_triton(h, bank, tv, tc, tm, out=h if inplace else None, monitor=mon)
        STEER_RMSNORM.steer_rmsnorm_triton(h, bank, tv, tc, tm, torch.empty(D, dtype=dtype, **meta), 1e-5,
                                           out=h if inplace else None, monitor=mon)
    STEER_RMSNORM.rmsnorm_triton(h, torch.empty(D, dtype=dtype, **meta), 1e-5)  # the norm-only pass (NT=0)
    STEER_RMSNORM.add_rmsnorm_triton(h, torch.empty_like(h), torch.empty(D, dtype=dtype, **meta), 1e-5)
    STEER_RMSNORM.steer_rmsnorm_triton(h, bank, tv, tc, tm, torch.empty(D, dtype=dtype, **meta), 1e-5,
                                       residual=torch.empty_like(h))
    labels = torch.empty(T, dtype=torch.int64, **meta)
    for classes in (2, 64):  # both capture strategies: the unrolled class loop and per-row atomics
        CAPTURE.capture_triton(h, labels, torch.empty(classes, D, dtype=torch.float32, **meta),
                               torch.empty(classes, dtype=torch.int64, **meta),
                               proj_vectors=torch.empty(m, D, dtype=dtype, **meta) if m else None)


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def _resources(ptx: str) -> dict:
    """Registers and spill bytes as ptxas reports them for this PTX (same ptxas Triton uses)."""
    arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        text = subprocess.run([_ptxas(), "-v", f"-arch={arch}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"regs": int(re.search(r"Used (\d+) registers", text).group(1)),
            "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile as JITFunction.run would on a device of this architecture (same binder, same
    argument specialisation), without a driver."""
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    r = _resources(kernel.asm["ptx"])
    return Compiled(launch, arch, r["regs"], r["spill_stores"], r["spill_loads"], kernel.metadata.num_warps)


FULL = dict(shapes=[(1, 576), (256, 576), (4096, 576), (1, 2048), (4096, 2048), (1, 4096), (4096, 4096),
                    (1, 8192), (1, MAX_TRITON_D)],
            dtypes=[torch.float32, torch.bfloat16, torch.float16],
            term_counts=[1, MAX_TERMS], monitor_counts=[0, MAX_MONITORS])
QUICK = dict(shapes=[(1, 576), (4096, 4096), (1, 8192)], dtypes=[torch.bfloat16],
             term_counts=[MAX_TERMS], monitor_counts=[0, MAX_MONITORS])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small subset CI compiles")
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability x10 (80 = A100, 90 = H100/H200); repeatable; default 80 and 90")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter triton.jit returns interpreted functions, which do not compile.
        ap.error("run without TRITON_INTERPRET=1: this compiles the kernels for GPUs")
    archs = args.arch or [80, 90]
    launches = record_launches(**(QUICK if args.quick else FULL))
    failures = 0
    print(f"{'kernel':<14} {'arch':>4} {'warps':>5} {'regs':>4} {'spill st/ld':>11}  launch")
    for launch in launches:
        consts = " ".join(f"{k}={v}" for k, v in launch.kwargs)
        for arch in archs:
            try:
                c = compile_launch(launch, arch)
            except Exception as e:  # report every failing launch, not just the first
                failures += 1
                print(f"{launch.kernel:<14} {arch:>4} COMPILE FAILED ({type(e).__name__}: {e})  {launch.shape} {consts}")
                continue
            fails = c.spills and launch.D <= SPILL_FREE_MAX_D
            failures += fails
            flag = ("  SPILLS" if fails else f"  spills (D > {SPILL_FREE_MAX_D}: reported)") if c.spills else ""
            spill = f"{c.spill_stores}/{c.spill_loads}"
            print(f"{launch.kernel:<14} {arch:>4} {c.num_warps:>5} {c.regs:>4} {spill:>11}  "
                  f"{launch.shape} {consts}{flag}")
    print(f"{len(launches)} distinct launches x {len(archs)} archs; {failures} failed, or spilled at D <= {SPILL_FREE_MAX_D}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
