"""Token choice on tensors: finite noise for every hash value, allowed-token masks never broken,
masked log-probs a normalised distribution over the allowed tokens, rows independent of the batch."""
import pytest
import torch

from welfare_server.model.engine.sampling import SamplingRows, choose, gumbel_noise, hash_to_uniform


def test_every_hash_value_gives_finite_noise():
    # The extremes and a sweep of the top of the 32-bit range, where u could round to 1.0.
    h = torch.cat([torch.arange(0, 1 << 12), torch.arange((1 << 32) - (1 << 16), 1 << 32)]).to(torch.int64)
    u = hash_to_uniform(h)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_gumbel_noise_has_the_gumbel_mean_and_depends_on_seed_and_step():
    seeds = torch.arange(64, dtype=torch.int64)
    g = gumbel_noise(seeds, torch.zeros(64, dtype=torch.int64), 4096)
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.std().item() - 1.2825) < 0.01
    assert not torch.equal(g[0], g[1])
    assert not torch.equal(g[:1], gumbel_noise(seeds[:1], torch.ones(1, dtype=torch.int64), 4096))


def _rows(B, V, *, temperature, top_k=0, top_p=1.0, allowed=None, seed0=0):
    return SamplingRows(
        temperature=torch.full((B,), float(temperature)), top_k=torch.full((B,), top_k, dtype=torch.int64),
        top_p=torch.full((B,), float(top_p)), seed=torch.arange(seed0, seed0 + B, dtype=torch.int64),
        step=torch.zeros(B, dtype=torch.int64), allowed=allowed, all_greedy=temperature == 0,
        any_filter=top_k > 0 or top_p < 1, want_logprobs=True)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)])
def test_allowed_tokens_are_never_broken_and_masked_logprobs_are_normalised(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    B, V = 257, 97
    logits = torch.randn(B, V, generator=g) * 4
    allowed = torch.rand(B, V, generator=g) < 0.05
    allowed[torch.arange(B), torch.randint(0, V, (B,), generator=g)] = True  # at least one each
    choice = choose(logits, _rows(B, V, temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed))
    assert bool(allowed[torch.arange(B), choice.tokens].all())
    masked = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    torch.testing.assert_close(choice.masked_logprob, masked[torch.arange(B), choice.tokens])
    torch.testing.assert_close(choice.logprob, logits.log_softmax(-1)[torch.arange(B), choice.tokens])
    # The masked distribution is normalised over the allowed tokens (and only them).
    totals = torch.where(allowed, masked.exp(), torch.zeros(())).sum(-1)
    torch.testing.assert_close(totals, torch.ones(B))
    if temperature == 0:
        assert torch.equal(choice.tokens, masked.argmax(-1))


def test_a_row_chooses_the_same_whatever_the_batch_around_it():
    g = torch.Generator().manual_seed(3)
    B, V = 16, 300
    logits = torch.randn(B, V, generator=g)
    allowed = torch.rand(B, V, generator=g) < 0.5
    allowed[:, 0] = True
    full = choose(logits, _rows(B, V, temperature=0.9, top_p=0.95, allowed=allowed))
    for b in (0, 5, 15):
        alone = choose(logits[b:b + 1], _rows(1, V, temperature=0.9, top_p=0.95, allowed=allowed[b:b + 1], seed0=b))
        assert alone.tokens.item() == full.tokens[b].item()
        assert alone.masked_logprob.item() == full.masked_logprob[b].item()
