"""Engine behaviour: batch invariance, continuous batching, scopes, cancellation, stops,
sampling, logprobs, monitoring and bounded-memory refusals (tiny random models, CPU fp32)."""
import pytest
import torch

from tests.model.conftest import rand_prompts, rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import (Engine, EngineConfig, MonitorSpec, Request, RequestRefused,
                                         SamplingParams)
from welfare_server.model.hf_reference import hf_generate_steered
from welfare_server.model.prompts import render_chat
from welfare_server.model.steering import (Scope, SteeringError, SteeringSpec, SteeringTerm,
                                           prompt_steer_mask)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def spec(D, seed, layers, coef=3.0, mode=SteerMode.ADD, scope=Scope.ALL, point="block_input"):
    return SteeringSpec([SteeringTerm(rand_vec(D, seed), layers, coef, mode, point)], scope)


def test_batch_invariance_and_mid_flight_join(get_model):
    lm = get_model("tiny-llama")
    D = lm.config.hidden_size
    prompts = rand_prompts([7, 15, 4, 22], seed=9)
    specs = [spec(D, 1, [0]), None, spec(D, 2, [1, 3], mode=SteerMode.ADD_RENORM), spec(D, 3, [2], point="block_output")]
    alone = []
    for p, s in zip(prompts, specs):
        eng = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64))
        alone.append(eng.generate([Request(prompt=p, steering=s, sampling=greedy(10))])[0].token_ids)
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64))
    batched = [o.token_ids for o in eng.generate(
        [Request(prompt=p, steering=s, sampling=greedy(10)) for p, s in zip(prompts, specs)])]
    assert batched == alone
    # Requests join while others are mid-generation, and a finished one's slot is reused.
    eng = Engine(lm, EngineConfig(max_batch_slots=3, max_context_len=64))
    h0 = eng.submit(Request(prompt=prompts[0], steering=specs[0], sampling=greedy(10)))
    h1 = eng.submit(Request(prompt=prompts[1], steering=specs[1], sampling=greedy(4)))
    for _ in range(3):
        eng.step()
    h2 = eng.submit(Request(prompt=prompts[2], steering=specs[2], sampling=greedy(10)))
    eng.step()
    h3 = eng.submit(Request(prompt=prompts[3], steering=specs[3], sampling=greedy(10)))
    eng.run_until_done()
    assert h0.output.token_ids == alone[0]
    assert h1.output.token_ids == alone[1][:4] and h1.output.finish_reason == "length"
    assert h2.output.token_ids == alone[2]
    assert h3.output.token_ids == alone[3]


def test_chat_roles_and_scope_masks(get_model):
    lm = get_model("tiny-llama")
    tok = lm.tokenizer
    chat = [{"role": "user", "content": "Where now?"}, {"role": "assistant", "content": "N"},
            {"role": "user", "content": "And then?"}]
    ids, roles = render_chat(tok, chat)
    assert len(ids) == len(roles) and set(roles) == {"user", "assistant"}
    assistant_text = tok.decode([i for i, r in zip(ids, roles) if r == "assistant"])
    assert "N" in assistant_text and "Where" not in assistant_text and "then" not in assistant_text
    assert roles[-1] == "assistant"  # the generation prompt belongs to the assistant
    m = prompt_steer_mask(Scope.ASSISTANT_AND_GENERATED, roles, len(ids))
    assert m.tolist() == [r == "assistant" for r in roles]
    assert not prompt_steer_mask(Scope.GENERATED, roles, len(ids)).any()
    assert prompt_steer_mask(Scope.ALL, roles, len(ids)).all()
    # User-turn tokens untouched: monitor the residual at every prompt position by steering
    # with a huge vector; compare against the hook reference with the same roles, per scope.
    D = lm.config.hidden_size
    outs = {}
    for scope in Scope:
        s = spec(D, 4, [1], coef=6.0, scope=scope)
        ref = hf_generate_steered(lm.model, [ids], [s], 8, roles=[roles])[0]
        eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=128))
        got = eng.generate([Request(messages=chat, steering=s, sampling=greedy(8))])[0].token_ids
        assert got == ref, scope
        outs[scope] = got
    assert len(set(map(tuple, outs.values()))) > 1  # the scopes really differ


def test_cancellation_frees_slot(get_model):
    lm = get_model("tiny-mistral")
    D = lm.config.hidden_size
    eng = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64, max_bank_vectors=1))
    p = rand_prompts([6, 6], seed=2)
    h0 = eng.submit(Request(prompt=p[0], steering=spec(D, 1, [0]), sampling=greedy(40)))
    h1 = eng.submit(Request(prompt=p[1], steering=spec(D, 2, [0]), sampling=greedy(5)))
    eng.step()
    eng.step()
    assert not h0.done and eng.num_waiting == 1 and eng.bank.num_free == 0
    h0.cancel()
    eng.step()  # frees the slot and bank vector, admits h1
    assert h0.output.finish_reason == "cancelled" and 0 < len(h0.output.token_ids) < 40
    eng.run_until_done()
    solo = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64)).generate(
        [Request(prompt=p[1], steering=spec(D, 2, [0]), sampling=greedy(5))])[0]
    assert h1.output.token_ids == solo.token_ids and eng.bank.num_free == 1
    # Cancelling a queued request never runs it.
    h2 = eng.submit(Request(prompt=p[0], sampling=greedy(5)))
    h2.cancel()
    done = eng.step()
    assert h2.output.finish_reason == "cancelled" and h2.output.token_ids == [] and done[0].request_id == h2.request_id


def test_stop_token_ids_and_strings(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    p = rand_prompts([9], seed=4)[0]
    full = eng.generate([Request(prompt=p, sampling=greedy(12))])[0]
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    out = eng.generate([Request(prompt=p, sampling=greedy(12, stop_token_ids=[stop_tok]))])[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"
    text = full.text
    needle = text[len(text) // 2: len(text) // 2 + 3]
    assert needle
    out = eng.generate([Request(prompt=p, sampling=greedy(12, stop_strings=[needle]))])[0]
    assert out.finish_reason == "stop" and needle not in out.text and text.startswith(out.text)
    assert len(out.token_ids) < 12
    # eos stops unless ignore_eos
    eos = next(iter(eng.eos_ids))
    assert eos == lm.tokenizer.eos_token_id


def test_seeded_sampling_reproducible(get_model):
    lm = get_model("tiny-qwen3")
    p = rand_prompts([8, 12], seed=6)
    sp = lambda seed: SamplingParams(temperature=1.3, top_p=0.9, top_k=50, seed=seed,  # noqa: E731
                                     max_new_tokens=12, ignore_eos=True, logprobs=True)
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64))
    a = eng.generate([Request(prompt=p[0], sampling=sp(7))])[0]
    b = eng.generate([Request(prompt=p[1], sampling=sp(1)), Request(prompt=p[0], sampling=sp(7)),
                      Request(prompt=p[0], sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))])[1]
    c = eng.generate([Request(prompt=p[0], sampling=sp(8))])[0]
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert a.token_ids != c.token_ids
    assert all(lp <= 0 for lp in a.logprobs)


