"""Shared fixtures: tiny random models are built once per session (a few hundred ms each)."""
import functools

import pytest
import torch

from welfare_server.model.loading import load_model

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return load_model(name, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def get_model():
    return _model



def rand_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def rand_vec(d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * scale
