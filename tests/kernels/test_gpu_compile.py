"""The Triton kernels compile for real GPUs (sm_90) on this GPU-less machine, without spilling.

The interpreter tests check the kernels' arithmetic; this checks what the interpreter cannot: that
each launch the wrappers make compiles through Triton's NVIDIA backend and ptxas, and that a row
held in registers fits. It runs scripts/triton_aot.py in a subprocess because the kernels must be
decorated without TRITON_INTERPRET (which conftest sets for this process)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "triton_aot.py"


def _nvidia_backend_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"))


pytestmark = [
    pytest.mark.skipif(not _nvidia_backend_available(),
                       reason="triton's NVIDIA backend (with its ptxas) is not installed"),
    # On a GPU machine the other kernel tests compile and run these launches for real.
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: kernels are compiled by the real tests"),
]


def test_every_wrapper_launch_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [ln.split() for ln in r.stdout.splitlines()[1:-1]]
    kernels = {row[0] for row in rows}
    assert kernels == {"steer", "steer_rmsnorm", "capture"}, r.stdout
    # Both in-place and out-of-place steering, with and without monitors, were compiled.
    for flag in ("INPLACE=True", "INPLACE=False", "M=0", "M=8"):
        assert any(flag in ln for ln in r.stdout.splitlines() if ln.startswith("steer ")), flag
    summary = re.search(r"(\d+) distinct launches x 1 archs; 0 failed", r.stdout.splitlines()[-1])
    assert summary and int(summary.group(1)) == len(rows)


def _load_script():
    spec = importlib.util.spec_from_file_location("triton_aot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module of their class by name
    spec.loader.exec_module(module)
    return module


def test_spill_rule_counts_only_spills_at_the_register_cap():
    Compiled = _load_script().Compiled
    at_cap = Compiled(None, 90, regs=128, spill_stores=16, spill_loads=48, num_warps=16)
    below_cap = Compiled(None, 90, regs=96, spill_stores=0, spill_loads=4, num_warps=2)
    clean = Compiled(None, 90, regs=255, spill_stores=0, spill_loads=0, num_warps=4)
    assert at_cap.register_cap == 128 and at_cap.spills
    assert below_cap.register_cap == 248 and not below_cap.spills
    assert not clean.spills


def test_script_refuses_the_interpreter():
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr
