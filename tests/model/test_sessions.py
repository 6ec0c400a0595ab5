"""Multi-turn sessions: a continued session equals one long request over the same tokens (eager and
static decode, steered or not) without recomputing the kept prefix; a fork equals independent
sessions; the limits refuse or evict exactly as documented; closing frees the slot at once."""
import pytest
import torch

from tests.model.conftest import rand_prompts, rand_vec
from welfare_server.model.engine import (Engine, EngineConfig, Request, RequestRefused, SamplingParams, Scope,
                                         SteeringSpec, SteeringTerm)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True, **kw)


@pytest.fixture
def prefilled(monkeypatch):
    """Records how many tokens each prefill pass writes, per engine."""
    def watch(eng):
        counts = []
        original = eng.passes.prefill

        def prefill(rows):
            counts.extend(len(r.ids) for r in rows)
            return original(rows)
        monkeypatch.setattr(eng.passes, "prefill", prefill)
        return counts
    return watch


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("steered", [False, True])
def test_continued_session_equals_one_long_request(get_model, prefilled, static, steered):
    lm = get_model("tiny-qwen2")  # a sliding-window family: windows over a session's history too
    D = lm.config.hidden_size
    spec = SteeringSpec([SteeringTerm(rand_vec(D, 3), [1], 3.0)], Scope.ALL) if steered else None
    a, b, c = rand_prompts([9, 5, 7], seed=4)
    cfg = EngineConfig(max_batch_slots=3, max_context_len=96, static_decode=static, graph_ctx_bucket=16)
    eng = Engine(lm, cfg)
    counts = prefilled(eng)
    sid = eng.open_session()
    t1 = eng.generate([Request(prompt=a, session_id=sid, steering=spec, sampling=greedy(6))])[0]
    # Another request decodes in a higher slot while the session is idle: the static step runs
    # the session's slot too (as an idle row), which must not touch its cache.
    other = eng.generate([Request(prompt=rand_prompts([4], seed=8)[0], sampling=greedy(20))])[0]
    assert other.finish_reason == "length" and eng.sessions.sessions[sid].slot == 0
    t2 = eng.generate([Request(prompt=b, session_id=sid, steering=spec, sampling=greedy(5))])[0]
    t3 = eng.generate([Request(prompt=c, session_id=sid, steering=spec, sampling=greedy(4))])[0]
    # Each later turn prefilled only its new tokens and the previous answer's last token.
    assert counts[-2:] == [len(b) + 1, len(c) + 1]
    history = a + t1.token_ids + b + t2.token_ids + c + t3.token_ids
    assert eng.session_history(sid) == history
    fresh = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=96))
    long2 = fresh.generate([Request(prompt=a + t1.token_ids + b, steering=spec, sampling=greedy(5))])[0]
    long3 = fresh.generate([Request(prompt=a + t1.token_ids + b + t2.token_ids + c, steering=spec,
                                    sampling=greedy(4))])[0]
    assert t2.token_ids == long2.token_ids and t3.token_ids == long3.token_ids
    torch.testing.assert_close(torch.tensor(t3.logprobs), torch.tensor(long3.logprobs), atol=1e-4, rtol=0)


def test_fork_equals_independent_sessions_and_prefills_the_prefix_once(get_model, prefilled):
    lm = get_model("tiny-llama")
    prefix = rand_prompts([12], seed=5)[0]
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64))
    counts = prefilled(eng)
    root = eng.open_session()
    done = eng.generate([Request(prompt=prefix, session_id=root, sampling=SamplingParams(max_new_tokens=0))])[0]
    assert done.finish_reason == "length" and done.token_ids == []
    forks = eng.fork_session(root, 2)
    sampled = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    outs = eng.generate([Request(prompt=[], session_id=f, sampling=sp) for f, sp in zip(forks, sampled)])
    # The prefix was written once (all but its last token); each fork fed only that last token.
    assert counts == [len(prefix) - 1, 1, 1]
    assert outs[0].token_ids != outs[1].token_ids  # different seeds, really different rollouts
    for out, sp in zip(outs, sampled):
        alone = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64))
        assert alone.generate([Request(prompt=prefix, sampling=sp)])[0].token_ids == out.token_ids
    # The source is untouched by its forks and can still be played.
    assert eng.session_history(root) == prefix
    again = eng.generate([Request(prompt=[], session_id=root, sampling=sampled[0])])[0]
    assert again.token_ids == outs[0].token_ids


