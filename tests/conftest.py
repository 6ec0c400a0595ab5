"""Shared fixtures: the bundled model's directory and tokenizer (fetched and converted once)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # The suite shares 2 cores with other jobs: with two intra-op threads, an OpenMP region whose
    # second thread is preempted waits for it (a 47 us attention call took 7.7 ms on a loaded VM).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
