"""Every bad request, by kind, is a named refusal at submit (the field, the value, the rule), nothing
is coerced, and a refusal leaves the engine exactly as it was; configs that can never serve are
refused when made. Then a property-based fuzz of random field values: each request is either
served or refused with a named error, and nothing else ever happens."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.model.conftest import rand_prompts, rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import (Engine, EngineConfig, MonitorSpec, Request, RequestRefused,
                                         SamplingParams, Scope, SteeringError, SteeringSpec, SteeringTerm)
from welfare_server.model.fields import InvalidRequest

L, D = 4, 64  # tiny-llama
PROMPT = rand_prompts([6], seed=3)[0]
VEC = rand_vec(D, 1)
LIMITS = dict(max_batch_slots=2, max_context_len=32, max_bank_vectors=3, max_monitor_vectors=2,
              max_waiting=4, max_stop_sequences=2, max_stop_string_chars=8, max_messages=3,
              max_message_chars=40, max_request_id_chars=10)


@pytest.fixture(scope="module")
def engine(get_model):
    eng = Engine(get_model("tiny-llama"), EngineConfig(**LIMITS))
    eng.persistent_id = eng.register_vector(rand_vec(D, 9))
    return eng


def _state(eng):
    """Everything a refusal must leave untouched."""
    return (eng.num_waiting, eng.num_running, tuple(eng._free_slots), eng.bank.num_free,
            eng.monitor_bank.num_free, frozenset(eng._live_ids), bool((eng.passes.tv == -1).all()),
            eng._seed_rng.get_state().clone(), next_id(eng))


def next_id(eng):
    return repr(eng._ids)  # "count(n)": the next request number, read without advancing it


def term(**kw):
    base = dict(vector=VEC, layers=[1], coefficient=2.0, mode=SteerMode.ADD, point="block_input")
    base.update(kw)
    return SteeringTerm(**base)


def req(**kw):
    base = dict(prompt=PROMPT, sampling=SamplingParams(max_new_tokens=3))
    base.update(kw)
    return Request(**base)


def samp(**kw):
    base = dict(max_new_tokens=3)
    base.update(kw)
    return req(sampling=SamplingParams(**base))


def steer(*terms, scope=Scope.ALL):
    return req(steering=SteeringSpec(list(terms), scope))


def monitor(**kw):
    base = dict(vectors=torch.ones(1, D), layers=[0], point="block_input")
    base.update(kw)
    return req(monitor=MonitorSpec(**base))


NAN_VEC = torch.full((D,), float("nan"))
# (kind, request, error class, field named, fragment of the rule)
BAD_REQUESTS = [
    # wrong types that used to raise raw Python errors
    ("type", lambda e: req(prompt=None, messages=[{"content": "hi"}]), RequestRefused,
     "request.messages[0].role", "missing"),
    ("type", lambda e: req(prompt=None, messages=[{"role": "user"}]), RequestRefused,
     "request.messages[0].content", "missing"),
    ("type", lambda e: req(prompt=None, messages=["hi"]), RequestRefused, "request.messages[0]", "expected a dict"),
    ("type", lambda e: req(prompt=None, messages="hi"), RequestRefused, "request.messages", "expected a list"),
    ("type", lambda e: req(prompt=None, messages=[{"role": "user", "content": 5}]), RequestRefused,
     "request.messages[0].content", "not a string"),
    ("type", lambda e: req(prompt=None, messages=[{"role": "user", "content": "x", "name": "a"}]),
     RequestRefused, "request.messages[0]", "unknown key 'name'"),
    ("type", lambda e: samp(max_new_tokens="8"), RequestRefused, "sampling.max_new_tokens", "not an int"),
    ("type", lambda e: samp(temperature="0.5"), RequestRefused, "sampling.temperature", "not a number"),
    ("type", lambda e: samp(stop_strings="abc"), RequestRefused, "sampling.stop_strings", "expected a list"),
    ("type", lambda e: steer(term(mode=None)), SteeringError, "steering.terms[0].mode", "not a SteerMode"),
    ("type", lambda e: steer(term(coefficient=None)), SteeringError, "steering.terms[0].coefficient",
     "not a number"),
    ("type", lambda e: steer(term(layers=1)), SteeringError, "steering.terms[0].layers", "expected a list"),
    ("type", lambda e: steer(term(layers="1")), SteeringError, "steering.terms[0].layers", "expected a list"),
    ("type", lambda e: req(steering=[term()]), SteeringError, "steering", "expected a SteeringSpec"),
    ("type", lambda e: req(steering=SteeringSpec([{"vector": VEC}])), SteeringError, "steering.terms[0]",
     "expected a SteeringTerm"),
    ("type", lambda e: steer(term(vector=VEC.tolist())), SteeringError, "steering.terms[0].vector",
     "expected a [D] tensor"),
    ("type", lambda e: req(sampling={"max_new_tokens": 3}), RequestRefused, "request.sampling",
     "expected a SamplingParams"),
    ("type", lambda e: req(monitor=torch.ones(1, D)), SteeringError, "monitor", "expected a MonitorSpec"),
    ("type", lambda e: "not a request", RequestRefused, "request", "expected a Request"),
    # values that used to be silently coerced
    ("coercion", lambda e: samp(max_new_tokens=2.5), RequestRefused, "sampling.max_new_tokens", "not an int"),
    ("coercion", lambda e: samp(max_new_tokens=True), RequestRefused, "sampling.max_new_tokens", "not an int"),
    ("coercion", lambda e: samp(top_k=2.0), RequestRefused, "sampling.top_k", "not an int"),
    ("coercion", lambda e: samp(seed=1.5, temperature=1.0), RequestRefused, "sampling.seed", "not an int"),
    ("coercion", lambda e: samp(ignore_eos=1), RequestRefused, "sampling.ignore_eos", "not a bool"),
    ("coercion", lambda e: samp(logprobs="yes"), RequestRefused, "sampling.logprobs", "not a bool"),
    ("coercion", lambda e: samp(temperature=True), RequestRefused, "sampling.temperature", "not a number"),
    ("coercion", lambda e: samp(stop_token_ids=[2.0]), RequestRefused, "sampling.stop_token_ids[0]", "not an int"),
    ("coercion", lambda e: samp(allowed_token_ids=torch.tensor([1.0, 2.0])), RequestRefused,
     "sampling.allowed_token_ids", "expected integer ids"),
    ("coercion", lambda e: steer(term(mode=1.7)), SteeringError, "steering.terms[0].mode", "not a SteerMode"),
    ("coercion", lambda e: steer(term(mode=True)), SteeringError, "steering.terms[0].mode", "not a SteerMode"),
    ("coercion", lambda e: steer(term(layers=[True])), SteeringError, "steering.terms[0].layers[0]", "not an int"),
    ("coercion", lambda e: steer(term(layers=[1.0])), SteeringError, "steering.terms[0].layers[0]", "not an int"),
    ("coercion", lambda e: steer(term(coefficient=True)), SteeringError, "steering.terms[0].coefficient",
     "not a number"),
    ("coercion", lambda e: steer(term(vector=True)), SteeringError, "steering.terms[0].vector", "expected a [D]"),
    ("coercion", lambda e: steer(term(vector=torch.arange(D))), SteeringError, "steering.terms[0].vector",
     "floating-point"),
    ("coercion", lambda e: req(prompt=[1.0, 2.0]), RequestRefused, "request.prompt[0]", "not an int"),
    ("coercion", lambda e: req(prompt=[True, 5]), RequestRefused, "request.prompt[0]", "not an int"),
    ("coercion", lambda e: req(prompt=torch.tensor([1.0, 2.0])), RequestRefused, "request.prompt",
     "expected integer ids"),
    ("coercion", lambda e: monitor(layers=[0.0]), SteeringError, "monitor.layers[0]", "not an int"),
    # values out of range and limits
    ("range", lambda e: req(prompt=[]), RequestRefused, "request.prompt", "empty"),
    ("range", lambda e: req(prompt=[-1]), RequestRefused, "request.prompt[0]", "[0, 49152)"),
    ("range", lambda e: req(prompt=[49152]), RequestRefused, "request.prompt[0]", "[0, 49152)"),
    ("range", lambda e: req(prompt=[5] * 32), RequestRefused, "request.prompt", "max_context_len=32"),
    ("range", lambda e: req(prompt=PROMPT, messages=[{"role": "user", "content": "x"}]), RequestRefused,
     "request", "exactly one of prompt"),
    ("range", lambda e: req(prompt=None), RequestRefused, "request", "exactly one of prompt"),
    ("range", lambda e: req(prompt=None, messages=[]), RequestRefused, "request.messages", "empty"),
    ("range", lambda e: req(prompt=None, messages=[{"role": "user", "content": "x"}] * 4), RequestRefused,
     "request.messages", "max_messages=3"),
    ("range", lambda e: req(prompt=None, messages=[{"role": "robot", "content": "x"}]), RequestRefused,
     "request.messages[0].role", "not one of"),
    ("range", lambda e: req(prompt=None, messages=[{"role": "user", "content": "x" * 41}]), RequestRefused,
     "request.messages[0].content", "limit 40"),
    ("range", lambda e: req(prompt_roles=["user"]), RequestRefused, "request.prompt_roles", "1 roles for 6"),
    ("range", lambda e: req(prompt_roles=["user"] * 5 + ["boss"]), RequestRefused, "request.prompt_roles[5]",
     "not one of"),
    ("range", lambda e: req(request_id=""), RequestRefused, "request.request_id", "empty"),
    ("range", lambda e: req(request_id="x" * 11), RequestRefused, "request.request_id", "limit 10"),
    ("range", lambda e: req(request_id=7), RequestRefused, "request.request_id", "not a string"),
    ("range", lambda e: samp(max_new_tokens=0), RequestRefused, "sampling.max_new_tokens", ">= 1"),
    ("range", lambda e: samp(max_new_tokens=27), RequestRefused, "sampling.max_new_tokens", "max_context_len=32"),
    ("range", lambda e: samp(temperature=-0.5), RequestRefused, "sampling.temperature", ">= 0"),
    ("range", lambda e: samp(temperature=float("nan")), RequestRefused, "sampling.temperature", "not finite"),
    ("range", lambda e: samp(temperature=float("inf")), RequestRefused, "sampling.temperature", "not finite"),
    ("range", lambda e: samp(top_p=0.0), RequestRefused, "sampling.top_p", "(0.0, 1.0]"),
    ("range", lambda e: samp(top_p=1.5), RequestRefused, "sampling.top_p", "(0.0, 1.0]"),
    ("range", lambda e: samp(top_k=-1), RequestRefused, "sampling.top_k", ">= 0"),
    ("range", lambda e: samp(seed=2**64), RequestRefused, "sampling.seed", "int64"),
    ("range", lambda e: samp(stop_strings=["a", "b", "c"]), RequestRefused, "sampling.stop_strings",
     "max_stop_sequences=2"),
    ("range", lambda e: samp(stop_strings=["abcdefghi"]), RequestRefused, "sampling.stop_strings[0]", "limit 8"),
    ("range", lambda e: samp(stop_strings=[""]), RequestRefused, "sampling.stop_strings[0]", "empty"),
    ("range", lambda e: samp(stop_token_ids=[-3]), RequestRefused, "sampling.stop_token_ids[0]", "[0, 49152)"),
    ("range", lambda e: samp(allowed_token_ids=[]), RequestRefused, "sampling.allowed_token_ids", "empty"),
    ("range", lambda e: samp(allowed_token_ids=[49152]), RequestRefused, "sampling.allowed_token_ids[0]",
     "[0, 49152)"),
    ("range", lambda e: steer(term(layers=[L])), SteeringError, "steering.terms[0].layers[0]", "[-4, 4)"),
    ("range", lambda e: steer(term(layers=[-L - 1])), SteeringError, "steering.terms[0].layers[0]", "[-4, 4)"),
    ("range", lambda e: steer(term(layers=[])), SteeringError, "steering.terms[0].layers", "empty"),
    ("range", lambda e: steer(term(mode=4)), SteeringError, "steering.terms[0].mode", "not a SteerMode"),
    ("range", lambda e: steer(term(point="middle")), SteeringError, "steering.terms[0].point", "not one of"),
    ("range", lambda e: steer(term(coefficient=float("inf"))), SteeringError, "steering.terms[0].coefficient",
     "not finite"),
    # one rule for every mode: ABLATE ignores its coefficient, a NaN is still refused
    ("range", lambda e: steer(term(coefficient=float("nan"), mode=SteerMode.ABLATE)), SteeringError,
     "steering.terms[0].coefficient", "in every mode"),
    ("range", lambda e: steer(term(vector=NAN_VEC)), SteeringError, "steering.terms[0].vector", "NaN"),
    ("range", lambda e: steer(term(vector=torch.ones(D + 1))), SteeringError, "steering.terms[0].vector",
     "shape (65,)"),
    ("range", lambda e: steer(term(vector=e.persistent_id + 1)), SteeringError, "steering.terms[0].vector",
     "not a live bank vector"),
    ("range", lambda e: steer(term(vector=-1)), SteeringError, "steering.terms[0].vector", "not a live bank"),
    ("range", lambda e: steer(*[term(vector=rand_vec(D, i), layers=[i]) for i in range(4)]), SteeringError,
     "steering.terms", "max_bank_vectors=3"),
    ("range", lambda e: steer(*[term()] * 5), SteeringError, "steering.terms[4]", "max_terms_per_row=4"),
    ("range", lambda e: req(steering=SteeringSpec([term()], "everything")), SteeringError, "steering.scope",
     "not one of"),
    ("range", lambda e: monitor(vectors=torch.ones(3, D)), SteeringError, "monitor.vectors",
     "max_monitor_vectors=2"),
    ("range", lambda e: monitor(vectors=torch.ones(0, D)), SteeringError, "monitor.vectors", "no vectors"),
    ("range", lambda e: monitor(vectors=torch.ones(D)), SteeringError, "monitor.vectors", "[M, 64]"),
    ("range", lambda e: monitor(layers=[L + 1]), SteeringError, "monitor.layers[0]", "[-4, 4)"),
    ("range", lambda e: monitor(point="nowhere"), SteeringError, "monitor.point", "not one of"),
]


@pytest.mark.parametrize("kind,build,error,field,rule", BAD_REQUESTS,
                         ids=[f"{k}-{i}" for i, (k, *_rest) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_a_named_refusal_that_changes_nothing(engine, kind, build, error, field, rule):
    request = build(engine)
    before = _state(engine)
    with pytest.raises(error) as caught:
        engine.submit(request)
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.field == field, str(caught.value)
    assert str(caught.value).startswith(field + ": ") and rule in str(caught.value), str(caught.value)
    after = _state(engine)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))


def test_duplicate_live_request_id_is_refused_until_it_finishes(engine):
    handle = engine.submit(req(request_id="one"))
    with pytest.raises(RequestRefused, match="request.request_id: 'one' is already used by a live request"):
        engine.submit(req(request_id="one"))
    engine.run_until_done()
    assert handle.output.finish_reason == "length"
    engine.generate([req(request_id="one")])  # free again once finished


def test_generate_with_one_bad_request_queues_nothing(engine):
    before = _state(engine)
    with pytest.raises(RequestRefused, match=r"requests\[1\].sampling.max_new_tokens: 2.5 is a float") as caught:
        engine.generate([req(), samp(max_new_tokens=2.5)])
    assert caught.value.field == "requests[1].sampling.max_new_tokens"
    after = _state(engine)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))
    # The good request was not left behind: the next call returns only its own outputs.
    outs = engine.generate([samp(max_new_tokens=2)])
    assert len(outs) == 1 and engine.num_waiting == 0 and not engine.has_work()


def test_a_full_queue_refuses_naming_max_waiting(engine):
    handles = [engine.submit(req()) for _ in range(LIMITS["max_waiting"])]
    before = _state(engine)
    with pytest.raises(RequestRefused, match="queue full: max_waiting=4"):
        engine.submit(req())
    assert _state(engine)[0] == before[0]
    engine.run_until_done()
    assert all(h.done for h in handles)


def test_accepted_values_are_served(engine):
    """The other side of strictness: numpy ints, tuples, int tensors, SteerMode ints and scope strings
    are what the docs say is accepted, and they run."""
    outs = engine.generate([
        req(prompt=tuple(np.array(PROMPT, dtype=np.int64)), sampling=SamplingParams(max_new_tokens=np.int64(2))),
        req(prompt=torch.tensor(PROMPT), steering=SteeringSpec((term(mode=2, coefficient=0, layers=(np.int32(1), -1)),),
                                                               "all")),
        samp(temperature=1, top_p=1, seed=-5, allowed_token_ids=[7, 9, 7]),
        req(prompt=None, messages=[{"role": "user", "content": ""}], monitor=MonitorSpec(torch.ones(2, D), [-1]),
            sampling=SamplingParams(max_new_tokens=1)),
    ])
    assert all(o.finish_reason in ("length", "stop") and o.token_ids for o in outs)
    assert set(outs[2].token_ids) <= {7, 9}


@pytest.mark.parametrize("field,value,rule", [
    ("max_batch_slots", 0, "(must be in [1, 65536])"),
    ("max_context_len", 0, "(must be in [2, 1048576])"),
    ("max_context_len", 1, "(must be in [2, 1048576])"),
    ("max_waiting", 0, "(must be >= 1)"),
    ("max_monitor_vectors", -1, "(must be >= 0)"),
    ("max_bank_vectors", True, "not an int"),
    ("max_terms_per_row", 5, "(must be in [1, 4])"),
    ("prefill_chunk_tokens", 2.0, "not an int"),
    ("use_cuda_graphs", 1, "not a bool"),
    ("static_decode", "yes", "not a bool"),
    ("graph_batch_buckets", (), "non-empty tuple of ints"),
    ("seed", -1, "(must be in [0, "),
])
def test_configs_that_can_never_serve_are_refused_when_made(field, value, rule):
    with pytest.raises(ValueError) as caught:
        EngineConfig(**{field: value})
    assert str(caught.value).startswith(f"EngineConfig.{field}: ") and rule in str(caught.value)


def test_monitoring_off_refuses_monitors_naming_its_own_limit(get_model):
    eng = Engine(get_model("tiny-llama"), EngineConfig(max_batch_slots=1, max_context_len=16, max_monitor_vectors=0,
                                                       max_bank_vectors=0))
    with pytest.raises(SteeringError, match=r"monitor.vectors: 1 vectors, more than max_monitor_vectors=0"):
        eng.submit(monitor())
    with pytest.raises(SteeringError, match=r"steering.terms: 1 new vectors, more than max_bank_vectors=0"):
        eng.submit(steer(term()))
    assert eng.generate([req()])[0].finish_reason == "length"


# ---------------------------------------------------------------- property-based fuzz
def _any_value():
    """Values of every kind a caller might pass for a field, valid or not."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 40), st.integers(-2**70, 2**70),
        st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=4),
        st.lists(st.integers(-2, 60000), max_size=4), st.just([True]), st.just("block_input"),
        st.sampled_from(list(SteerMode)), st.sampled_from(list(Scope)), st.just(VEC), st.just(NAN_VEC),
        st.just(torch.ones(2, D)), st.just(0))


