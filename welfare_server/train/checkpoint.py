"""Checkpoints: safetensors files written atomically, enough to continue a run exactly.

A checkpoint is a directory checkpoints/step_{N:06d}/ holding
  weights.safetensors    the trained tensors (LoRA adapters, or every parameter under full
                         fine-tuning), by parameter name
  optimizer.safetensors  AdamW's per-parameter state (exp_avg, exp_avg_sq, step) by parameter name
  rng.safetensors        torch's CPU (and CUDA) generator states
  meta.json              the step, the config, the metrics lines written so far
It is written into a temporary sibling directory, each file flushed and fsynced, and renamed into
place (a rename within one directory is atomic on POSIX); then `latest` (a one-line file naming it)
is replaced the same way. A crash leaves either the previous checkpoint or the new one, never a
half-written one that `latest` points at.

Everything else a step depends on is a counter: the step's mazes and move seeds derive from
(seed, step), the learning rate and entropy coefficient from the step. So restoring the weights,
the optimizer and the generator states makes the next step exactly what it would have been.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """AdamW's state as flat tensors keyed '{param name}/{state key}'."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                out[f"{names[id(p)]}/{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = names[id(p)] + "/"
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in state.items()}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def replace_directory(final: Path, fill) -> Path:
    """Make directory `final` hold what fill(tmp) writes into a temporary sibling, atomically:
    the sibling is fsynced and renamed into place; an existing `final` is moved aside first and
    deleted once the new one is in place, so a reader sees the old directory or the new one."""
    final = Path(final)
    base = final.parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
    try:
        fill(tmp)
        _fsync_dir(tmp)
        stale = None
        if final.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".stale_{final.name}.", dir=base))
            os.replace(final, stale / final.name)
        os.replace(tmp, final)
        _fsync_dir(base)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                     meta: dict) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically (a rerun of the same step replaces
    it); returns its directory."""
    base = Path(root) / "checkpoints"

    def fill(tmp: Path) -> None:
        _save(weights, tmp / "weights.safetensors")
        _save(optimizer, tmp / "optimizer.safetensors")
        _save(rng_tensors(), tmp / "rng.safetensors")
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())

    final = replace_directory(base / f"step_{step:06d}", fill)
    pointer = base / ".latest.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, base / "latest")
    _fsync_dir(base)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The directory `latest` names under root/checkpoints, or None."""
    pointer = Path(root) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(weights, optimizer, rng, meta) of a checkpoint directory."""
    path = Path(path)
    with open(path / "meta.json") as f:
        meta = json.load(f)
    return (load_file(str(path / "weights.safetensors")), load_file(str(path / "optimizer.safetensors")),
            load_file(str(path / "rng.safetensors")), meta)
