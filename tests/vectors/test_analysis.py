"""Analyses of concept vectors: the cosine construction's values on noise and on orthogonal offsets
(derived in analysis.py's docstring), permutation nulls and p-values, Path-referenced cosines,
comparisons of two extractions, the logit lens, emotion vectors and their alignment (tiny model)."""
import math
from types import SimpleNamespace

import pytest
import torch

from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.vectors.analysis import (AnalysisOptions, analyse, compare_extractions, cosine,
                                             cosine_table, emotion_alignment, emotion_vectors, lens_layer,
                                             lens_logits, load_emotion_corpus, logit_lens, orthogonal_reference,
                                             passage_prompt, valence_component)
from welfare_server.vectors.types import ConceptVectors, LayerSelection, ModelIdentity, difference_of_means

CLASSES = ("mold", "gold", "path")


def identity(D: int, L: int) -> ModelIdentity:
    return ModelIdentity("synthetic", "llama", D, L, "0" * 64)


def from_examples(x: torch.Tensor, labels: torch.Tensor, permutations: int, seed: int = 0) -> ConceptVectors:
    """x [N, L, D] examples with labels [N] in 0..2: class means and K label-permuted means."""
    g = torch.Generator().manual_seed(seed)

    def means(lab):
        return torch.stack([x[lab == c].mean(0) for c in range(3)], dim=1)  # [L, C, D]

    perm = torch.stack([means(labels[torch.randperm(len(labels), generator=g)]) for _ in range(permutations)])
    counts = [int((labels == c).sum()) for c in range(3)]
    return ConceptVectors(identity(x.shape[2], x.shape[1]), CLASSES, means(labels), counts, "test", permuted_means=perm)


def from_means(means: torch.Tensor, classes=CLASSES) -> ConceptVectors:
    return ConceptVectors(identity(means.shape[-1], means.shape[0]), tuple(classes), means, [1] * means.shape[1], "test")


# ----------------------------------------------------------------------------- the construction
def test_pure_noise_permutation_null_centres_at_minus_half():
    g = torch.Generator().manual_seed(1)
    N, L, D = 300, 3, 512
    x = torch.randn(N, L, D, generator=g) + 5.0  # a shared offset cancels in every difference
    cv = from_examples(x, torch.arange(N) % 3, permutations=300)
    t = cosine_table(cv)
    for l in range(L):
        assert t.null.mean[l] == pytest.approx(-0.5, abs=0.01)
        assert t.null.p05[l] < t.observed[l] < t.null.p95[l] or 0.05 <= t.null.p_lower[l] <= 0.95
        assert t.observed[l] == pytest.approx(-0.5, abs=0.1)
        # The Path-referenced cosine of noise is +0.5: both differences carry the Path mean's noise.
        assert t.path_null.mean[l] == pytest.approx(0.5, abs=0.01)
        assert t.path_referenced[l] == pytest.approx(0.5, abs=0.1)
    assert t.null.permutations == 300 and len(t.min_null) == 300
    assert 0.0 < t.min_p_lower <= 1.0


def test_independent_noise_means_give_minus_half():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(64, 3, 2048, generator=g)  # 64 layers of independent isotropic class means
    t = cosine_table(from_means(means))
    assert sum(t.observed) / len(t.observed) == pytest.approx(-0.5, abs=0.01)
    assert t.null is None and t.min_null is None and t.min_p_lower is None


def test_orthogonal_equal_offsets_give_minus_four_fifths_exactly():
    g = torch.Generator().manual_seed(3)
    L, D = 4, 32
    p = torch.randn(L, D, generator=g) * 3
    a, b = torch.zeros(L, D), torch.zeros(L, D)
    a[:, 0], b[:, 1] = 2.0, 2.0
    t = cosine_table(from_means(torch.stack([p + a, p + b, p], dim=1).double()))
    for l in range(L):
        assert t.observed[l] == pytest.approx(-0.8, abs=1e-12)
        assert t.path_referenced[l] == pytest.approx(0.0, abs=1e-12)
        assert t.orthogonal_ref[l] == pytest.approx(-0.8, abs=1e-12)
        assert t.offset_norms[0][l] == pytest.approx(2.0) and t.offset_norms[1][l] == pytest.approx(2.0)


def test_construction_formula_for_any_offsets():
    # cos(v_M, v_G) = (5/4 r sqrt(AB) - (A+B)/2) / sqrt((A + B/4 - r sqrt(AB)) (B + A/4 - r sqrt(AB)))
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        a, b, p = torch.randn(3, 16, generator=g, dtype=torch.float64)
        b = b * float(torch.rand(1, generator=g) * 3)
        A, B, r = float(a @ a), float(b @ b), float(cosine(a, b))
        s = math.sqrt(A * B)
        expected = (1.25 * r * s - (A + B) / 2) / math.sqrt((A + B / 4 - r * s) * (B + A / 4 - r * s))
        t = cosine_table(from_means(torch.stack([p + a, p + b, p])[None]))
        assert t.observed[0] == pytest.approx(expected, abs=1e-10)
    # Equal sizes: (5r - 4) / (5 - 4r); r = 1/2 is the equilateral (noise) value -1/2.
    for r in (-1.0, -0.3, 0.0, 0.5, 0.9):
        a = torch.tensor([1.0, 0.0], dtype=torch.float64)
        b = torch.tensor([r, math.sqrt(1 - r * r)], dtype=torch.float64)
        t = cosine_table(from_means(torch.stack([a, b, torch.zeros(2, dtype=torch.float64)])[None]))
        assert t.observed[0] == pytest.approx((5 * r - 4) / (5 - 4 * r), abs=1e-12)
    # Orthogonal but unequal: towards -1 as one offset vanishes.
    assert float(orthogonal_reference(torch.tensor(1.0), torch.tensor(0.0))) == pytest.approx(-1.0)
    assert float(orthogonal_reference(torch.tensor(1.0), torch.tensor(1.0))) == pytest.approx(-0.8)
    assert -1.0 < float(orthogonal_reference(torch.tensor(1.0), torch.tensor(0.1))) < -0.8


def test_opposed_offsets_fall_below_the_null_with_the_smallest_p():
    g = torch.Generator().manual_seed(5)
    N, L, D, K = 240, 3, 64, 99
    x = torch.randn(N, L, D, generator=g)
    labels = torch.arange(N) % 3
    axis = torch.randn(D, generator=g)
    axis = axis / axis.norm() * 3
    x[labels == 0] -= axis  # Mold and Gold opposed along one axis, Path in between
    x[labels == 1] += axis
    t = cosine_table(from_examples(x, labels, permutations=K))
    for l in range(L):
        assert t.observed[l] < -0.95
        assert t.observed[l] < t.null.p05[l]
        assert t.null.p_lower[l] == pytest.approx(1 / (K + 1))
        assert t.path_referenced[l] < -0.5 and t.path_referenced[l] < t.path_null.p05[l]
    assert t.min_p_lower == pytest.approx(1 / (K + 1))
    assert t.min_value == min(t.observed) and t.observed[t.min_layer] == t.min_value


def test_two_classes_are_antiparallel_by_construction_and_have_no_reference():
    g = torch.Generator().manual_seed(6)
    t = cosine_table(from_means(torch.randn(2, 2, 8, generator=g), classes=("mold", "gold")))
    assert t.observed == pytest.approx([-1.0, -1.0])
    assert t.path_referenced is None and t.orthogonal_ref is None and t.reference is None


def test_cosine_table_refuses_unknown_or_repeated_classes():
    cv = from_means(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="'lava' is not a class"):
        cosine_table(cv, "lava", "gold")
    with pytest.raises(ValueError, match="the same class"):
        cosine_table(cv, "gold", "gold")
    with pytest.raises(ValueError, match="one of the compared classes"):
        cosine_table(cv, "mold", "gold", reference="gold")


