"""The objectives in losses.py against values worked out by hand on small cases."""

import math

import pytest
import torch

from welfare_server.maze import GOLD, MOLD, PATH
from welfare_server.train import losses as L

INF = float("inf")


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected, atol=atol, rtol=0), f"{actual} != {expected}"


# ---------------------------------------------------------------------------------- advantages
RETURNS = torch.tensor([[1.0, 2.0, 3.0],
                        [0.0, 0.0, 6.0],
                        [5.0, 5.0, 5.0]])


def test_dr_grpo_advantages_are_centred_returns_without_std():
    # Means 2, 2, 5.
    close(L.group_advantages(RETURNS, normalise_std=False), [[-1, 0, 1], [-2, -2, 4], [0, 0, 0]])


def test_grpo_advantages_divide_by_the_unbiased_std_plus_eps():
    eps = L.GRPO_STD_EPS
    # Group 0: unbiased variance ((-1)^2 + 0 + 1^2) / 2 = 1 -> std 1.
    # Group 1: unbiased variance (4 + 4 + 16) / 2 = 12 -> std sqrt(12) (the population std would be sqrt(8)).
    # Group 2: all equal -> std 0 -> 0 / (0 + eps) = 0, not NaN.
    s = math.sqrt(12.0)
    expected = [[-1 / (1 + eps), 0, 1 / (1 + eps)],
                [-2 / (s + eps), -2 / (s + eps), 4 / (s + eps)],
                [0, 0, 0]]
    adv = L.group_advantages(RETURNS, normalise_std=True)
    close(adv, expected)
    assert torch.isfinite(adv).all()
    assert not torch.allclose(adv[1], torch.tensor([-2, -2, 4]) / math.sqrt(8.0), atol=1e-3)


def test_group_advantages_refuse_bad_shapes():
    with pytest.raises(ValueError, match="groups, group_size"):
        L.group_advantages(torch.zeros(6), normalise_std=False)
    with pytest.raises(ValueError, match="at least 2"):
        L.group_advantages(torch.zeros(3, 1), normalise_std=True)
    # Dr. GRPO with one episode per group is defined (every advantage 0).
    close(L.group_advantages(torch.tensor([[3.0], [4.0]]), normalise_std=False), [[0.0], [0.0]])


def test_returns_to_go():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    close(L.returns_to_go(rewards, 1.0), [10, 9, 7, 4])
    # gamma 0.5: G3 = 4, G2 = 3 + 2 = 5, G1 = 2 + 2.5 = 4.5, G0 = 1 + 2.25 = 3.25
    close(L.returns_to_go(rewards, 0.5), [3.25, 4.5, 5, 4])
    close(L.returns_to_go(rewards, 0.0), [1, 2, 3, 4])
    # Any leading shape: each row separately.
    batch = torch.stack([rewards, -rewards])
    close(L.returns_to_go(batch, 0.5), [[3.25, 4.5, 5, 4], [-3.25, -4.5, -5, -4]])


