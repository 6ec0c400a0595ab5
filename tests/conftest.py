"""Shared fixtures: the bundled model's directory and tokenizer (fetched and converted once)."""

import pytest


@pytest.fixture(scope="session")
def bundled_model_dir():
    from welfare_server.model.bundled import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The bundled tokenizer; $WELFARE_TOKENIZER_DIR points it elsewhere on machines without
    network (the GPU machine), so tokenizer-only tests need no converted model there."""
    from transformers import AutoTokenizer

    from welfare_server.model.bundled import default_tokenizer_dir

    return AutoTokenizer.from_pretrained(default_tokenizer_dir())