def test_compare_extractions():
    g = torch.Generator().manual_seed(7)
    trained = from_means(torch.randn(3, 3, 16, generator=g))
    same = compare_extractions(trained, trained)
    for cls in CLASSES:
        assert same.vector_cosine[cls] == pytest.approx([1.0] * 3)
    untrained = from_means(torch.randn(3, 3, 16, generator=g))
    comp = compare_extractions(trained, untrained, labels=("after", "before"))
    assert set(comp.tables) == {"after", "before"}
    assert comp.tables["before"].observed == cosine_table(untrained).observed
    manual = cosine(trained.vector("gold"), untrained.vector("gold")).tolist()
    assert comp.vector_cosine["gold"] == pytest.approx(manual)
    with pytest.raises(ValueError, match="hidden_size"):
        compare_extractions(trained, from_means(torch.randn(3, 3, 8, generator=g)))


# ----------------------------------------------------------------------------- logit lens
def test_lens_layer_is_five_sixths():
    assert lens_layer(30) == 25 and lens_layer(4) == 3 and lens_layer(6) == 5 and lens_layer(7) == 5


def test_logit_lens_finds_the_tokens_a_vector_was_built_to_promote(tiny):
    tok = tiny.tokenizer
    W = tiny.model.lm_head.weight.detach().float()
    w = tiny.model.model.norm.weight.detach().float()
    for word in (" cannot", " impossible", " happy"):
        (t,) = tok.encode(word, add_special_tokens=False)
        v = W[t] / w  # W_U (w * v) = W_U W_U[t]: largest at t
        lens = logit_lens(tiny, v, k=5, layer=3, name="built")
        assert lens.promoted[0].token_id == t and lens.promoted[0].text == word
        assert [x.logit for x in lens.promoted] == sorted([x.logit for x in lens.promoted], reverse=True)
        assert lens.promoted[0].logit == pytest.approx(float(W[t] @ W[t]), rel=1e-5)
        flipped = logit_lens(tiny, -v, k=5)
        assert flipped.suppressed[0].token_id == t
        assert [x.logit for x in flipped.suppressed] == sorted(x.logit for x in flipped.suppressed)
        assert len(lens.promoted) == len(lens.suppressed) == 5


def test_lens_logits_apply_the_final_norm_weight_gemma_style_and_softcap():
    g = torch.Generator().manual_seed(8)
    W, w, v = torch.randn(11, 4, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g)

    def stub(family, cap):
        hf = SimpleNamespace(model=SimpleNamespace(norm=SimpleNamespace(weight=w)),
                             lm_head=SimpleNamespace(weight=W, bias=None),
                             config=SimpleNamespace(model_type=family, final_logit_softcapping=cap))
        return SimpleNamespace(model=hf)

    assert torch.allclose(lens_logits(stub("llama", None), v), W @ (w * v), atol=1e-6)
    assert torch.allclose(lens_logits(stub("gemma", None), v), W @ ((1 + w) * v), atol=1e-6)
    capped = torch.tanh(W @ ((1 + w) * v) / 2.0) * 2.0
    assert torch.allclose(lens_logits(stub("gemma2", 2.0), v), capped, atol=1e-6)
    with pytest.raises(ValueError, match="hidden size"):
        lens_logits(stub("llama", None), torch.zeros(5))


# ----------------------------------------------------------------------------- emotions
def test_emotion_corpus_spans_valence_and_arousal():
    corpus = load_emotion_corpus()
    assert len(corpus) >= 12
    assert len({e.name for e in corpus}) == len(corpus)
    assert all(len(e.passages) >= 8 for e in corpus)
    assert {e.valence for e in corpus} >= {-1, 1} and {e.arousal for e in corpus} >= {-1, 1}
    for sign in (-1, 1):  # both arousal poles within each valence
        assert {e.arousal for e in corpus if e.valence == sign} >= {-1, 1}


