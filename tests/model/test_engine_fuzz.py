"""Random traffic against one Engine: valid and invalid requests mixed, cancellations mid-flight,
limits small enough to make requests wait. Whatever arrives, the engine must refuse it at submit
with a named error or finish it; afterwards no slot, bank vector or monitor vector is leaked, and
every finished request's output is consistent with its sampling parameters."""
import random

import pytest
import torch

from tests.model.conftest import rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import (Engine, EngineConfig, MonitorSpec, Request, RequestRefused,
                                         SamplingParams)
from welfare_server.model.steering import Scope, SteeringError, SteeringSpec, SteeringTerm

LIMITS = dict(max_batch_slots=3, max_context_len=48, max_bank_vectors=4, max_terms_per_row=2,
              max_monitor_vectors=3, max_waiting=6, prefill_chunk_tokens=5, max_prefill_tokens=40)


def _random_request(rng: random.Random, D: int, L: int, vocab: int, persistent: list[int]) -> Request:
    """A request whose every field is valid most of the time and invalid now and then."""
    def maybe(bad, good, p=0.04):
        return bad if rng.random() < p else good

    n_prompt = maybe(rng.choice([0, 60]), rng.randint(1, 30))
    prompt = [maybe(rng.choice([-1, vocab]), rng.randrange(3, vocab), 0.003) for _ in range(n_prompt)]
    terms = []
    for _ in range(maybe(3, rng.randint(0, 2))):
        vector = rng.choice([rand_vec(D, rng.randrange(10**6))] + persistent +
                            [maybe(torch.full((D,), float("nan")), rand_vec(D, 1)), maybe(D + 5, 0, 0.2)])
        layers = maybe([L], rng.sample(range(L), rng.randint(1, L)))
        terms.append(SteeringTerm(vector, layers, maybe(float("inf"), rng.uniform(-4, 4)),
                                  rng.choice(list(SteerMode)), rng.choice(["block_input", "block_output"])))
    steering = SteeringSpec(terms, rng.choice(list(Scope))) if terms else None
    monitor = None
    if rng.random() < 0.3:
        monitor = MonitorSpec(torch.randn(maybe(4, rng.randint(1, 2)), D),
                              maybe([L + 1], [rng.randrange(L)]), maybe("nowhere", "block_input"))
    sampling = SamplingParams(
        temperature=maybe(-1.0, rng.choice([0.0, 0.7, 1.3])), top_p=maybe(0.0, rng.choice([1.0, 0.9])),
        top_k=maybe(-2, rng.choice([0, 5])), seed=rng.choice([None, rng.randrange(2**40)]),
        max_new_tokens=maybe(0, rng.randint(1, 12)), stop_token_ids=rng.choice([(), (rng.randrange(vocab),)]),
        ignore_eos=rng.random() < 0.5, logprobs=rng.random() < 0.5)
    return Request(prompt=prompt, sampling=sampling, steering=steering, monitor=monitor)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_never_leaks_or_crashes(get_model, seed):
    rng = random.Random(seed)
    lm = get_model("tiny-qwen2")
    D, L, vocab = lm.config.hidden_size, lm.config.num_hidden_layers, lm.config.vocab_size
    eng = Engine(lm, EngineConfig(**LIMITS, static_decode=bool(seed % 2)))
    persistent = [eng.register_vector(rand_vec(D, 99))]
    bank_free, monitor_free = eng.bank.num_free, eng.monitor_bank.num_free
    accepted, refused, waited = [], 0, False
    for _ in range(80):
        if rng.random() < 0.6:
            request = _random_request(rng, D, L, vocab, persistent)
            try:
                accepted.append((request, eng.submit(request)))
            except (RequestRefused, SteeringError) as e:
                assert str(e)  # a message naming what was wrong
                refused += 1
        live = [h for _, h in accepted if not h.done]
        if live and rng.random() < 0.15:
            rng.choice(live).cancel()
        eng.step()
        waited |= eng.num_waiting > 0
    eng.run_until_done(max_steps=500)
    assert not eng.has_work()
    # Every path was exercised: refusals, admissions, requests left waiting, cancellations.
    assert refused >= 3 and len(accepted) >= 10 and waited
    assert any(h.output.finish_reason == "cancelled" for _, h in accepted)
    for request, handle in accepted:
        out = handle.output
        sp = request.sampling
        assert out.finish_reason in ("stop", "length", "cancelled")
        assert len(out.token_ids) <= sp.max_new_tokens
        if out.finish_reason == "length":
            assert len(out.token_ids) == sp.max_new_tokens
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in set(sp.stop_token_ids) | (set() if sp.ignore_eos else eng.eos_ids)
        assert all(0 <= t < vocab for t in out.token_ids)
        if sp.logprobs and out.finish_reason != "cancelled":
            assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
        if request.monitor is not None and out.token_ids:
            assert out.monitor.shape[0] == len(out.token_ids)
            assert torch.isfinite(out.monitor).all()
    # Nothing leaked: every slot free, only the persistent vector left in the bank.
    assert eng.num_running == 0 and sorted(eng._free_slots) == list(range(LIMITS["max_batch_slots"]))
    assert eng.bank.num_free == bank_free and eng.monitor_bank.num_free == monitor_free
    assert (eng.passes.tv == -1).all()