def test_reinforce_advantages_use_a_per_position_group_baseline():
    # Group 0: episodes [1, 3] and [0, -1]; group 1: two identical episodes.
    rewards = torch.tensor([[[1.0, 3.0], [0.0, -1.0]],
                            [[2.0, 2.0], [2.0, 2.0]]])
    # gamma 1: returns-to-go [4, 3] and [-1, -1]; baseline per turn [1.5, 1.0].
    close(L.reinforce_advantages(rewards, 1.0),
          [[[2.5, 2.0], [-2.5, -2.0]], [[0, 0], [0, 0]]])
    # gamma 0.5: returns-to-go [2.5, 3] and [-0.5, -1]; baseline per turn [1.0, 1.0].
    close(L.reinforce_advantages(rewards, 0.5),
          [[[1.5, 2.0], [-1.5, -2.0]], [[0, 0], [0, 0]]])
    with pytest.raises(ValueError, match="groups, group_size, turns"):
        L.reinforce_advantages(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------- the policy
def test_masked_log_softmax():
    logits = torch.tensor([math.log(1.0), math.log(2.0), math.log(3.0), 100.0])
    valid = torch.tensor([True, True, True, False])
    logp = L.masked_log_softmax(logits, valid)
    assert logp[3] == -INF
    close(logp.exp(), [1 / 6, 2 / 6, 3 / 6, 0])
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-6
    # Temperature 0.5 squares the odds: 1 : 4 : 9.
    close(L.masked_log_softmax(logits, valid, 0.5).exp(), [1 / 14, 4 / 14, 9 / 14, 0])
    # Reduced-precision logits come out in fp32.
    half = L.masked_log_softmax(logits.to(torch.bfloat16), valid)
    assert half.dtype == torch.float32
    close(half.exp(), [1 / 6, 2 / 6, 3 / 6, 0], atol=2e-2)


def test_entropy_with_invalid_moves_has_no_nan_in_value_or_gradient():
    logits = torch.tensor([[0.0, 0.0, 5.0, 7.0],
                           [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    valid = torch.tensor([[True, True, False, False],
                          [True, True, True, False]])
    h = L.entropy(L.masked_log_softmax(logits, valid))
    close(h.detach(), [math.log(2.0), math.log(3.0)])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # Uniform over the valid moves is the maximum: zero gradient; invalid moves get none either.
    close(logits.grad, torch.zeros(2, 4))

    skewed = torch.tensor([2.0, 0.0, 9.0, -3.0], requires_grad=True)
    ok = torch.tensor([True, True, False, True])
    L.entropy(L.masked_log_softmax(skewed, ok)).backward()
    assert torch.isfinite(skewed.grad).all() and skewed.grad[2] == 0
    assert skewed.grad[0] < 0 < skewed.grad[1]  # the bonus flattens: the likeliest move's logit goes down


# ---------------------------------------------------------------------------------- equalised entropy
def _h(*p):
    """Entropy of a distribution given by hand (nats)."""
    return -sum(x * math.log(x) for x in p if x > 0)


def test_equalised_entropy_value_is_the_conditional_entropy_of_the_move_given_the_tile():
    probs = torch.tensor([[0.4, 0.2, 0.3, 0.1],   # Path, Path, Mold, Gold
                          [0.5, 0.25, 0.25, 0.0],  # Mold, Mold, Gold, outside the grid
                          [0.2, 0.3, 0.5, 0.0]])   # one move per type (and one outside)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, True, False]])
    neighbours = torch.tensor([[PATH, PATH, MOLD, GOLD], [MOLD, MOLD, GOLD, -1], [PATH, MOLD, GOLD, -1]])
    logp = torch.where(valid, probs.log(), torch.full_like(probs, -INF))
    value = L.equalised_entropy(logp, valid, neighbours)
    # Row 0: Path group has mass 0.6 split 2/3 : 1/3; the single Mold and Gold moves contribute 0.
    row0 = 0.6 * _h(2 / 3, 1 / 3)
    # ... which is H(move) - H(tile): the conditional entropy H(move | tile type).
    assert abs(row0 - (_h(0.4, 0.2, 0.3, 0.1) - _h(0.6, 0.3, 0.1))) < 1e-12
    # Row 1: Mold group mass 0.75 split 2/3 : 1/3.
    row1 = 0.75 * _h(2 / 3, 1 / 3)
    close(value, [row0, row1, 0.0])
    # The plain entropy is larger whenever more than one tile type has mass.
    assert (L.entropy(logp) > value + 0.5).all()


def test_equalised_entropy_gradient_never_moves_a_tile_types_probability():
    torch.manual_seed(0)
    neighbours = torch.tensor([[PATH, PATH, MOLD, GOLD],
                               [MOLD, MOLD, MOLD, GOLD],
                               [PATH, GOLD, PATH, -1],
                               [GOLD, MOLD, PATH, MOLD]])
    valid = neighbours >= 0
    logits = (torch.randn(4, 4) * 2).requires_grad_(True)
    logp = L.masked_log_softmax(logits, valid)
    L.equalised_entropy(logp, valid, neighbours).sum().backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert (grad[~valid] == 0).all()
    for row in range(4):
        for tile in (PATH, MOLD, GOLD):
            member = valid[row] & (neighbours[row] == tile)
            if not member.any():
                continue
            # Shifting all logits of one tile type together changes that type's probability
            # pi(g) and nothing within the group: the bonus's derivative along it is 0.
            assert abs(float(grad[row][member].sum())) < 1e-6, (row, tile, grad[row])
            if int(member.sum()) == 1:
                assert abs(float(grad[row][member])) < 1e-6  # a group of one move contributes nothing
    # Within a group of several moves the gradient does act (it flattens the group).
    assert grad[0, :2].abs().sum() > 1e-3 and grad[1, :3].abs().sum() > 1e-3
    # The plain entropy, by contrast, moves mass between tile types (toward Mold in row 1, which
    # has three moves): its derivative along a type's logits is not 0.
    plain_logits = logits.detach().clone().requires_grad_(True)
    L.entropy(L.masked_log_softmax(plain_logits, valid)).sum().backward()
    mold_row1 = valid[1] & (neighbours[1] == MOLD)
    assert abs(float(plain_logits.grad[1][mold_row1].sum())) > 1e-3


def test_equalised_entropy_rows_lacking_a_tile_type_stay_finite():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.0]], requires_grad=True)
    valid = torch.tensor([[True, True, False, False]])
    neighbours = torch.tensor([[MOLD, MOLD, -1, -1]])  # no Path, no Gold at all
    value = L.equalised_entropy(L.masked_log_softmax(logits, valid), valid, neighbours)
    p = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    close(value.detach(), [_h(*p.tolist())])
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------- KL
def test_kl_to_reference():
    valid = torch.tensor([True, True, False, False])
    logp = L.masked_log_softmax(torch.tensor([math.log(3.0), 0.0, 4.0, 4.0]), valid)  # 0.75, 0.25
    ref = L.masked_log_softmax(torch.tensor([0.0, 0.0, -2.0, 1.0]), valid)  # 0.5, 0.5
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.1308...
    close(L.kl_to_reference(logp, ref), expected)
    close(L.kl_to_reference(logp, logp), 0.0)
    # Gradient through the invalid entries is finite (0 * -inf never appears).
    x = torch.tensor([math.log(3.0), 0.0, 4.0, 4.0], requires_grad=True)
    L.kl_to_reference(L.masked_log_softmax(x, valid), ref).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2:] == 0).all()
    assert x.grad[0] > 0  # pi(move 0) is above the reference's: the KL pulls it back