def test_limits_refuse_under_the_refuse_policy(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=3, max_context_len=40, max_sessions=2, max_session_tokens=30,
                                  session_policy="refuse"))
    p = rand_prompts([8], seed=1)[0]
    s1, s2 = eng.open_session("one"), eng.open_session()
    with pytest.raises(RequestRefused, match="max_sessions: 2 sessions are open, the limit is max_sessions=2"):
        eng.open_session()
    with pytest.raises(RequestRefused, match="session_id: 'one' is already open"):
        eng.open_session("one")
    eng.generate([Request(prompt=p, session_id=s1, sampling=greedy(10))])
    with pytest.raises(RequestRefused, match="request.session_id: the session would cache up to 18 tokens beside "
                                             "17 cached by the other sessions, more than max_session_tokens=30"):
        eng.submit(Request(prompt=p, session_id=s2, sampling=greedy(10)))
    with pytest.raises(RequestRefused, match="request.messages: a session's later turns give token ids"):
        eng.submit(Request(messages=[{"role": "user", "content": "hi"}], session_id=s1))
    with pytest.raises(RequestRefused, match="request.session_id: no open session 'nope'"):
        eng.submit(Request(prompt=p, session_id="nope"))
    busy = eng.submit(Request(prompt=[5], session_id=s1, sampling=greedy(2)))
    with pytest.raises(RequestRefused, match=f"session 'one' is busy with request '{busy.request_id}'"):
        eng.submit(Request(prompt=[5], session_id=s1, sampling=greedy(2)))
    eng.run_until_done()
    # Idle sessions hold their slots: with two of three held, a third request still runs; closing
    # frees a slot at once.
    assert len(eng._free_slots) == 2 and eng.sessions.sessions["one"].slot >= 0
    eng.close_session("one")
    assert len(eng._free_slots) == 3 and "one" not in eng.sessions.sessions
    with pytest.raises(RequestRefused, match="no open session 'one'"):
        eng.submit(Request(prompt=p, session_id="one"))


def test_evict_lru_closes_the_least_recently_used_idle_session_and_says_so(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=40, max_sessions=2, session_policy="evict_lru"))
    p = rand_prompts([6], seed=2)[0]
    old, new = eng.open_session(), eng.open_session()
    eng.generate([Request(prompt=p, session_id=old, sampling=greedy(2))])
    eng.generate([Request(prompt=p, session_id=new, sampling=greedy(2))])
    third = eng.open_session()  # max_sessions reached: `old` (least recently used) is evicted
    with pytest.raises(RequestRefused, match=rf"session {old!r} was closed by the engine: evicted \(least recently "
                                             r"used\) when max_sessions=2 was reached; open a new session"):
        eng.submit(Request(prompt=[], session_id=old, sampling=greedy(1)))
    # Both slots are held (`new` idle, `third` about to run): a plain request evicts `new` for a slot.
    eng.generate([Request(prompt=p, session_id=third, sampling=greedy(2))])
    out = eng.generate([Request(prompt=p, sampling=greedy(3))])[0]
    assert out.finish_reason == "length"
    with pytest.raises(RequestRefused, match="evicted .least recently used. to free a cache slot"):
        eng.submit(Request(prompt=[], session_id=new, sampling=greedy(1)))
    eng.close_session(old)  # forgetting a tombstone is allowed
    with pytest.raises(RequestRefused, match=f"no open session {old!r}"):
        eng.submit(Request(prompt=[], session_id=old, sampling=greedy(1)))


def test_session_commands_from_another_thread_run_on_the_loop_thread(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64))
    eng.start()
    try:
        sid = eng.open_session()
        first = eng.generate([Request(prompt=rand_prompts([5], seed=3)[0], session_id=sid, sampling=greedy(3))])[0]
        forks = eng.fork_session(sid, 2)
        outs = eng.generate([Request(prompt=[7, 8], session_id=f, sampling=greedy(3)) for f in forks])
        assert outs[0].token_ids == outs[1].token_ids and first.finish_reason == "length"
        for f in forks + [sid]:
            eng.close_session(f)
        assert len(eng._free_slots) == 4
    finally:
        eng.stop(timeout=10)


def test_a_pinned_session_is_never_evicted(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=40, max_sessions=2, session_policy="evict_lru"))
    p = rand_prompts([6], seed=2)[0]
    pinned = eng.open_session(pinned=True)
    other = eng.open_session()
    eng.generate([Request(prompt=p, session_id=pinned, sampling=greedy(2))])
    eng.generate([Request(prompt=p, session_id=other, sampling=greedy(2))])
    fork = eng.fork_session(pinned, 1)[0]  # room is made by evicting `other`, never `pinned`
    assert eng.sessions.sessions[fork].pinned and other not in eng.sessions.sessions
    with pytest.raises(RequestRefused, match="max_sessions: 2 sessions are open"):
        eng.open_session()  # both open sessions are pinned: nothing to evict
    # Both slots are held by pinned sessions: a plain request waits instead of evicting them.
    waiting = eng.submit(Request(prompt=p, sampling=greedy(2)))
    eng.step()
    assert not waiting.done and eng.num_waiting == 1
    eng.close_session(fork)
    eng.run_until_done()
    assert waiting.output.finish_reason == "length" and pinned in eng.sessions.sessions
