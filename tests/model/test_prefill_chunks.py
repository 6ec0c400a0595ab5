"""Chunked prefill (EngineConfig.prefill_chunk_tokens): prompts longer than a chunk give the
tokens, logprobs and monitor projections of a one-pass prefill and of HF + hooks; a prompt longer
than max_prefill_tokens runs; the only per-prompt bound left is max_context_len."""
import pytest
import torch

from tests.model.conftest import rand_prompts, rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import (Engine, EngineConfig, MonitorSpec, Request, RequestRefused,
                                         SamplingParams)
from welfare_server.model.hf_reference import hf_generate_steered, hook_steering
from welfare_server.model.steering import Scope, SteeringSpec, SteeringTerm, prompt_steer_mask


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True)


def hf_logprobs(lm, prompt, roles, spec, tokens):
    """Log-probabilities of `tokens` after `prompt` under HF + hooks, teacher-forced in one
    forward: the prompt steered as the scope says, generated tokens always."""
    seq = list(prompt) + list(tokens[:-1])
    scope = spec.scope if spec is not None else Scope.GENERATED
    mask = torch.cat([prompt_steer_mask(scope, roles, len(prompt)), torch.ones(len(tokens) - 1, dtype=torch.bool)])
    with torch.inference_mode(), hook_steering(lm.model, [spec], [mask], len(seq)):
        logp = lm.model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_chunked_prefill_matches_one_pass_and_hf(get_model, family):
    lm = get_model(family)
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    # Chunk 7: the 19- and 30-token prompts end mid-chunk in different chunks, the 5-token row
    # drops out after the first (leaving slots 0 and 2: the non-contiguous cache gather), and
    # 30 tokens exceed the tiny sliding window (24) of tiny-qwen2's upper layers.
    prompts = rand_prompts([19, 5, 30], seed=11)
    # Only prompt tokens 10..22 are "assistant": steering switches on and off inside chunks.
    roles_30 = ["user"] * 10 + ["assistant"] * 13 + ["user"] * 7
    roles = [None, None, roles_30]
    specs = [SteeringSpec([SteeringTerm(rand_vec(D, 1), [0, 2], 3.0, SteerMode.ADD_RENORM)], Scope.ALL),
             SteeringSpec([SteeringTerm(rand_vec(D, 2), [1], 4.0, SteerMode.ADD, "block_output")], Scope.GENERATED),
             SteeringSpec([SteeringTerm(rand_vec(D, 3), [1, L - 1], 6.0, SteerMode.ADD)],
                          Scope.ASSISTANT_AND_GENERATED)]
    monitor = MonitorSpec(torch.stack([rand_vec(D, 20), rand_vec(D, 21)]), [0, L - 1], "block_output")
    n = 6

    def run(chunk):
        eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64, prefill_chunk_tokens=chunk))
        return eng.generate([Request(prompt=p, prompt_roles=r, steering=s, sampling=greedy(n), monitor=monitor)
                             for p, r, s in zip(prompts, roles, specs)])

    chunked, one_pass = run(7), run(64)
    ref = hf_generate_steered(lm.model, prompts, specs, n, roles=roles)
    for c, o, p, r, s, want in zip(chunked, one_pass, prompts, roles, specs, ref):
        assert c.token_ids == o.token_ids == want
        assert c.logprobs == pytest.approx(o.logprobs, abs=1e-5)
        assert c.logprobs == pytest.approx(hf_logprobs(lm, p, r, s, want), abs=1e-5)
        # Row 0 of the monitor is the last prompt token's, taken from the chunk it lies in.
        torch.testing.assert_close(c.monitor, o.monitor, rtol=0, atol=1e-5)
    # The partial scope is not a no-op: the same prompt steered under ALL generates differently.
    all_scope = SteeringSpec(specs[2].terms, Scope.ALL)
    assert hf_generate_steered(lm.model, [prompts[2]], [all_scope], n) != [ref[2]]


def test_padded_positions_never_reach_the_cache(get_model):
    """Rows ending mid-chunk are padded to the chunk's end; only real tokens are written. With one
    new token there is no decode step, so a fresh engine's cache past each prompt stays zero."""
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=3, max_context_len=32, prefill_chunk_tokens=7))
    lens = [19, 5, 24]
    eng.generate([Request(prompt=p, sampling=greedy(1)) for p in rand_prompts(lens, seed=14)])
    for slot, n in enumerate(lens):  # slots are claimed in submission order on a fresh engine
        for cache in (eng.passes.k_cache, eng.passes.v_cache):
            assert cache[:, slot, :, :n].abs().amax(-1).gt(0).all()
            assert not cache[:, slot, :, n:].any()


def test_prompt_over_max_prefill_tokens_runs_and_context_still_bounds(get_model):
    lm = get_model("tiny-mistral")
    D = lm.config.hidden_size
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64, max_prefill_tokens=16,
                                  prefill_chunk_tokens=8))
    prompts = rand_prompts([40, 10], seed=12)
    specs = [SteeringSpec([SteeringTerm(rand_vec(D, 5), [1], 4.0)], Scope.ALL), None]
    outs = eng.generate([Request(prompt=p, steering=s, sampling=greedy(8)) for p, s in zip(prompts, specs)])
    assert [o.token_ids for o in outs] == hf_generate_steered(lm.model, prompts, specs, 8)
    with pytest.raises(RequestRefused, match=r"sampling.max_new_tokens: 25 with a context of 40 tokens exceeds "
                                             r"max_context_len=64"):
        eng.submit(Request(prompt=prompts[0], sampling=greedy(25)))
    with pytest.raises(RequestRefused, match="max_context_len=64"):
        eng.submit(Request(prompt=rand_prompts([64], seed=13)[0], sampling=greedy(1)))
    assert eng.num_waiting == 0


@pytest.mark.parametrize("chunk", [0, -3, 2.5])
def test_prefill_chunk_tokens_validated(get_model, chunk):
    with pytest.raises(ValueError, match=r"EngineConfig.prefill_chunk_tokens: .* \(must be >= 1\)"):
        EngineConfig(max_batch_slots=1, max_context_len=16, prefill_chunk_tokens=chunk)