@pytest.mark.parametrize("family", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_logprobs_and_monitor_match_hf(get_model, family):
    """Gemma2's final soft-cap does not change an argmax, only the logprobs: checked here."""
    lm = get_model(family)
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    p = rand_prompts([10], seed=8)[0]
    mon = torch.stack([rand_vec(D, 20), rand_vec(D, 21), rand_vec(D, 22)])
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    out = eng.generate([Request(prompt=p, sampling=greedy(4, logprobs=True),
                                monitor=MonitorSpec(mon, [0, 2, L - 1]))])[0]
    assert out.monitor.shape == (4, 3, 3)
    seq = torch.tensor([p + out.token_ids[:-1]])
    with torch.inference_mode():
        hf = lm.model(seq, output_hidden_states=True)
    logp = hf.logits[0].float().log_softmax(-1)
    for i, t in enumerate(out.token_ids):
        pos = len(p) - 1 + i
        assert out.logprobs[i] == pytest.approx(float(logp[pos, t]), abs=1e-4)
        for j, layer in enumerate([0, 2, L - 1]):  # hidden_states[l] = residual entering block l
            expect = hf.hidden_states[layer][0, pos].float() @ mon.t()
            torch.testing.assert_close(out.monitor[i, j], expect, rtol=1e-4, atol=1e-3)


def test_bounded_memory_refusals_and_waits(get_model):
    lm = get_model("tiny-llama")
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    eng = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=32, max_bank_vectors=2,
                                  max_terms_per_row=2, max_waiting=3))
    p = rand_prompts([20], seed=1)[0]
    with pytest.raises(RequestRefused, match="max_context_len=32"):
        eng.submit(Request(prompt=p, sampling=greedy(13)))
    with pytest.raises(SteeringError, match=r"layers\[0\]: 4 is out of range \(layer indices are in \[-4, 4\)\)"):
        eng.submit(Request(prompt=p, sampling=greedy(4), steering=spec(D, 1, [L])))
    three = SteeringSpec([SteeringTerm(rand_vec(D, i), [0], 1.0) for i in range(3)])
    with pytest.raises(SteeringError, match="max_terms_per_row=2"):
        eng.submit(Request(prompt=p, sampling=greedy(4), steering=three))
    with pytest.raises(SteeringError, match=r"vector: shape \(3,\)"):
        eng.submit(Request(prompt=p, sampling=greedy(4), steering=SteeringSpec([SteeringTerm(torch.ones(3), [0])])))
    too_many = SteeringSpec([SteeringTerm(rand_vec(D, i), [i]) for i in range(3)])
    with pytest.raises(SteeringError, match="steering.terms: 3 new vectors, more than max_bank_vectors=2"):
        eng.submit(Request(prompt=p, sampling=greedy(4), steering=too_many))
    # A persistent vector takes a bank slot; a request needing 2 new ones waits until it is free.
    vid = eng.register_vector(rand_vec(D, 9))
    two = SteeringSpec([SteeringTerm(rand_vec(D, i), [i]) for i in range(2)])
    h = eng.submit(Request(prompt=p, sampling=greedy(2), steering=two))
    # A later request that fits is not held up behind it (no head-of-line blocking).
    later = eng.submit(Request(prompt=p, sampling=greedy(2)))
    for _ in range(4):
        eng.step()
    assert later.done and later.output.finish_reason == "length"
    assert eng.num_waiting == 1 and not h.done
    eng.remove_vector(vid)
    eng.run_until_done()
    assert h.output.finish_reason == "length"
    for _ in range(3):
        eng.submit(Request(prompt=p, sampling=greedy(2)))
    with pytest.raises(RequestRefused, match="max_waiting=3"):
        eng.submit(Request(prompt=p, sampling=greedy(2)))
    eng.run_until_done()
    assert eng.bank.num_free == 2 and eng.num_running == 0


def test_bank_ids_and_unsupported_family(get_model):
    lm = get_model("tiny-llama")
    D = lm.config.hidden_size
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    v = rand_vec(D, 3)
    vid = eng.register_vector(v)
    p = rand_prompts([8], seed=3)[0]
    by_id = eng.generate([Request(prompt=p, sampling=greedy(6), steering=SteeringSpec([SteeringTerm(vid, [1], 4.0)], Scope.ALL))])[0]
    by_tensor = eng.generate([Request(prompt=p, sampling=greedy(6), steering=SteeringSpec([SteeringTerm(v, [1], 4.0)], Scope.ALL))])[0]
    assert by_id.token_ids == by_tensor.token_ids
    with pytest.raises(SteeringError, match="not a live bank vector"):
        eng.submit(Request(prompt=p, sampling=greedy(4), steering=SteeringSpec([SteeringTerm(vid + 1, [0])])))

    class Fake:
        class config:
            model_type = "gpt2"
    from welfare_server.model.loading import LoadedModel
    with pytest.raises(NotImplementedError, match="gpt2"):
        Engine(LoadedModel(model=Fake(), name="x", device=torch.device("cpu"), dtype=torch.float32))


def test_reference_attention_keeps_gemma2_soft_cap(get_model):
    """HF's reference forward must soft-cap Gemma2's scores: "auto" asks for eager there (5.17
    would pick SDPA and drop the cap), and leaves other families to transformers (SDPA)."""
    from welfare_server.model.loading import RuntimeConfig, _attn_implementation
    assert get_model("tiny-gemma2").model.config._attn_implementation == "eager"
    assert get_model("tiny-llama").model.config._attn_implementation == "sdpa"
    assert _attn_implementation(RuntimeConfig(attn_implementation="sdpa"), get_model("tiny-gemma2").config) == "sdpa"


