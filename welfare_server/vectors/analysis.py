"""Analyses of one extraction's concept vectors: how v_Mold and v_Gold relate per layer (each cosine
beside the nulls it must be read against), how two extractions compare (trained vs untrained), what
a vector writes into the vocabulary (logit lens), and how the vectors align with emotion vectors
extracted through the same engine from a corpus shipped with the package.

Reading the Mold/Gold cosine
----------------------------
With three classes whose mean residuals (at one layer) are m, g, p, the protocol's vectors are

    v_M = m - (g + p) / 2,        v_G = g - (m + p) / 2.

Write c = (m + g + p) / 3 for the centroid: v_M = 3/2 (m - c) and v_G = 3/2 (g - c), so cos(v_M, v_G)
is the cosine of the angle at the centroid between two corners of the triangle (m, g, p). It is
negative whatever the data, because the three centred means sum to zero:

* Pure noise (no class structure): the triangle is equilateral in high dimension, so the angle is
  120 degrees and cos = -1/2. Two ways to see it. (a) m, g, p independent with the same isotropic
  spread s^2 per coordinate in D dimensions: E[v_M . v_G] = (-1/2 - 1/2 + 1/4) s^2 D = -3/4 s^2 D and
  E|v|^2 = (1 + 1/4 + 1/4) s^2 D = 3/2 s^2 D, ratio -1/2 (the cosine concentrates there as D grows).
  (b) Under a class-label permutation with equal class sizes, the centred means e_M, e_G, e_P sum to
  exactly zero and are exchangeable: 0 = E|e_M + e_G + e_P|^2 = 3 E|e|^2 + 6 E[e_M . e_G], so
  E[e_M . e_G] = -E|e|^2 / 2: the permutation null centres at -1/2 too.
* Orthogonal class offsets: put Path at the origin and let Mold and Gold move the residual by
  offsets a = m - p and b = g - p. Then v_M = a - b/2 and v_G = b - a/2, and with A = |a|^2,
  B = |b|^2, r = cos(a, b):

      cos(v_M, v_G) = (5/4 r sqrt(AB) - (A + B)/2) / sqrt((A + B/4 - r sqrt(AB)) (B + A/4 - r sqrt(AB))).

  Unrelated (orthogonal, r = 0) offsets of equal size (A = B) give -(A)/(5A/4) = -4/5 = -0.8. With
  r = 0 and unequal sizes the value falls towards -1 (B -> 0: v_G = -v_M / 2 exactly), so a strongly
  separated Mold class beside a barely separated Gold class looks antiparallel by construction.
  Equal sizes give (5r - 4)/(5 - 4r): r = 1/2 is the equilateral -1/2, r = -1 the full -1.

So each cosine is reported beside (1) its distribution under class-label permutation (does the
extraction have class structure at all?), (2) the Path-referenced cosine r = cos(m - p, g - p)
(0 for unrelated Mold and Gold effects, negative when they push the residual in opposed directions;
its own permutation null sits near +1/2, because both differences carry the Path mean's noise), and
(3) the orthogonal-offsets reference: the formula above with r = 0 and the observed A, B (what the
construction gives if Mold and Gold had unrelated effects of the observed sizes). With two classes
v_M = -v_G exactly (cos = -1 by construction) and only the permutation null is meaningful.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from welfare_server.model.fields import check_bool, check_int, check_str
from welfare_server.model.prompts import render_chat
from welfare_server.vectors.types import ConceptVectors, ModelIdentity, difference_of_means, model_identity

NULL_PERCENTILES = (5.0, 95.0)
"""The band of a permutation null shown beside an observed cosine."""
GEMMA_NORM_FAMILIES = ("gemma", "gemma2", "gemma3_text")
"""Families whose RMSNorm scales by (1 + weight) rather than weight (as the engine's adapter does)."""
EMOTION_CORPUS = "emotions.json"
"""The package's emotion corpus, under welfare_server/vectors/data/."""


# --------------------------------------------------------------------------- small maths
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64 (broadcasting); NaN where either vector is zero."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def orthogonal_reference(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """cos(v_M, v_G) of the three-class construction when the offsets a = m - p and b = g - p are
    orthogonal with squared norms A and B (see the module docstring): -0.8 at A = B."""
    A, B = A.double(), B.double()
    return -(A + B) / 2 / torch.sqrt((A + B / 4) * (B + A / 4))


def _tolist(t: torch.Tensor | np.ndarray) -> list[float]:
    return [float(x) for x in (t.tolist() if hasattr(t, "tolist") else t)]


def _lower_p(observed: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Lower-tail permutation p-value per column: (1 + #{null <= observed}) / (K + 1) (the +1 counts
    the observed labelling itself, so p is never 0). null [K, ...], observed [...]."""
    return (1 + (null <= observed[None]).sum(0).double()) / (null.shape[0] + 1)


@dataclass
class NullSummary:
    """A statistic's distribution over the K class-label permutations, per layer."""

    mean: list[float]
    p05: list[float]
    p95: list[float]
    p_lower: list[float]
    """Lower-tail permutation p-value of the observed value: (1 + #{null <= observed}) / (K + 1)."""
    permutations: int

    @classmethod
    def of(cls, observed: torch.Tensor, null: torch.Tensor) -> "NullSummary":
        arr = null.numpy()
        lo, hi = np.nanpercentile(arr, NULL_PERCENTILES, axis=0)
        return cls(mean=_tolist(np.nanmean(arr, axis=0)), p05=_tolist(lo), p95=_tolist(hi),
                   p_lower=_tolist(_lower_p(observed, null)), permutations=int(null.shape[0]))

    def to_json(self) -> dict:
        return dict(mean=self.mean, p05=self.p05, p95=self.p95, p_lower=self.p_lower,
                    permutations=self.permutations)


# --------------------------------------------------------------------------- cosines per layer
@dataclass
class CosineTable:
    """cos(v_a, v_b) per layer with the figures it must be read against (module docstring)."""

    classes: tuple[str, str]
    """(a, b), e.g. ("mold", "gold")."""
    reference: str | None
    """The reference class of the Path-referenced cosine ("path"), or None (not three classes)."""
    observed: list[float]
    """Per layer: cos(v_a, v_b) of the extraction (the paper's figure)."""
    null: NullSummary | None
    """Per layer: cos(v_a, v_b) under class-label permutation (None without permuted means)."""
    path_referenced: list[float] | None
    """Per layer: cos(mean_a - mean_ref, mean_b - mean_ref); 0 for unrelated effects."""
    path_null: NullSummary | None
    """Per layer: the Path-referenced cosine under permutation (sits near +0.5 on noise)."""
    orthogonal_ref: list[float] | None
    """Per layer: cos(v_a, v_b) that orthogonal offsets with the observed sizes would give."""
    offset_norms: tuple[list[float], list[float]] | None
    """Per layer: |mean_a - mean_ref| and |mean_b - mean_ref|."""
    min_layer: int
    """The layer of the most negative observed cosine."""
    min_value: float
    min_null: list[float] | None
    """Per permutation: the permuted cosine's minimum over layers (the null of min_value: a minimum
    over L layers of noise is lower than any one layer's null)."""
    min_p_lower: float | None
    """Lower-tail permutation p-value of min_value against min_null."""

    @property
    def num_layers(self) -> int:
        return len(self.observed)

    def rows(self) -> list[dict]:
        """One dict per layer (what the report's table shows)."""
        out = []
        for l in range(self.num_layers):
            row = dict(layer=l, observed=self.observed[l])
            if self.null is not None:
                row.update(null_mean=self.null.mean[l], null_p05=self.null.p05[l], null_p95=self.null.p95[l],
                           p_lower=self.null.p_lower[l])
            if self.path_referenced is not None:
                row.update(path_referenced=self.path_referenced[l], orthogonal_ref=self.orthogonal_ref[l])
            if self.path_null is not None:
                row.update(path_null_mean=self.path_null.mean[l], path_null_p05=self.path_null.p05[l],
                           path_null_p95=self.path_null.p95[l])
            out.append(row)
        return out

    def to_json(self) -> dict:
        return dict(classes=list(self.classes), reference=self.reference, observed=self.observed,
                    null=None if self.null is None else self.null.to_json(),
                    path_referenced=self.path_referenced,
                    path_null=None if self.path_null is None else self.path_null.to_json(),
                    orthogonal_ref=self.orthogonal_ref,
                    offset_norms=None if self.offset_norms is None else [list(x) for x in self.offset_norms],
                    min_layer=self.min_layer, min_value=self.min_value, min_p_lower=self.min_p_lower,
                    min_null_mean=None if self.min_null is None else float(np.nanmean(self.min_null)))


def _class_index(cv: ConceptVectors, name: str, what: str) -> int:
    if name not in cv.classes:
        raise ValueError(f"{what}: {name!r} is not a class of this extraction {list(cv.classes)}")
    return cv.classes.index(name)


def cosine_table(cv: ConceptVectors, a: str = "mold", b: str = "gold", reference: str | None = "path") -> CosineTable:
    """Per-layer cos(v_a, v_b) beside its permutation null, the Path-referenced cosine (with its
    own null) and the orthogonal-offsets reference. The reference figures need exactly three
    classes (the construction the module docstring derives) with `reference` among them; with
    another class count, or reference=None, they are None."""
    ia, ib = _class_index(cv, a, "a"), _class_index(cv, b, "b")
    if ia == ib:
        raise ValueError(f"a and b: the same class {a!r}")
    means = cv.means.double()
    va, vb = difference_of_means(means, ia), difference_of_means(means, ib)
    observed = cosine(va, vb)  # [L]
    null = min_null = min_p = None
    perm = None if cv.permuted_means is None else cv.permuted_means.double()
    if perm is not None:
        pc = cosine(difference_of_means(perm, ia), difference_of_means(perm, ib))  # [K, L]
        null = NullSummary.of(observed, pc)
        min_null_t = torch.nan_to_num(pc, nan=float("inf")).min(dim=1).values
        min_null = _tolist(min_null_t)
    path_ref = path_null = ortho = norms = None
    ref = None
    if reference is not None and len(cv.classes) == 3 and reference in cv.classes:
        ir = cv.classes.index(reference)
        if ir in (ia, ib):
            raise ValueError(f"reference: {reference!r} is one of the compared classes")
        ref = reference
        da, db = means[:, ia] - means[:, ir], means[:, ib] - means[:, ir]
        path_ref_t = cosine(da, db)
        path_ref = _tolist(path_ref_t)
        A, B = (da * da).sum(-1), (db * db).sum(-1)
        ortho = _tolist(orthogonal_reference(A, B))
        norms = (_tolist(A.sqrt()), _tolist(B.sqrt()))
        if perm is not None:
            path_null = NullSummary.of(path_ref_t, cosine(perm[:, :, ia] - perm[:, :, ir], perm[:, :, ib] - perm[:, :, ir]))
    obs = torch.nan_to_num(observed, nan=float("inf"))
    min_layer = int(obs.argmin())
    min_value = float(observed[min_layer])
    if min_null is not None:
        min_p = float((1 + sum(x <= min_value for x in min_null)) / (len(min_null) + 1))
    return CosineTable(classes=(a, b), reference=ref, observed=_tolist(observed), null=null,
                       path_referenced=path_ref, path_null=path_null, orthogonal_ref=ortho, offset_norms=norms,
                       min_layer=min_layer, min_value=min_value, min_null=min_null, min_p_lower=min_p)


# --------------------------------------------------------------------------- two extractions
@dataclass
class ExtractionComparison:
    """Two extractions of the same classes on models of the same shape (e.g. after RL training
    and the same vectors from the untrained model: the paper's control)."""

    labels: tuple[str, str]
    """Names of the two extractions, e.g. ("trained", "untrained")."""
    models: tuple[ModelIdentity, ModelIdentity]
    vector_cosine: dict[str, list[float]]
    """Per class: per-layer cos(v_c of the first, v_c of the second). Two unrelated directions in
    D dimensions have cosine about 0 +/- 1/sqrt(D)."""
    tables: dict[str, CosineTable]
    """Per label: that extraction's own Mold/Gold cosine table."""

    def to_json(self) -> dict:
        return dict(labels=list(self.labels), models=[m.to_json() for m in self.models],
                    vector_cosine=self.vector_cosine, tables={k: t.to_json() for k, t in self.tables.items()})


def compare_extractions(cv: ConceptVectors, baseline: ConceptVectors, *, labels: tuple[str, str] = ("trained", "untrained"),
                        pair: tuple[str, str] = ("mold", "gold"), reference: str | None = "path") -> ExtractionComparison:
    """Per-layer cosine between corresponding vectors of two extractions, and each one's own
    cosine table side by side. The two must share the classes of `pair`, the layer count and the
    hidden size (their weights may differ: that is the point)."""
    for name in ("hidden_size", "num_layers"):
        if getattr(cv.model, name) != getattr(baseline.model, name):
            raise ValueError(f"baseline: {name} {getattr(baseline.model, name)} differs from "
                             f"{getattr(cv.model, name)}; the extractions cannot be compared layer by layer")
    if cv.point != baseline.point:
        raise ValueError(f"baseline: read at {baseline.point!r}, the extraction at {cv.point!r}")
    if len(set(labels)) != 2:
        raise ValueError(f"labels: {labels!r} must be two distinct names")
    shared = [c for c in cv.classes if c in baseline.classes]
    vector_cosine = {c: _tolist(cosine(cv.vector(c), baseline.vector(c))) for c in shared}
    tables = {labels[0]: cosine_table(cv, *pair, reference=reference),
              labels[1]: cosine_table(baseline, *pair, reference=reference)}
    return ExtractionComparison(labels=tuple(labels), models=(cv.model, baseline.model),
                                vector_cosine=vector_cosine, tables=tables)


# --------------------------------------------------------------------------- logit lens
def lens_layer(num_layers: int) -> int:
    """The default logit-lens layer: floor(5L/6) (late enough for the unembedding to read it)."""
    return (5 * num_layers) // 6


@dataclass
class LensToken:
    token_id: int
    text: str
    """The token decoded alone (a leading space shows as a space)."""
    logit: float
    """Its component of W_U (w_norm * v) (softcapped where the model softcaps its logits)."""

    def to_json(self) -> dict:
        return dict(token_id=self.token_id, text=self.text, logit=self.logit)


@dataclass
class LogitLens:
    """The tokens a direction promotes and suppresses when read directly by the unembedding."""

    name: str
    layer: int
    promoted: list[LensToken]
    """The k largest logits, largest first."""
    suppressed: list[LensToken]
    """The k smallest logits, smallest first."""

    def to_json(self) -> dict:
        return dict(name=self.name, layer=self.layer, promoted=[t.to_json() for t in self.promoted],
                    suppressed=[t.to_json() for t in self.suppressed])


def _loaded(model_or_engine):
    """A LoadedModel from an Engine (its .loaded) or a LoadedModel itself."""
    return getattr(model_or_engine, "loaded", model_or_engine)


def lens_logits(model, vector: torch.Tensor) -> torch.Tensor:
    """fp32 [V]: the vector scaled by the final norm's weight ((1 + w) for Gemma) and read by the
    unembedding. The RMS normalisation itself is left out: it divides every logit of one vector by
    the same positive number and so changes no ranking, while dividing by a steering vector's own
    RMS would make its values meaningless as a residual."""
    lm = _loaded(model)
    hf = lm.model
    weight = hf.model.norm.weight.detach().float()
    if getattr(hf.config, "model_type", "") in GEMMA_NORM_FAMILIES:
        weight = 1.0 + weight
    head = hf.lm_head
    v = vector.detach().to(weight.device, torch.float32).reshape(-1)
    if v.shape[0] != weight.shape[0]:
        raise ValueError(f"vector: {v.shape[0]} elements, the model's hidden size is {weight.shape[0]}")
    with torch.no_grad():
        logits = head.weight.detach().float() @ (weight * v)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.detach().float()
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.cpu()


def logit_lens(model, vector: torch.Tensor, *, k: int = 10, layer: int = -1, name: str = "") -> LogitLens:
    """Top-k promoted and suppressed tokens of `vector` [D] (see lens_logits). model: an Engine or
    a LoadedModel. layer and name only label the result (the vector is already that layer's)."""
    k = check_int(k, "k", ValueError, 1)
    logits = lens_logits(model, vector)
    tok = _loaded(model).tokenizer
    k = min(k, logits.numel())

    def tokens(values, ids):
        return [LensToken(int(i), tok.decode([int(i)]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]

    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)
    return LogitLens(name=name, layer=int(layer), promoted=tokens(top.values, top.indices),
                     suppressed=tokens(-bottom.values, bottom.indices))


# --------------------------------------------------------------------------- emotions
@dataclass(frozen=True)
class Emotion:
    name: str
    valence: int
    """-1, 0 or +1: the sign of the emotion's valence."""
    arousal: int
    """-1, 0 or +1: the sign of its arousal (informative; nothing is oriented by it)."""
    passages: tuple[str, ...]


def load_emotion_corpus(path: str | Path | None = None) -> list[Emotion]:
    """The emotion corpus: the package's own (data/emotions.json) or a JSON file of the same form
    ({"emotions": [{"name", "valence", "arousal", "passages": [...]}, ...]}), checked."""
    if path is None:
        text = resources.files("welfare_server.vectors").joinpath("data", EMOTION_CORPUS).read_text(encoding="utf-8")
        where = f"package data {EMOTION_CORPUS}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    data = json.loads(text)
    items = data.get("emotions") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) < 3:
        raise ValueError(f"{where}: expected {{'emotions': [...]}} with at least 3 emotions")
    corpus, seen = [], set()
    for i, item in enumerate(items):
        at = f"{where}: emotions[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{at}: not an object")
        name = check_str(item.get("name"), f"{at}.name", ValueError)
        if name in seen:
            raise ValueError(f"{at}.name: {name!r} appears twice")
        seen.add(name)
        valence = check_int(item.get("valence"), f"{at}.valence", ValueError, -1, 1)
        arousal = check_int(item.get("arousal"), f"{at}.arousal", ValueError, -1, 1)
        passages = item.get("passages")
        if not isinstance(passages, list) or not passages:
            raise ValueError(f"{at}.passages: expected a non-empty list of strings")
        for j, p in enumerate(passages):
            check_str(p, f"{at}.passages[{j}]", ValueError)
        corpus.append(Emotion(name, valence, arousal, tuple(passages)))
    signs = {e.valence for e in corpus}
    if not (1 in signs and -1 in signs):
        raise ValueError(f"{where}: needs emotions of both valences to orient the valence component")
    return corpus


