"""What every benchmark records beside its figures: the machine or card, the commit, the date,
and one way of appending rows to bench/results/*.csv."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Benchmarks run from a checkout (python bench/x.py) whether or not the package is installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "bench" / "results"
"""Where every benchmark appends its rows (one CSV per benchmark)."""


CPU_EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""Vector extensions that decide which CPU paths run (oneDNN bf16 packing, the maze's AVX-512
sampler); the machine column lists those present so rows of different CPUs are never compared
as if equal."""


from welfare_server.model.cpu_linear import cpu_flags  # noqa: E402  (after the sys.path line above)


def machine_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for CUDA; else the CPU model, its vector extensions (CPU_EXTENSIONS present)
    and how many threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    extensions = "+".join(x for x in CPU_EXTENSIONS if x in flags) or "no avx2"
    return f"{cpu} [{extensions}] ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """Short HEAD commit, with +dirty when tracked files differ from it; "uncommitted" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode != 0 or not head.stdout.strip():
            return "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "uncommitted"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append_rows(path: str | Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows to a CSV, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def sync(device) -> None:
    """Wait for the device's queued work (timing a CUDA call without it times the launch only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gemm_roof(device, dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of a large square matmul in `dtype` on `device`: what the device's GEMMs reach, the
    roof of a compute-bound pass (prefill, extraction, a rollout turn) measured in the same run."""
    import time

    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9