def test_emotion_corpus_refuses_malformed_files(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"emotions": [{"name": "a", "valence": 1, "arousal": 0, "passages": ["x"]},'
                   '{"name": "b", "valence": 2, "arousal": 0, "passages": ["y"]},'
                   '{"name": "c", "valence": -1, "arousal": 0, "passages": ["z"]}]}')
    with pytest.raises(ValueError, match=r"emotions\[1\]\.valence"):
        load_emotion_corpus(bad)
    bad.write_text('{"emotions": [{"name": "a", "valence": 1, "arousal": 0, "passages": ["x"]},'
                   '{"name": "b", "valence": 1, "arousal": 0, "passages": ["y"]},'
                   '{"name": "c", "valence": 0, "arousal": 0, "passages": ["z"]}]}')
    with pytest.raises(ValueError, match="both valences"):
        load_emotion_corpus(bad)


def test_passage_prompt_ends_at_the_passage_last_token(smollm2_tokenizer):
    from welfare_server.model.prompts import render_chat

    tok = smollm2_tokenizer
    passage = "The lake is perfectly still and so is my mind."
    ids = passage_prompt(tok, passage)
    full, roles = render_chat(tok, [{"role": "user", "content": passage}], add_generation_prompt=False)
    assert full[:len(ids)] == ids and len(ids) < len(full)
    assert tok.decode(ids).endswith(passage)
    assert roles[len(ids) - 1] == "user"
    assistant = passage_prompt(tok, passage, role="assistant")
    assert tok.decode(assistant).endswith(passage)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny, EngineConfig(max_batch_slots=16, max_context_len=256))


@pytest.fixture(scope="module")
def emotions(engine):
    return emotion_vectors(engine)


def test_emotion_vectors_on_the_tiny_model(engine, emotions):
    corpus = load_emotion_corpus()
    L, E, D = engine.L, len(corpus), engine.D
    ev = emotions
    assert ev.means.shape == ev.vectors.shape == (L, E, D)
    assert ev.valence_pc.shape == (L, D)
    assert ev.counts == [len(e.passages) for e in corpus]
    assert ev.names == tuple(e.name for e in corpus)
    means = ev.means.double()
    for e in range(E):  # each emotion's mean minus the mean of the others' means ...
        others = [j for j in range(E) if j != e]
        assert torch.allclose(ev.vectors[:, e].double(), means[:, e] - means[:, others].mean(1), atol=1e-5)
    # ... which is E/(E-1) times its mean minus the centroid, so the vectors sum to zero.
    centroid = means.mean(1, keepdim=True)
    assert torch.allclose(ev.vectors.double(), E / (E - 1) * (means - centroid), atol=1e-5)
    assert torch.allclose(ev.vectors.sum(1), torch.zeros(L, D), atol=1e-4)
    val = torch.tensor(ev.valence, dtype=torch.float64)
    informative = [l for l in range(L) if float(ev.vectors[l].abs().max()) > 1e-6]
    # Entering block 0 the last token's residual is its embedding, and every passage ends in the
    # same full stop: that layer carries no emotion, and its explained share is undefined (NaN).
    assert 0 not in informative and math.isnan(ev.explained[0]) and len(informative) == L - 1
    for l in informative:
        assert float(ev.valence_pc[l].norm()) == pytest.approx(1.0, abs=1e-5)
        scores = ev.vectors[l].double() @ ev.valence_pc[l].double()
        assert float((scores * val).sum()) >= 0  # positive emotions project positive
        assert 0 < ev.explained[l] <= 1
        assert -1 <= ev.valence_corr[l] <= 1
    # The component is the top right singular vector of the vectors (up to sign).
    l = informative[0]
    _, _, vh = torch.linalg.svd(ev.vectors[l].double(), full_matrices=False)
    assert abs(float(vh[0] @ ev.valence_pc[l].double())) == pytest.approx(1.0, abs=1e-5)