@st.composite
def _requests(draw):
    def pick(valid):
        return draw(valid) if draw(st.floats(0, 1)) < 0.93 else draw(_any_value())

    sampling = SamplingParams(
        temperature=pick(st.sampled_from([0.0, 0.7, 1])), top_p=pick(st.sampled_from([1.0, 0.9])),
        top_k=pick(st.sampled_from([0, 5])), seed=pick(st.one_of(st.none(), st.integers(0, 2**40))),
        max_new_tokens=pick(st.integers(1, 4)), stop_strings=pick(st.sampled_from([(), ["a"]])),
        stop_token_ids=pick(st.sampled_from([(), [2], (17,)])), ignore_eos=pick(st.booleans()),
        logprobs=pick(st.booleans()), allowed_token_ids=pick(st.sampled_from([None, [5, 6, 7], (100,)])))
    terms = []
    for _ in range(draw(st.integers(0, 2))):
        terms.append(SteeringTerm(vector=pick(st.sampled_from([VEC, 0])), layers=pick(st.sampled_from([[0], [1, -1]])),
                                  coefficient=pick(st.floats(-4, 4)), mode=pick(st.sampled_from(list(SteerMode))),
                                  point=pick(st.sampled_from(["block_input", "block_output"]))))
    steering = SteeringSpec(terms, pick(st.sampled_from(list(Scope)))) if terms else pick(st.none())
    mon = None
    if draw(st.booleans()):
        mon = MonitorSpec(pick(st.just(torch.ones(1, D))), pick(st.sampled_from([[0], [2, 3]])),
                          pick(st.just("block_output")))
    if draw(st.booleans()):
        return Request(messages=pick(st.just([{"role": "user", "content": "hi"}])), sampling=sampling,
                       steering=steering, monitor=mon, request_id=pick(st.none()))
    return Request(prompt=pick(st.lists(st.integers(0, 49151), min_size=1, max_size=8)), sampling=sampling,
                   steering=steering, monitor=mon, prompt_roles=pick(st.none()), request_id=pick(st.none()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=_requests())
def test_fuzz_every_request_is_served_or_refused_with_a_named_error(engine, request):
    before = _state(engine)
    try:
        handle = engine.submit(request)
    except InvalidRequest as error:
        assert isinstance(error, (RequestRefused, SteeringError))
        assert error.field and str(error).startswith(error.field.split("[")[0]), str(error)
        event(f"refused: {error.field.split('[')[0].split('.')[0]}")
        after = _state(engine)
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))
        return
    event("served")
    engine.run_until_done(max_steps=50)
    out = handle.output
    sp = request.sampling
    assert out.finish_reason in ("stop", "length")
    assert 1 <= len(out.token_ids) <= sp.max_new_tokens
    if sp.allowed_token_ids is not None:
        assert set(out.token_ids) <= set(sp.allowed_token_ids)
    if sp.logprobs:
        assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 and math.isfinite(lp) for lp in out.logprobs)
    # Nothing leaked: only the persistent vector stays in the bank.
    assert not engine.has_work() and engine.bank.num_free == LIMITS["max_bank_vectors"] - 1
    assert engine.monitor_bank.num_free == LIMITS["max_monitor_vectors"]


def test_score_token_ids_return_raw_log_probs_at_every_step(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=32))
    ids = [17, 18, 19, 2]
    out = eng.generate([Request(prompt=PROMPT, sampling=SamplingParams(max_new_tokens=3, ignore_eos=True,
                                                                        score_token_ids=ids, logprobs=True))])[0]
    assert len(out.scores) == 3 and all(len(row) == 4 for row in out.scores)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([PROMPT + out.token_ids[:-1]])).logits[0, len(PROMPT) - 1:].float()
    want = logits.log_softmax(-1)[:, ids]
    torch.testing.assert_close(torch.tensor(out.scores), want, atol=1e-4, rtol=0)
    with pytest.raises(RequestRefused, match=r"sampling.score_token_ids: 65 token ids, more than max_score_tokens=64"):
        eng.submit(samp(score_token_ids=list(range(65))))