def test_length_dependent_rope_is_refused_in_any_layout(get_model):
    """rope_type 'dynamic' is refused whether the config holds one rope dict or one per layer
    type (Gemma3's layout)."""
    import copy
    lm = get_model("tiny-gemma3")
    bad = copy.copy(lm.model.config)
    bad.rope_parameters = dict(lm.config.rope_parameters, full_attention={"rope_type": "dynamic", "rope_theta": 1e6,
                                                                          "factor": 2.0})
    from welfare_server.model.loading import LoadedModel

    class Wrapped:
        config = bad
    with pytest.raises(NotImplementedError, match="dynamic"):
        Engine(LoadedModel(model=Wrapped(), name="x", device=torch.device("cpu"), dtype=torch.float32))


def test_submit_refuses_what_admission_or_sampling_would_fail_on(get_model):
    """Bad monitor vectors / sampling values are refused at submit, naming the field; before,
    some passed submit and raised inside step() with a slot already claimed."""
    lm = get_model("tiny-llama")
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    p = rand_prompts([8], seed=5)[0]
    bad_mon = torch.ones(2, D)
    bad_mon[1, 3] = float("nan")
    with pytest.raises(SteeringError, match="monitor.vectors: contains NaN"):
        eng.submit(Request(prompt=p, sampling=greedy(2), monitor=MonitorSpec(bad_mon, [0])))
    with pytest.raises(SteeringError, match=r"monitor.layers\[0\]: 1.5 is a float, not an int"):
        eng.submit(Request(prompt=p, sampling=greedy(2), monitor=MonitorSpec(torch.ones(1, D), [1.5])))
    with pytest.raises(RequestRefused, match="sampling.temperature"):
        eng.submit(Request(prompt=p, sampling=SamplingParams(temperature=float("nan"), max_new_tokens=2)))
    with pytest.raises(RequestRefused, match="sampling.top_p"):
        eng.submit(Request(prompt=p, sampling=SamplingParams(top_p=0.0, max_new_tokens=2)))
    with pytest.raises(RequestRefused, match="sampling.seed"):
        eng.submit(Request(prompt=p, sampling=SamplingParams(temperature=1.0, seed=2**64, max_new_tokens=2)))
    assert eng.num_waiting == 0
    out = eng.generate([Request(prompt=p, sampling=greedy(3))])[0]
    assert out.finish_reason == "length" and eng.num_running == 0 and eng.monitor_bank.num_free == 64
    # A layer named twice in one term (also as a negative index) is one term at that layer.
    eng1 = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64, max_terms_per_row=1))
    v = rand_vec(D, 3)
    twice = eng1.generate([Request(prompt=p, sampling=greedy(5), steering=SteeringSpec(
        [SteeringTerm(v, [1, 1, 1 - L], 4.0)], Scope.ALL))])[0]
    once = eng1.generate([Request(prompt=p, sampling=greedy(5), steering=SteeringSpec(
        [SteeringTerm(v, [1], 4.0)], Scope.ALL))])[0]
    assert twice.token_ids == once.token_ids


def test_warmup_captures_the_keys_decode_uses(get_model, monkeypatch):
    """warmup(ctx=n) prepares every context bucket a decode up to n tokens asks for (it used to
    capture ctx=n itself, a key decode never uses unless n is a bucket multiple), and refuses to
    run while requests hold cache rows."""
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64, graph_ctx_bucket=16,
                                  static_decode=True))
    keys = []
    eng.passes.use_graphs = True  # CPU: record the keys instead of capturing
    monkeypatch.setattr(eng.passes.graphs, "run", keys.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    eng.warmup([3], ctx=40)
    assert {k[1] for k in keys} == {16, 32, 48} and {k[0] for k in keys} == {4}
    assert {eng.passes.ctx_bucket(n) for n in range(1, 41)} <= {k[1] for k in keys}
    eng.submit(Request(prompt=rand_prompts([5], seed=1)[0], sampling=greedy(8)))
    eng.passes.use_graphs = False
    eng.step()
    eng.passes.use_graphs = True
    with pytest.raises(RuntimeError, match="before traffic"):
        eng.warmup([1])