def test_valence_component_orientation_follows_the_signs():
    # Two clusters along axis 0; whichever sign SVD returns, positive-valence rows score positive.
    vectors = torch.tensor([[[3.0, 0.1], [2.5, -0.1], [-2.8, 0.2], [-2.7, -0.2]]])
    for valence in ((1, 1, -1, -1), (-1, -1, 1, 1)):
        pc, explained = valence_component(vectors, valence)
        scores = vectors[0] @ pc[0]
        assert all(float(s) * v > 0 for s, v in zip(scores, valence))
        assert float(explained[0]) > 0.99


def tiny_concept_vectors(engine, identity_, permutations: int = 6, per_class: int = 6, seed: int = 0) -> ConceptVectors:
    """Concept vectors of random token prompts through Engine.capture, with label permutations."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * per_class
    prompts = [torch.randint(100, 5000, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    labels = torch.arange(N) % 3
    table = torch.stack([labels] + [labels[torch.randperm(N, generator=g)] for _ in range(permutations)], dim=1)
    means = engine.capture(prompts, table.tolist(), 3).means  # [L, J, C, D]
    L = means.shape[0]
    selection = {c: LayerSelection([0.5] * L, [0.0] * L, [1.0] * L, best_layer=2) for c in CLASSES}
    return ConceptVectors(identity_, CLASSES, means[:, 0].contiguous(), [per_class] * 3, "test",
                          permuted_means=means[:, 1:].permute(1, 0, 2, 3).contiguous(), selection=selection)


def test_emotion_alignment_and_analyse_on_the_tiny_model(engine, emotions, tiny_identity):
    cv = tiny_concept_vectors(engine, tiny_identity)
    al = emotion_alignment(cv, emotions)
    L, E = engine.L, len(emotions.names)
    assert al.layer == 2
    for cls in ("mold", "gold"):
        assert len(al.emotion_cosine[cls]) == L and len(al.emotion_cosine[cls][0]) == E
        assert al.pc_cosine[cls] == pytest.approx(cosine(cv.vector(cls), emotions.valence_pc).tolist())
    axis = cv.vector("gold")[2].double() - cv.vector("mold")[2].double()
    x = emotions.vectors[2].double() @ (axis / axis.norm())
    assert al.scatter_x == pytest.approx(x.tolist(), abs=1e-5)
    assert al.scatter_y == pytest.approx((emotions.vectors[2].double() @ emotions.valence_pc[2].double()).tolist(), abs=1e-5)

    result = analyse(cv, engine, AnalysisOptions(lens_k=4), baseline=cv, emotions=emotions)
    assert result.layer == 2 and "l* = 2" in result.layer_note
    assert [(x.name, x.layer) for x in result.lenses] == [("v_mold", 3), ("v_gold", 3), ("v_mold", 2), ("v_gold", 2)]
    assert result.alignment is not None and result.comparison is not None
    data = result.to_json()
    assert data["cosines"]["null"]["permutations"] == 6
    assert "cos(v_mold, v_gold)" in result.summary()
    with pytest.raises(ValueError, match="weights fingerprint"):
        other = ConceptVectors(ModelIdentity("x", "llama", engine.D, engine.L, "f" * 64), CLASSES, cv.means, cv.counts, "t")
        analyse(other, engine, AnalysisOptions(emotions=False))


def test_analysis_options_are_checked():
    with pytest.raises(ValueError, match="lens_k"):
        AnalysisOptions(lens_k=0)
    with pytest.raises(ValueError, match="emotion_role"):
        AnalysisOptions(emotion_role="narrator")
    with pytest.raises(ValueError, match="emotions"):
        AnalysisOptions(emotions=1)
    with pytest.raises(ValueError, match="pair"):
        AnalysisOptions(pair=("mold",))


def test_difference_of_means_is_the_protocol_vector():
    means = torch.randn(2, 3, 5)
    assert torch.allclose(difference_of_means(means, 0), means[:, 0] - (means[:, 1] + means[:, 2]) / 2)
