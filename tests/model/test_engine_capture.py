"""Engine.capture: class means of the residual entering each block at every prompt's last token,
through the engine's own prefill, equal a float64 reference from HF's hidden states; projections
too; requests running beside a capture are untouched."""
import pytest
import torch

from tests.model.conftest import rand_prompts
from welfare_server.model.engine import Engine, EngineConfig, Request, RequestRefused, SamplingParams


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma2"])
def test_capture_equals_a_float64_reference(get_model, family):
    lm = get_model(family)
    L, D = lm.config.num_hidden_layers, lm.config.hidden_size
    lengths = [1, 5, 9, 13, 22, 3, 17, 40, 8, 8, 11]
    prompts = rand_prompts(lengths, seed=4)
    labels = [0, 1, 2, 0, 1, 2, 0, -1, 1, 2, 0]
    eng = Engine(lm, EngineConfig(max_batch_slots=3, max_context_len=64, max_prefill_tokens=48, prefill_chunk_tokens=16))
    proj = torch.randn(L, 2, D, generator=torch.Generator().manual_seed(1))
    got = eng.capture(prompts, labels, 3, proj_vectors=proj)
    want_sums = torch.zeros(L, 3, D, dtype=torch.float64)
    for i, (p, c) in enumerate(zip(prompts, labels)):
        with torch.inference_mode():
            hidden = lm.model(torch.tensor([p]), output_hidden_states=True).hidden_states
        last = torch.stack([hidden[l][0, -1] for l in range(L)]).double()  # entering block l
        if c >= 0:
            want_sums[:, c] += last
        torch.testing.assert_close(got.projections[i].double(), torch.einsum("lpd,ld->lp", proj.double(), last),
                                   rtol=1e-4, atol=1e-3)
    assert got.counts.tolist() == [4, 3, 3]
    want_means = want_sums / torch.tensor([4, 3, 3], dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(got.means.double(), want_means, rtol=1e-4, atol=1e-4)


def test_capture_leaves_running_requests_alone_and_refuses_bad_input(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    prompt = rand_prompts([6], seed=2)[0]
    alone = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64)).generate(
        [Request(prompt=prompt, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])[0].token_ids
    handle = eng.submit(Request(prompt=prompt, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    result = eng.capture(rand_prompts([7, 30, 12], seed=9), [0, 1, 0], 2, layers=[0, 3])
    assert result.sums.shape == (2, 2, lm.config.hidden_size) and result.counts.tolist() == [2, 1]
    eng.run_until_done()
    assert handle.output.token_ids == alone
    with pytest.raises(RequestRefused, match=r"labels\[1\]: 2 is out of range"):
        eng.capture([[5], [6]], [0, 2], 2)
    with pytest.raises(RequestRefused, match="labels: 1 labels for 2 prompts"):
        eng.capture([[5], [6]], [0], 2)
    with pytest.raises(RequestRefused, match=r"layers\[0\]: 4 is out of range"):
        eng.capture([[5]], [0], 1, layers=[4])


def test_several_labellings_are_accumulated_in_one_pass(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    prompts = rand_prompts([4, 9, 6, 12, 3], seed=6)
    true = [0, 1, 0, 1, 1]
    permuted = [[t, p] for t, p in zip(true, [1, 0, 1, 1, 0])]
    both = eng.capture(prompts, permuted, 2)
    assert both.sums.shape == (4, 2, 2, lm.config.hidden_size) and both.counts.tolist() == [[2, 3], [2, 3]]
    alone = [eng.capture(prompts, [row[j] for row in permuted], 2) for j in range(2)]
    for j in range(2):
        torch.testing.assert_close(both.sums[:, j], alone[j].sums)
        torch.testing.assert_close(both.means[:, j], alone[j].means)
