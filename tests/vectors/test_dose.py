"""Dose-response on the tiny model: the table's shape, alpha 0 equal to unsteered generation, norm-
matched controls, the rating expectation, judges and the config's checks."""
import math

import pytest
import torch

from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams, SteeringSpec, SteeringTerm
from welfare_server.vectors.dose import (DEFAULT_RATING_QUESTION, DoseConfig, Judge, ModelJudge, control_vectors,
                                         dose_response, expected_rating, load_self_report_prompts, rating_token_ids)
from welfare_server.vectors.types import ConceptVectors, LayerSelection

CLASSES = ("mold", "gold", "path")
PROMPTS = ("How's it going?", "How are you feeling right now?")


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny, EngineConfig(max_batch_slots=16, max_context_len=256))


@pytest.fixture(scope="module")
def cv(tiny_identity):
    g = torch.Generator().manual_seed(0)
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    means = torch.randn(L, 3, D, generator=g)
    selection = {c: LayerSelection([0.5] * L, [0.0] * L, [1.0] * L, best_layer=1 + (c == "mold")) for c in CLASSES}
    return ConceptVectors(tiny_identity, CLASSES, means, [4, 4, 4], "test", selection=selection)


class LengthJudge:
    """A judge whose score is known: the text's length (capped)."""

    score_range = (0.0, 100.0)

    def score(self, texts):
        return [float(min(len(t), 100)) for t in texts]


def test_self_report_prompts_ship_with_the_package():
    prompts = load_self_report_prompts()
    assert len(prompts) >= 8 and "How's it going?" in prompts
    assert len(set(prompts)) == len(prompts)


def test_rating_tokens_and_expectation(smollm2_tokenizer):
    ids = rating_token_ids(smollm2_tokenizer)
    assert len(set(ids)) == 9
    assert [smollm2_tokenizer.decode([i]) for i in ids] == [str(k) for k in range(1, 10)]
    uniform = [math.log(1 / 90)] * 9  # 0.1 of the mass spread evenly
    value, mass = expected_rating(uniform)
    assert value == pytest.approx(5.0) and mass == pytest.approx(0.1)
    one_hot = [-1e9] * 9
    one_hot[6] = math.log(0.5)
    assert expected_rating(one_hot) == pytest.approx((7.0, 0.5))
    two = [-1e9] * 9
    two[0], two[8] = math.log(0.3), math.log(0.1)  # renormalised: 0.75 on 1, 0.25 on 9
    assert expected_rating(two)[0] == pytest.approx(0.75 * 1 + 0.25 * 9)
    with pytest.raises(ValueError, match="scale of 9"):
        expected_rating([0.0] * 8)


def test_controls_are_norm_matched_exactly():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(577, generator=g) * 7.3
    c = control_vectors(v, (0, 1, 2))
    assert c.shape == (3, 577) and c.dtype == torch.float32
    for row in c:
        assert float(row.double().norm()) == pytest.approx(float(v.double().norm()), rel=1e-6)
    assert torch.equal(control_vectors(v, (1,))[0], c[1])  # a seed is one direction
    cos = (c[0].double() @ c[1].double()) / (c[0].double().norm() * c[1].double().norm())
    assert abs(float(cos)) < 0.2  # independent random directions
    # beta * ||u|| = alpha * ||v||: the control has ||v|| and is steered with alpha itself.
    assert torch.allclose(control_vectors(2 * v, (0,))[0], 2 * c[0], rtol=1e-6)


def test_zero_coefficient_steering_equals_unsteered(engine, cv):
    # What sharing the alpha-0 run across vectors rests on.
    messages = [{"role": "user", "content": PROMPTS[0]}]
    sp = SamplingParams(max_new_tokens=8, seed=0)
    plain = engine.generate([Request(messages=messages, sampling=sp)])[0]
    zero = engine.generate([Request(messages=messages, sampling=sp, steering=SteeringSpec(
        [SteeringTerm(cv.vector("gold")[1], layers=[1], coefficient=0.0)]))])[0]
    assert zero.token_ids == plain.token_ids