# ---------------------------------------------------------------------------------- dual-clip PPO
def test_dual_clip_ppo_by_hand():
    eps, c = 0.2, 3.0
    ratios = torch.tensor([1.5, 0.5, 5.0, 1.1, 0.5, 2.0])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, -1.0, 0.0])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(6)
    loss, clipped = L.dual_clip_ppo(logp, old, adv, eps, c)
    expected = [
        -1.2 * 2.0,  # A > 0, ratio 1.5: capped at (1 + eps) A
        -0.5 * 2.0,  # A > 0, ratio 0.5: min(rho A, 0.8 A) = rho A (no lower clip on a gain)
        3.0,         # A < 0, ratio 5: rho A = -5 bounded below by c A = -3
        1.1,         # A < 0, ratio 1.1 inside the range: -rho A
        0.8,         # A < 0, ratio 0.5: min(-0.5, -0.8) = -0.8
        0.0,         # A = 0
    ]
    close(loss.detach(), expected)
    close(clipped, [1, 0, 1, 0, 1, 0])
    loss.sum().backward()
    # Clipped terms carry no gradient; the others d(-rho A)/d log pi = -rho A.
    close(logp.grad, [0.0, -1.0, 0.0, 1.1, 0.0, 0.0])


def test_dual_clip_ppo_at_ratio_one_is_the_policy_gradient():
    logp = torch.tensor([-0.3, -1.2, -2.0], requires_grad=True)
    adv = torch.tensor([1.5, -2.0, 0.25])
    loss, clipped = L.dual_clip_ppo(logp, logp.detach(), adv, 0.2, 3.0)
    close(loss.detach(), -adv)
    loss.sum().backward()
    close(logp.grad, -adv)
    assert clipped.sum() == 0


# ---------------------------------------------------------------------------------- schedules
def test_cosine_coefficient():
    assert L.cosine_coefficient(1.0, 0.0, 0, 10) == pytest.approx(1.0)
    assert L.cosine_coefficient(1.0, 0.0, 10, 10) == pytest.approx(0.0)
    assert L.cosine_coefficient(1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert L.cosine_coefficient(0.01, 0.002, 5, 10) == pytest.approx(0.006)
    # A quarter of the way: end + (start - end) (1 + cos(pi / 4)) / 2.
    assert L.cosine_coefficient(1.0, 0.0, 1, 4) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert L.cosine_coefficient(1.0, 0.25, 20, 10) == pytest.approx(0.25)  # past the end: clamped
    assert L.cosine_coefficient(0.7, 0.0, 3, 0) == 0.7
