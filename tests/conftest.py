"""Shared fixtures: the bundled model's directory and tokenizer (fetched and converted once)."""

import os

import pytest

TOKENIZER_DIR_ENV = "WELFARE_TOKENIZER_DIR"
"""Set on machines without network (the GPU machine) to a directory holding just the tokenizer files."""


@pytest.fixture(scope="session")
def bundled_model_dir():
    from welfare_server.model.bundled import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    from transformers import AutoTokenizer

    directory = os.environ.get(TOKENIZER_DIR_ENV) or request.getfixturevalue("bundled_model_dir")
    return AutoTokenizer.from_pretrained(directory)
