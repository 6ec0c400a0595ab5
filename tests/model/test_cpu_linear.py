"""cpu_linear: the oneDNN-prepacked CPU linear equals F.linear (within the dtype's tolerance) on
odd shapes, with and without bias, wherever this CPU packs the dtype, and is exactly F.linear where
it cannot (bf16 on AVX2-only CPUs); the engine gives the same greedy tokens with and without it."""
import pytest
import torch
import torch.nn.functional as F

from tests.model.conftest import rand_prompts
from welfare_server.model import cpu_linear
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 8, 83])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_f_linear(dtype, rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(577, 83, generator=g).to(dtype)
    b = torch.randn(577, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 83, generator=g).to(dtype)
    lin = cpu_linear.make_linear(w, b)
    # make_linear packs exactly when oneDNN can pack this dtype on this CPU (detected here on its
    # own, not through cpu_linear), and falls back to F.linear otherwise.
    assert lin.is_packed == _onednn_packs(dtype)
    y = torch.full((rows, 577), float("nan"), dtype=dtype)
    y.copy_(lin(x))
    if lin.is_packed:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), atol=atol, rtol=rtol)
    else:
        assert torch.equal(y, F.linear(x, w, b))
    assert lin.weight is w  # the original is referenced, not copied


def _onednn_packs(dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 8)
        return True
    except (RuntimeError, AttributeError):
        return False


def test_packing_support_probe_matches_onednn():
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_linear.packing_supported(dtype) == _onednn_packs(dtype)
    assert not cpu_linear.packing_supported(torch.float16)  # never packed: F.linear


def test_fallbacks_are_f_linear():
    w = torch.randn(5, 3)
    assert not cpu_linear.make_linear(w, prepack=False).is_packed
    assert not cpu_linear.make_linear(w.half()).is_packed  # fp16 on CPU: F.linear
    x = torch.randn(2, 3)
    assert torch.equal(cpu_linear.make_linear(w, prepack=False)(x), F.linear(x, w))


def test_engine_prepack_on_off_same_tokens_and_refresh(get_model):
    lm = get_model("tiny-llama")
    prompts = rand_prompts([5, 17, 9], seed=2)

    def run(eng):
        return [o.token_ids for o in eng.generate(
            [Request(prompt=p, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in prompts])]

    cfg = {"max_batch_slots": 4, "max_context_len": 64}
    packed = Engine(lm, EngineConfig(**cfg))
    plain = Engine(lm, EngineConfig(cpu_prepack=False, **cfg))
    assert packed.adapter.lm_head.is_packed == cpu_linear.packing_supported(torch.float32)
    assert not plain.adapter.lm_head.is_packed
    assert run(packed) == run(plain)
    # The packed copies are snapshots: refresh_weights() picks up in-place weight changes.
    down = lm.model.model.layers[0].mlp.down_proj.weight
    saved = down.detach().clone()
    try:
        with torch.no_grad():
            down.mul_(-3.0)
        packed.refresh_weights()
        assert run(packed) == run(plain)
    finally:
        with torch.no_grad():
            down.copy_(saved)
        packed.refresh_weights()
