"""Streaming: deltas reassemble to the final text exactly and never split a character (the office
emoji are three tokens each), cancellation frees the slot at the next step, a slow consumer gets a
named error without stalling anyone, and many threads submit, stream and cancel at once."""
import asyncio
import random
import threading

import pytest

from tests.model.conftest import rand_prompts
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.engine.stream import REPLACEMENT_CHAR, IncrementalText

OFFICE = ("\U0001F9FE", "\U0001F4C7", "\U0001F4D0")


def test_incremental_text_holds_back_partial_characters(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = f"To the north there is {OFFICE[0]}; to the east {OFFICE[1]}{OFFICE[2]} and é, ü, 中文!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok(OFFICE[0], add_special_tokens=False)["input_ids"]) == 3  # the case that matters
    inc = IncrementalText(tok)
    deltas = []
    for t in ids:
        inc.add(t)
        deltas.append(inc.delta())
    deltas.append(inc.finish(tok.decode(ids, skip_special_tokens=True)))
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    for emoji in OFFICE:  # each emoji arrives whole, in one delta
        assert sum(emoji in d for d in deltas) == 1
    assert sum(d == "" for d in deltas) >= 2 * 3  # the first two tokens of each emoji add nothing


def test_stop_strings_hold_back_what_could_start_one(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok, stop_strings=["STOP", "xyz"])
    deltas = []
    for t in ids:  # as the engine does: stop at the token that completes a stop string
        inc.add(t)
        if "STOP" in inc.text:
            break
        deltas.append(inc.delta())
    assert "S" not in "".join(deltas)  # nothing of the stop string was released
    final = inc.text[:inc.text.index("STOP")]
    deltas.append(inc.finish(final))
    assert "".join(deltas) == final == "alpha beta "


def _streamed(eng, request, timeout=30):
    handle = eng.submit(request)
    events = list(handle.stream(timeout=timeout))
    return handle, events


@pytest.mark.parametrize("stop_strings", [(), ("the",)])
def test_stream_reassembles_to_the_output_and_matches_plain_generation(get_model, stop_strings):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=96))
    prompt = rand_prompts([7], seed=11)[0]
    # Sampled from a set rich in multi-byte pieces (emoji parts, accents) and plain words.
    tok = lm.tokenizer
    pool = sorted({i for s in [*OFFICE, " the", " north", " é", "中", " and"] for i in tok(s, add_special_tokens=False)
                   ["input_ids"]})
    sp = dict(max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True, logprobs=True, allowed_token_ids=pool,
              stop_strings=stop_strings)
    handle, events = _streamed(eng, Request(prompt=prompt, sampling=SamplingParams(**sp), stream=True))
    out = handle.output
    assert events[-1].final and events[-1].finish_reason == out.finish_reason
    assert [e.token_id for e in events[:-1]] == out.token_ids
    assert "".join(e.text for e in events) == out.text
    assert [e.logprob for e in events[:-1]] == out.logprobs
    assert [e.masked_logprob for e in events[:-1]] == out.masked_logprobs
    assert events[-1].completion_tokens == len(out.token_ids) and events[-1].prompt_tokens == len(prompt)
    assert not any(e.text.endswith(REPLACEMENT_CHAR) for e in events[:-1])
    if stop_strings:
        assert out.finish_reason == "stop" and not out.text.endswith("the") and "the" not in out.text
    plain = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=96)).generate(
        [Request(prompt=prompt, sampling=SamplingParams(**sp))])[0]
    assert plain.token_ids == out.token_ids and plain.text == out.text