def test_dose_response_table_on_the_tiny_model(engine, cv):
    config = DoseConfig(alphas=(-4.0, 0.0, 4.0), control_seeds=(0, 1), prompts=PROMPTS, max_new_tokens=6)
    calls = []
    free_before = engine.bank.num_free
    result = dose_response(engine, cv, config, judge=LengthJudge(), on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    assert engine.bank.num_free == free_before  # every registered vector released
    assert result.layers == {"gold": 1, "mold": 2}  # each vector's own l*
    assert result.row_names == ["gold", "control:gold", "mold", "control:mold"]
    assert len(result.rows) == 4 * 3
    for name in ("gold", "mold"):
        assert result.norms[name] == pytest.approx(float(cv.vector(name)[result.layers[name]].double().norm()))
    by = {(r.vector, r.alpha): r for r in result.rows}
    for name in result.row_names:
        assert by[(name, 0.0)].n == len(PROMPTS)
        for alpha in (-4.0, 4.0):
            assert by[(name, alpha)].n == len(PROMPTS) * (2 if name.startswith("control:") else 1)
        assert by[(name, 0.0)].rating_mean == by[("gold", 0.0)].rating_mean
    for r in result.rows:
        assert 1.0 <= r.rating_mean <= 9.0 and 0.0 < r.rating_mass_mean <= 1.0
        assert r.judge_mean is not None and 0.0 <= r.judge_mean <= 100.0
    # samples: 2 prompts unsteered + 2 alphas x 2 vectors x (1 + 2 controls) x 2 prompts
    assert len(result.samples) == 2 + 2 * 2 * 3 * 2
    assert all(s.judge == float(min(len(s.text), 100)) for s in result.samples)
    # Mean and SE of a cell, recomputed from its samples.
    cell = [s.rating for s in result.samples if s.vector == "control:mold" and s.alpha == 4.0]
    mean = sum(cell) / len(cell)
    se = math.sqrt(sum((x - mean) ** 2 for x in cell) / (len(cell) - 1) / len(cell))
    assert by[("control:mold", 4.0)].rating_mean == pytest.approx(mean)
    assert by[("control:mold", 4.0)].rating_se == pytest.approx(se)
    table = result.table("judge")
    assert [a for a, _m, _s in table["gold"]] == [-4.0, 0.0, 4.0]
    assert result.to_json()["config"]["scope"] == "assistant_and_generated"

    # Alpha 0 is the unsteered model: the same greedy answers and the same follow-up rating.
    sp = SamplingParams(max_new_tokens=6, seed=0)
    plain = engine.generate([Request(messages=[{"role": "user", "content": p}], sampling=sp) for p in PROMPTS])
    zero = [s for s in result.samples if s.alpha == 0.0]
    assert [s.vector for s in zero] == ["none"] * len(PROMPTS)
    assert [s.text for s in zero] == [o.text for o in plain]
    digits = rating_token_ids(engine.tokenizer)
    rated = engine.generate([Request(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": o.text},
                                               {"role": "user", "content": DEFAULT_RATING_QUESTION}],
                                     sampling=SamplingParams(max_new_tokens=1, score_token_ids=digits, seed=0))
                             for p, o in zip(PROMPTS, plain)])
    assert [s.rating for s in zero] == pytest.approx([expected_rating(r.scores[0])[0] for r in rated])

    # Steering at alpha != 0 changes the residual stream: some score moves.
    steered = [s.rating for s in result.samples if s.vector == "gold" and s.alpha == 4.0]
    assert steered != pytest.approx([s.rating for s in zero], abs=1e-9)


def test_dose_response_without_controls_or_judge(engine, cv):
    config = DoseConfig(alphas=(2.0,), vectors=("mold",), control_seeds=(), prompts=PROMPTS[:1], max_new_tokens=3,
                        layer=3)
    result = dose_response(engine, cv, config)
    assert result.layers == {"mold": 3} and result.judge_range is None
    assert [(r.vector, r.alpha, r.n, r.judge_mean) for r in result.rows] == [("mold", 2.0, 1, None)]
    assert math.isnan(result.rows[0].rating_se)


def test_model_judge_rates_in_range(engine):
    judge = ModelJudge(engine)
    assert isinstance(judge, Judge)
    scores = judge.score(["I love this, it is wonderful.", "This is awful.", ""])
    assert len(scores) == 3 and all(1.0 <= s <= 9.0 for s in scores)
    assert len(judge.last_mass) == 3 and all(0.0 < m <= 1.0 for m in judge.last_mass)
    assert judge.score([]) == []
    with pytest.raises(ValueError, match=r"\{text\}"):
        ModelJudge(engine, instruction="Rate it.")


def test_dose_refusals(engine, cv, tiny_identity):
    with pytest.raises(ValueError, match="alphas\\[0\\]"):
        DoseConfig(alphas=(True,))
    with pytest.raises(ValueError, match="repeats"):
        DoseConfig(alphas=(1.0, 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        DoseConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="scope"):
        DoseConfig(scope="users")
    with pytest.raises(ValueError, match="control_seeds"):
        DoseConfig(control_seeds=(-1,))
    with pytest.raises(ValueError, match="'lava' is not a class"):
        dose_response(engine, cv, DoseConfig(vectors=("lava",), prompts=PROMPTS))
    bare = ConceptVectors(tiny_identity, CLASSES, cv.means, cv.counts, "test")
    with pytest.raises(ValueError, match="no layer selection"):
        dose_response(engine, bare, DoseConfig(prompts=PROMPTS))
    with pytest.raises(ValueError, match="out of range"):
        dose_response(engine, cv, DoseConfig(layer=99, prompts=PROMPTS))
    with pytest.raises(ValueError, match="judge"):
        dose_response(engine, cv, DoseConfig(prompts=PROMPTS, layer=1), judge=object())
