"""Fixtures of the vector tests: the tiny Llama preset (built once), its identity, a registry in a
fresh directory, and a helper that makes record tensors."""
import functools

import pytest
import torch

from welfare_server.model.loading import load_model
from welfare_server.vectors.registry import VectorRegistry
from welfare_server.vectors.types import model_identity


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return load_model(name, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    return _model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_identity(tiny):
    return model_identity(tiny)


@pytest.fixture
def registry(tmp_path):
    return VectorRegistry(tmp_path / "vectors")



def rand_rows(rows: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * scale
