"""The two contracts the engine's clients rely on (docs/engine.md).

Weights: a trainer trains the very parameters the engine reads (the fused q/k/v and gate/up
tensors are shared with the HF modules, no copy), steps its optimizer in place, calls
refresh_weights(), and the engine then generates exactly what a fresh engine on the updated model
generates, while HF's own forward sees the same weights.

Concurrency: one thread owns the loop; submissions from other threads go through the queue and
never run a step themselves.
"""
import threading

import torch

from tests.model.conftest import rand_prompts
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.loading import load_model


def _greedy(eng, prompts, n=8):
    return [o.token_ids for o in eng.generate(
        [Request(prompt=p, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True)) for p in prompts])]


def test_a_trainer_updates_the_shared_weights_and_the_engine_serves_them_after_refresh():
    lm = load_model("tiny-qwen3", dtype="float32", device="cpu", seed=3)  # its own copy: trained here
    prompts = rand_prompts([6, 11], seed=7)
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    before = _greedy(eng, prompts)
    q_proj = lm.model.model.layers[1].self_attn.q_proj
    fused = eng.layers[1].qkv_lin.weight
    assert q_proj.weight.data_ptr() == fused.data_ptr()  # the HF parameter is a view of the fused tensor
    # A trainer: enable grads, one optimizer step on a language-model loss, in place.
    params = [p for p in lm.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=5.0)
    ids = torch.tensor([prompts[0] + before[0]])
    loss = -lm.model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).mean()
    loss.backward()
    optimizer.step()
    for p in params:
        p.requires_grad_(False)
    assert fused.data_ptr() == q_proj.weight.data_ptr()  # updated in place, still shared
    eng.refresh_weights()
    after = _greedy(eng, prompts)
    fresh = _greedy(Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64)), prompts)
    assert after == fresh and after != before
    with torch.inference_mode():  # HF's own forward reads the same, updated weights
        hf_next = lm.model(torch.tensor([prompts[1]])).logits[0, -1].argmax().item()
    assert hf_next == after[1][0]


def test_only_the_owning_thread_runs_steps(get_model):
    lm = get_model("tiny-llama")
    eng = Engine(lm, EngineConfig(max_batch_slots=2, max_context_len=64))
    stepping_threads = set()
    original = eng.step

    def step():
        stepping_threads.add(threading.current_thread().name)
        return original()

    eng.step = step
    eng.start()
    try:
        handles = []

        def client():
            handles.append(eng.submit(Request(prompt=rand_prompts([4], seed=1)[0],
                                              sampling=SamplingParams(max_new_tokens=4))))

        threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs = [h.wait(timeout=30) for h in handles]
    finally:
        eng.stop(timeout=10)
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    assert stepping_threads == {"welfare-engine"}
