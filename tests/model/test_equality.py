"""Greedy outputs equal HF generate + forward hooks applying the same terms, with every row of
the batch steered differently (vector, mode, layer set, point, scope)."""
import pytest
import torch

from tests.model.conftest import FAMILIES, rand_prompts, rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.hf_reference import hf_generate_steered
from welfare_server.model.loading import load_model
from welfare_server.model.steering import Scope, SteeringSpec, SteeringTerm


def mixed_specs(D, L, scale):
    """One spec per row: none, ADD, ADD_RENORM at two points, ABLATE + CLAMP, all-layers ADD."""
    v = lambda s: rand_vec(D, s, scale)  # noqa: E731
    return [
        None,
        SteeringSpec([SteeringTerm(v(1), [1], 4.0, SteerMode.ADD)], Scope.ALL),
        SteeringSpec([SteeringTerm(v(2), [0, L - 1], 2.0, SteerMode.ADD_RENORM),
                      SteeringTerm(v(3), [1], 3.0, SteerMode.ADD, "block_output")], Scope.GENERATED),
        SteeringSpec([SteeringTerm(v(4), [L - 2], 0.0, SteerMode.ABLATE),
                      SteeringTerm(v(5), [L - 2], 5.0, SteerMode.CLAMP),
                      SteeringTerm(v(6), [0], -2.0, SteerMode.CLAMP, "block_output")], Scope.ALL),
        SteeringSpec([SteeringTerm(v(7), list(range(L)), 1.5, SteerMode.ADD)], Scope.ALL),
    ]


def run_engine(lm, prompts, specs, n, **cfg):
    eng = Engine(lm, EngineConfig(max_batch_slots=8, max_context_len=128, **cfg))
    reqs = [Request(prompt=p, steering=s, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for p, s in zip(prompts, specs)]
    return [o.token_ids for o in eng.generate(reqs)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_hooks(get_model, family):
    lm = get_model(family)
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    prompts = rand_prompts([5, 11, 19, 8, 30], seed=3)  # 30 + 14 > the tiny sliding window (24)
    specs = mixed_specs(D, L, scale=1.0)
    ref = hf_generate_steered(lm.model, prompts, specs, 14)
    got = run_engine(lm, prompts, specs, 14)
    assert got == ref
    # The steering is not a no-op: unsteered rows of the same prompts differ somewhere.
    plain = hf_generate_steered(lm.model, prompts, [None] * len(prompts), 14)
    assert any(a != b for a, b in zip(plain[1:], ref[1:]))


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-gemma2", "tiny-gemma3"])
def test_static_decode_path_matches(get_model, family):
    """The fixed-buffer decode (the CUDA-graph path, run eagerly on CPU) gives the same tokens."""
    lm = get_model(family)
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    prompts = rand_prompts([6, 13, 9, 21, 4], seed=5)
    specs = mixed_specs(D, L, 1.0)
    assert run_engine(lm, prompts, specs, 12, static_decode=True, graph_ctx_bucket=16) == \
        run_engine(lm, prompts, specs, 12)


@pytest.mark.real_model
def test_real_smollm2_matches_hf_hooks():
    lm = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    tok = lm.tokenizer
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": "Now count to five."}],
             [{"role": "user", "content": "Name a colour."}]]
    from welfare_server.model.prompts import render_chat
    rendered = [render_chat(tok, c) for c in chats]
    specs = [SteeringSpec([SteeringTerm(rand_vec(D, 11, 1.0), [L // 2], 8.0, SteerMode.ADD)]),
             SteeringSpec([SteeringTerm(rand_vec(D, 12, 1.0), [3, 10, 20], 4.0, SteerMode.ADD_RENORM)],
                          Scope.ASSISTANT_AND_GENERATED),
             None]
    ref = hf_generate_steered(lm.model, [r[0] for r in rendered], specs, 10,
                              roles=[r[1] for r in rendered])
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=256))
    outs = eng.generate([Request(messages=c, steering=s, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))
                         for c, s in zip(chats, specs)])
    assert [o.token_ids for o in outs] == ref
    assert "Paris" in tok.decode(hf_generate_steered(lm.model, [rendered[0][0]], [None], 10)[0])


# bf16 rounds differently in a cached decode step than in one teacher-forced forward, so exact
# equality with HF is not expected; a chosen token must be the reference's argmax up to this many
# nats (observed: at most 0.0625, at near ties), and its logprob within BF16_LOGPROB_TOL (observed:
# 0.38 on a steered row; bf16's ulp at logits of ~20 is 0.125).
BF16_ARGMAX_TOL = 0.25
BF16_LOGPROB_TOL = 0.5


@pytest.mark.real_model
def test_real_smollm2_bf16_picks_the_reference_argmax():
    """bf16 serving: every token the engine picks (greedy, rows steered differently) is the argmax,
    within bf16 tolerance, of HF's forward with hook steering over the same tokens."""
    from welfare_server.model.hf_reference import hook_steering
    from welfare_server.model.prompts import render_chat
    lm = load_model("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}],
             [{"role": "user", "content": "Name a colour."}]]
    specs = [SteeringSpec([SteeringTerm(rand_vec(D, 11, 0.2), [L // 2], 4.0, SteerMode.ADD)], Scope.ALL),
             None,
             SteeringSpec([SteeringTerm(rand_vec(D, 12, 1.0), [3, 10, 20], 4.0, SteerMode.ADD_RENORM)], Scope.ALL)]
    n = 24
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=256))
    outs = eng.generate([Request(messages=c, steering=s, sampling=SamplingParams(
        max_new_tokens=n, ignore_eos=True, logprobs=True)) for c, s in zip(chats, specs)])
    exact = 0
    for chat, spec, out in zip(chats, specs, outs):
        prompt, _ = render_chat(lm.tokenizer, chat)
        seq = torch.tensor([prompt + out.token_ids])
        # Scope.ALL steers every token, so one forward over prompt + output is the reference.
        with torch.inference_mode(), hook_steering(lm.model, [spec], [torch.ones(seq.shape[1], dtype=torch.bool)], -1):
            lp = lm.model(seq).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        chosen = lp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        gap = lp.max(-1).values - chosen
        assert gap.max() <= BF16_ARGMAX_TOL, (out.text, gap)
        assert (chosen - torch.tensor(out.logprobs)).abs().max() <= BF16_LOGPROB_TOL
        exact += int((gap == 0).sum())
    assert exact >= 0.9 * n * len(chats)  # near ties are rare, not the rule
    assert "sea" in outs[1].text.lower()  # the unsteered row is still the model's own answer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_cuda_graph_decode_matches_eager(family):
    """GPU: the captured decode (static buffers, Triton kernels with check_values=False inside
    the capture, graph replays across batch/ctx buckets as requests join and leave) gives the
    tokens of the eager decode."""
    lm = load_model(family, dtype="float32", device="cuda")
    D, L = lm.config.hidden_size, lm.config.num_hidden_layers
    prompts = rand_prompts([6, 13, 9, 21, 4], seed=5)
    specs = mixed_specs(D, L, 1.0)
    graphed = run_engine(lm, prompts, specs, 20, use_cuda_graphs=True, graph_ctx_bucket=16)
    eager = run_engine(lm, prompts, specs, 20, use_cuda_graphs=False)
    assert graphed == eager
