"""The C++ unit tests (tests/cpp, registered with ctest) built and run as part of the Python suite,
so a regression in the maze core that the Python tests miss still fails the test command.

The build is CPU-only (WELFARE_CUDA=OFF: CUDA code cannot run without a GPU, and the pip install
already compiles it) in build/ctest, reused between runs, so a rerun only recompiles what changed.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / "build" / "ctest"
BUILD_TIMEOUT_S = 1200
"""Configure + build limit (a cold build takes about a minute on 2 cores)."""


def _cmake_tool(name: str) -> str:
    """cmake/ctest from PATH, else the cmake package's binaries (installed with the test extra)."""
    found = shutil.which(name)
    if found:
        return found
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]'), which brings cmake")


def _run(cmd: list[str], what: str) -> str:
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{output[-6000:]}", pytrace=False)
    return output


def test_cpp_unit_tests_pass():
    cmake, ctest = _cmake_tool("cmake"), _cmake_tool("ctest")
    _run([cmake, "-S", str(ROOT), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release", "-DWELFARE_CUDA=OFF",
          "-DWELFARE_BUILD_PYTHON=OFF", "-DWELFARE_BUILD_TESTS=ON"], "cmake configure")
    _run([cmake, "--build", str(BUILD_DIR)], "cmake build of the C++ tests")
    output = _run([ctest, "--test-dir", str(BUILD_DIR), "--output-on-failure", "--timeout", "600"], "ctest")
    # An empty registry would pass vacuously: the suite must have run the known C++ tests.
    for name in ("maze_rules", "maze_cpu_backend", "cpu_linear", "cpu_decode"):
        assert f" {name} " in output and "Passed" in output, f"ctest did not run {name}:\n{output}"
    assert "100% tests passed" in output, output