def test_cancel_mid_stream_frees_the_slot_at_the_next_step(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64))
    handle = eng.submit(Request(prompt=rand_prompts([5], seed=1)[0], stream=True,
                                sampling=SamplingParams(max_new_tokens=40, ignore_eos=True)))
    waiting = eng.submit(Request(prompt=rand_prompts([5], seed=2)[0],
                                 sampling=SamplingParams(max_new_tokens=5, ignore_eos=True)))
    stream = handle.stream(timeout=10)
    got = [next(stream) for _ in range(3)]
    assert [e.final for e in got] == [False] * 3 and eng.num_running == 1
    handle.cancel()
    eng.step()  # retires the cancelled request and admits the waiting one into its slot
    assert handle.done and handle.output.finish_reason == "cancelled"
    rest = list(stream)
    assert rest[-1].final and rest[-1].finish_reason == "cancelled"
    assert eng.num_running == 1 and eng._slots[0] is waiting._seq and len(waiting.output.token_ids) == 2
    eng.run_until_done()
    assert waiting.output.finish_reason == "length"


def test_a_slow_consumer_gets_a_named_error_and_stalls_nobody(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64, max_stream_events=3))
    slow = eng.submit(Request(prompt=rand_prompts([5], seed=1)[0], stream=True,
                              sampling=SamplingParams(max_new_tokens=30, ignore_eos=True)))
    other = eng.submit(Request(prompt=rand_prompts([6], seed=2)[0], sampling=SamplingParams(max_new_tokens=30,
                                                                                             ignore_eos=True)))
    eng.run_until_done()  # nobody reads `slow`'s stream
    assert slow.output.finish_reason == "error" and "max_stream_events=3" in slow.output.error
    assert len(slow.output.token_ids) == 4  # three buffered events, the fourth overflowed
    assert other.output.finish_reason == "length" and len(other.output.token_ids) == 30
    events = list(slow.stream(timeout=1))
    assert len(events) == 4 and events[-1].final and events[-1].error == slow.output.error


def test_many_threads_submit_stream_and_cancel_against_the_engine_thread(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64, max_waiting=64))
    prompts = rand_prompts([3, 9, 5, 12, 7, 4], seed=3)
    expected = {}
    for i, p in enumerate(prompts):
        expected[i] = Engine(lm, EngineConfig(max_batch_slots=1, max_context_len=64)).generate(
            [Request(prompt=p, sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0].token_ids
    errors, results = [], []
    eng.start()

    def client(worker):
        rng = random.Random(worker)
        try:
            for _ in range(6):
                i = rng.randrange(len(prompts))
                request = Request(prompt=prompts[i], stream=rng.random() < 0.5,
                                  sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
                handle = eng.submit(request)
                if rng.random() < 0.3:
                    handle.cancel()
                    out = handle.wait(timeout=30)
                    assert out.finish_reason in ("cancelled", "length")
                    continue
                if request.stream:
                    events = list(handle.stream(timeout=30))
                    assert [e.token_id for e in events[:-1]] == handle.output.token_ids
                out = handle.wait(timeout=30)
                results.append((i, out.token_ids))
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
    finally:
        eng.stop(timeout=10)
    assert not errors, errors
    assert len(results) >= 10
    for i, tokens in results:  # batch-invariant greedy: whatever ran beside it
        assert tokens == expected[i]
    assert eng.num_running == 0 and eng.num_waiting == 0 and len(eng._free_slots) == 4 and not eng._live_ids


def test_astream_from_asyncio(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    prompt = rand_prompts([5], seed=4)[0]
    eng.start()
    try:
        async def consume():
            handles = [eng.submit(Request(prompt=prompt, stream=True,
                                          sampling=SamplingParams(max_new_tokens=n, ignore_eos=True)))
                       for n in (5, 9)]

            async def collect(h):
                return [e async for e in h.astream()]
            return handles, await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), timeout=30)

        handles, streams = asyncio.run(consume())
    finally:
        eng.stop(timeout=10)
    for handle, events in zip(handles, streams):
        assert events[-1].final and [e.token_id for e in events[:-1]] == handle.output.token_ids
    assert streams[0][:5][0].token_id == streams[1][0].token_id  # same prompt, same greedy start