def passage_prompt(tokenizer, passage: str, role: str = "user") -> list[int]:
    """Token ids of `passage` as one chat message of `role` rendered by the tokenizer's template,
    cut after the passage's own last token: the token read is the passage's last token, as the maze
    protocol reads the last token of the trajectory (nothing of the template after it)."""
    check_str(role, "role", ValueError, choices=("user", "assistant", "system"))
    messages = [{"role": role, "content": passage}]
    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.rfind(passage)
    if start < 0:
        raise ValueError("passage: the chat template changes the passage's text; its last token cannot be found")
    end = start + len(passage)
    # The same tokenisation render_chat uses, with offsets, to find where the passage ends.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError("passage: the template's text tokenises differently from render_chat's ids")
    keep = sum(1 for s, _e in enc["offset_mapping"] if s < end)
    return ids[:keep]


@dataclass
class EmotionVectors:
    """Emotion vectors of one model: each emotion's mean residual at its passages' last tokens,
    minus the mean of the other emotions' means (the maze vectors' construction), every layer."""

    names: tuple[str, ...]
    valence: tuple[int, ...]
    arousal: tuple[int, ...]
    counts: list[int]
    model: ModelIdentity
    role: str
    """The chat role the passages were rendered as."""
    means: torch.Tensor
    """fp32 [L, E, D]."""
    vectors: torch.Tensor
    """fp32 [L, E, D]: means[:, e] - mean of means[:, others] = E/(E-1) (means[:, e] - centroid)."""
    valence_pc: torch.Tensor
    """fp32 [L, D], unit: per layer the first principal component of the E emotion vectors, signed
    so that positive-valence emotions project positive on average."""
    explained: list[float]
    """Per layer: the fraction of the emotion vectors' variance along valence_pc."""
    valence_corr: list[float]
    """Per layer: Pearson correlation of the emotion vectors' valence_pc scores with their valence
    signs (how much the first component is valence rather than something else)."""
    arousal_corr: list[float]
    """Per layer: the same scores' correlation with the arousal signs."""

    def to_json(self) -> dict:
        return dict(names=list(self.names), valence=list(self.valence), arousal=list(self.arousal),
                    counts=self.counts, role=self.role, model=self.model.to_json(), explained=self.explained,
                    valence_corr=self.valence_corr, arousal_corr=self.arousal_corr)


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def valence_component(vectors: torch.Tensor, valence: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """vectors [L, E, D] -> (unit first principal components [L, D], explained variance fraction
    [L]), each component signed so that sum_e valence_e * score_e >= 0."""
    val = torch.tensor(list(valence), dtype=torch.float64)
    pcs, explained = [], []
    for layer in vectors.double():
        centred = layer - layer.mean(0, keepdim=True)  # already centred in theory; exact in practice
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        pc = vh[0]
        if float((centred @ pc * val).sum()) < 0:
            pc = -pc
        pcs.append(pc)
        total = float((s ** 2).sum())
        explained.append(float(s[0] ** 2) / total if total > 0 else float("nan"))
    return torch.stack(pcs).float(), torch.tensor(explained)


def emotion_vectors(engine, corpus: Sequence[Emotion] | None = None, *, role: str = "user",
                    on_progress: Callable[[int], None] | None = None) -> EmotionVectors:
    """Extract emotion vectors through engine.capture (the engine's own prefill, the residual
    entering every block at each passage's last token; see passage_prompt)."""
    corpus = load_emotion_corpus() if corpus is None else list(corpus)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("engine: the model has no tokenizer to render the passages")
    prompts, labels = [], []
    for e, emotion in enumerate(corpus):
        for passage in emotion.passages:
            prompts.append(passage_prompt(tok, passage, role))
            labels.append(e)
    cap = engine.capture(prompts, labels, len(corpus), on_progress=on_progress)
    means = cap.means.float()  # [L, E, D]
    E = len(corpus)
    vectors = torch.stack([difference_of_means(means, e) for e in range(E)], dim=1)
    valence = tuple(e.valence for e in corpus)
    arousal = tuple(e.arousal for e in corpus)
    pcs, explained = valence_component(vectors, valence)
    scores = torch.einsum("led,ld->le", vectors.double(), pcs.double())
    val, aro = torch.tensor(valence), torch.tensor(arousal)
    return EmotionVectors(names=tuple(e.name for e in corpus), valence=valence, arousal=arousal,
                          counts=[int(c) for c in cap.counts.tolist()], model=model_identity(engine.loaded),
                          role=role, means=means, vectors=vectors, valence_pc=pcs, explained=_tolist(explained),
                          valence_corr=[_corr(s, val) for s in scores], arousal_corr=[_corr(s, aro) for s in scores])


@dataclass
class EmotionAlignment:
    """How the concept vectors of an extraction line up with the same model's emotion vectors."""

    pair: tuple[str, str]
    """(negative class, positive class), e.g. ("mold", "gold")."""
    emotions: tuple[str, ...]
    valence: tuple[int, ...]
    emotion_cosine: dict[str, list[list[float]]]
    """Per class: [L][E] cos(v_class, emotion vector)."""
    pc_cosine: dict[str, list[float]]
    """Per class: per-layer cos(v_class, valence_pc)."""
    layer: int
    """The layer of the scatter."""
    scatter_x: list[float]
    """Per emotion: its vector's projection on unit(v_pos - v_neg) at `layer` (towards Gold)."""
    scatter_y: list[float]
    """Per emotion: its vector's projection on valence_pc at `layer`."""
    axis_valence_corr: float
    """Correlation of scatter_x with the valence signs."""

    def to_json(self) -> dict:
        return dict(pair=list(self.pair), emotions=list(self.emotions), valence=list(self.valence),
                    emotion_cosine=self.emotion_cosine, pc_cosine=self.pc_cosine, layer=self.layer,
                    scatter_x=self.scatter_x, scatter_y=self.scatter_y, axis_valence_corr=self.axis_valence_corr)


def emotion_alignment(cv: ConceptVectors, ev: EmotionVectors, *, pair: tuple[str, str] = ("mold", "gold"),
                      layer: int | None = None) -> EmotionAlignment:
    """Cosines of v_neg / v_pos with every emotion vector and with the valence component at every
    layer, and the emotion scatter (projections on the Gold-minus-Mold axis and on the valence
    component) at `layer` (default: summary_layer)."""
    L = ev.vectors.shape[0]
    if cv.means.shape[0] != L or cv.means.shape[-1] != ev.vectors.shape[-1]:
        raise ValueError(f"emotion vectors [{L}, *, {ev.vectors.shape[-1]}] do not match the extraction "
                         f"[{cv.means.shape[0]}, *, {cv.means.shape[-1]}]")
    layer = summary_layer(cv, pair)[0] if layer is None else check_int(layer, "layer", ValueError, 0, L - 1)
    vecs = {c: cv.vector(c).double() for c in pair}
    emo = ev.vectors.double()
    emotion_cos = {c: cosine(v[:, None, :], emo).tolist() for c, v in vecs.items()}
    pc_cos = {c: _tolist(cosine(v, ev.valence_pc.double())) for c, v in vecs.items()}
    axis = vecs[pair[1]][layer] - vecs[pair[0]][layer]
    axis = axis / axis.norm().clamp_min(1e-300)
    x = emo[layer] @ axis
    y = emo[layer] @ ev.valence_pc[layer].double()
    return EmotionAlignment(pair=tuple(pair), emotions=ev.names, valence=ev.valence, emotion_cosine=emotion_cos,
                            pc_cosine=pc_cos, layer=layer, scatter_x=_tolist(x), scatter_y=_tolist(y),
                            axis_valence_corr=_corr(x, torch.tensor(ev.valence)))


# --------------------------------------------------------------------------- everything at once
def summary_layer(cv: ConceptVectors, classes: Sequence[str] = ("mold", "gold")) -> tuple[int, str]:
    """(layer, how it was chosen): the classes' selected l* when they agree, the floor of their
    mean when they differ, the middle layer when the extraction carries no layer selection."""
    L = cv.means.shape[0]
    chosen = [cv.selection[c].best_layer for c in classes if c in cv.selection]
    if not chosen:
        return L // 2, f"middle layer {L // 2} (this extraction carries no layer selection)"
    if len(set(chosen)) == 1:
        return chosen[0], f"l* = {chosen[0]} (layer selection)"
    layer = math.floor(sum(chosen) / len(chosen))
    return layer, f"layer {layer} = floor of the mean of the selected l* {chosen} of {list(classes)}"


@dataclass
class AnalysisOptions:
    """What analyse() computes. Every field is checked when the options are made."""

    pair: tuple[str, str] = ("mold", "gold")
    """(negative class, positive class): the two vectors compared."""
    reference: str | None = "path"
    """The reference class of the Path-referenced cosine; None skips it."""
    layer: int | None = None
    """The summary layer (emotion scatter, second logit-lens layer); None = summary_layer()."""
    lens_k: int = 12
    """Tokens per list (promoted / suppressed) in the logit lens."""
    lens_layers: tuple[int, ...] | None = None
    """Layers of the logit lens; None = (floor(5L/6), the summary layer)."""
    emotions: bool = True
    """Extract emotion vectors and align the concept vectors with them (needs an engine)."""
    emotion_role: str = "user"
    """Chat role the emotion passages are rendered as (the brief's choice: a user message)."""
    emotion_corpus: str | None = None
    """Path of another emotion corpus JSON; None = the package's."""
    allow_other_weights: bool = False
    """Allow an engine whose weights fingerprint differs from the extraction's model (its emotion
    vectors and logit lens then describe another model than the concept vectors)."""

    def __post_init__(self):
        if not (isinstance(self.pair, (tuple, list)) and len(self.pair) == 2):
            raise ValueError(f"AnalysisOptions.pair: {self.pair!r} must be two class names")
        for i, c in enumerate(self.pair):
            check_str(c, f"AnalysisOptions.pair[{i}]", ValueError)
        self.pair = tuple(self.pair)
        if self.reference is not None:
            check_str(self.reference, "AnalysisOptions.reference", ValueError)
        if self.layer is not None:
            check_int(self.layer, "AnalysisOptions.layer", ValueError, 0)
        check_int(self.lens_k, "AnalysisOptions.lens_k", ValueError, 1, 1000)
        if self.lens_layers is not None:
            if not isinstance(self.lens_layers, (tuple, list)) or not self.lens_layers:
                raise ValueError(f"AnalysisOptions.lens_layers: {self.lens_layers!r} must be a non-empty tuple of ints")
            self.lens_layers = tuple(check_int(x, f"AnalysisOptions.lens_layers[{i}]", ValueError, 0)
                                     for i, x in enumerate(self.lens_layers))
        check_bool(self.emotions, "AnalysisOptions.emotions", ValueError)
        check_str(self.emotion_role, "AnalysisOptions.emotion_role", ValueError, choices=("user", "assistant", "system"))
        if self.emotion_corpus is not None:
            check_str(self.emotion_corpus, "AnalysisOptions.emotion_corpus", ValueError)
        check_bool(self.allow_other_weights, "AnalysisOptions.allow_other_weights", ValueError)


@dataclass
class VectorAnalysis:
    """Every analysis of one extraction (analyse()); to_json() holds every number, summary() a
    few lines of text for a terminal."""

    model: ModelIdentity
    classes: tuple[str, ...]
    counts: list[int]
    pair: tuple[str, str]
    layer: int
    layer_note: str
    cosines: CosineTable
    selection: dict = field(default_factory=dict)
    """Per class: LayerSelection (from the extraction)."""
    comparison: ExtractionComparison | None = None
    lenses: list[LogitLens] = field(default_factory=list)
    emotions: EmotionVectors | None = None
    alignment: EmotionAlignment | None = None

    def to_json(self) -> dict:
        return dict(model=self.model.to_json(), classes=list(self.classes), counts=self.counts, pair=list(self.pair),
                    layer=self.layer, layer_note=self.layer_note, cosines=self.cosines.to_json(),
                    selection={k: v.to_json() for k, v in self.selection.items()},
                    comparison=None if self.comparison is None else self.comparison.to_json(),
                    lenses=[x.to_json() for x in self.lenses],
                    emotions=None if self.emotions is None else self.emotions.to_json(),
                    alignment=None if self.alignment is None else self.alignment.to_json())

    def summary(self) -> str:
        c = self.cosines
        a, b = self.pair
        lines = [f"model {self.model.name} ({self.model.family}, {self.model.num_layers} layers, D={self.model.hidden_size}); "
                 f"classes {list(self.classes)} with {self.counts} examples",
                 f"summary layer: {self.layer_note}",
                 f"cos(v_{a}, v_{b}): min {c.min_value:+.3f} at layer {c.min_layer}"
                 + ("" if c.min_null is None else
                    f"; permutation null of the min over layers: mean {np.nanmean(c.min_null):+.3f}, "
                    f"p = {c.min_p_lower:.3g} ({len(c.min_null)} permutations)"),
                 f"  at layer {self.layer}: {c.observed[self.layer]:+.3f}"
                 + ("" if c.null is None else f" (null {c.null.mean[self.layer]:+.3f} "
                    f"[{c.null.p05[self.layer]:+.3f}, {c.null.p95[self.layer]:+.3f}])")
                 + ("" if c.path_referenced is None else
                    f"; Path-referenced {c.path_referenced[self.layer]:+.3f}, orthogonal-offsets reference "
                    f"{c.orthogonal_ref[self.layer]:+.3f}")]
        if self.comparison is not None:
            other = self.comparison.labels[1]
            t = self.comparison.tables[other]
            lines.append(f"{other}: min cos {t.min_value:+.3f} at layer {t.min_layer}; "
                         + ", ".join(f"cos(v_{k} {self.comparison.labels[0]}, {other}) at layer {self.layer} "
                                     f"{v[self.layer]:+.3f}" for k, v in self.comparison.vector_cosine.items()))
        for lens in self.lenses:
            lines.append(f"logit lens {lens.name} @ layer {lens.layer}: + "
                         + " ".join(repr(t.text) for t in lens.promoted[:6]) + " | - "
                         + " ".join(repr(t.text) for t in lens.suppressed[:6]))
        if self.alignment is not None:
            al, l = self.alignment, self.alignment.layer
            for cls in self.pair:
                cos = al.emotion_cosine[cls][l]
                order = sorted(range(len(cos)), key=lambda e: -cos[e])
                lines.append(f"v_{cls} @ layer {l}: cos with valence PC {al.pc_cosine[cls][l]:+.3f}; most aligned "
                             + ", ".join(f"{al.emotions[e]} {cos[e]:+.2f}" for e in order[:3]))
        return "\n".join(lines)


def _check_model(cv: ConceptVectors, engine, allow_other_weights: bool) -> None:
    if engine.D != cv.model.hidden_size or engine.L != cv.model.num_layers:
        raise ValueError(f"engine: the model has {engine.L} layers of {engine.D}, the extraction "
                         f"{cv.model.num_layers} of {cv.model.hidden_size}")
    if not allow_other_weights:
        ident = model_identity(engine.loaded)
        if ident.weights_sha256 != cv.model.weights_sha256:
            raise ValueError(f"engine: weights fingerprint {ident.weights_sha256[:12]} differs from the extraction's "
                             f"{cv.model.weights_sha256[:12]} ({cv.model.name}); set allow_other_weights to analyse "
                             "the vectors with another model")


def analyse(cv: ConceptVectors, engine=None, options: AnalysisOptions | None = None, *,
            baseline: ConceptVectors | None = None, baseline_labels: tuple[str, str] = ("trained", "untrained"),
            emotions: EmotionVectors | None = None, on_progress: Callable[[str], None] | None = None) -> VectorAnalysis:
    """Every analysis of `cv`: cosines with their nulls, the comparison with `baseline` when given,
    and, with an engine of the same model, the logit lens and the emotion alignment (emotion
    vectors are extracted through the engine unless given)."""
    options = options or AnalysisOptions()
    a, b = options.pair
    L = cv.means.shape[0]
    say = on_progress or (lambda _msg: None)
    if options.layer is not None:
        if options.layer >= L:
            raise ValueError(f"AnalysisOptions.layer: {options.layer} is out of range for {L} layers")
        layer, note = options.layer, f"layer {options.layer} (chosen)"
    else:
        layer, note = summary_layer(cv, options.pair)
    say("cosines")
    result = VectorAnalysis(model=cv.model, classes=tuple(cv.classes), counts=list(cv.counts), pair=(a, b),
                            layer=layer, layer_note=note, cosines=cosine_table(cv, a, b, options.reference),
                            selection=dict(cv.selection))
    if baseline is not None:
        result.comparison = compare_extractions(cv, baseline, labels=baseline_labels, pair=(a, b),
                                                reference=options.reference)
    if engine is None:
        return result
    _check_model(cv, engine, options.allow_other_weights)
    say("logit lens")
    lens_layers = options.lens_layers or tuple(dict.fromkeys((lens_layer(L), layer)))
    for l in lens_layers:
        if l >= L:
            raise ValueError(f"AnalysisOptions.lens_layers: {l} is out of range for {L} layers")
        for cls in (a, b):
            result.lenses.append(logit_lens(engine, cv.vector(cls)[l], k=options.lens_k, layer=l, name=f"v_{cls}"))
    if options.emotions or emotions is not None:
        if emotions is None:
            say("emotion vectors")
            corpus = load_emotion_corpus(options.emotion_corpus)
            emotions = emotion_vectors(engine, corpus, role=options.emotion_role)
        result.emotions = emotions
        result.alignment = emotion_alignment(cv, emotions, pair=(a, b), layer=layer)
    return result
