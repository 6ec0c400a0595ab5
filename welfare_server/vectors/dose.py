"""Dose-response of steering on self-reports: the numbers behind the paper's "X".

For each vector (v_Gold, v_Mold) and each alpha, alpha * v is added at a layer (default: the
vector's selected l*) on every assistant-turn and generated token (never user turns), and the
model answers open self-report questions (package data, data/self_report.json). Each answer is
scored twice:

(a) the model's own rating: the conversation goes on with a fixed follow-up question asking for
    one digit 1-9 (steered the same way), and the rating is the expectation of the digit under the
    model's probabilities of the nine digit tokens at its first answer position, renormalised over
    the nine (score_token_ids); the mass the nine held before renormalising is kept beside it;
(b) a sentiment score of the free text by a Judge (any object with score(texts) -> floats in its
    score_range); ModelJudge lets any loaded model (an Engine) rate sentiment 1-9 by the same
    expectation.

Controls: for each vector and each seed, a Gaussian random direction u scaled to the vector's norm,
steered with the same alphas, so beta * ||u|| = alpha * ||v|| holds exactly (the control vector is
stored with norm ||v|| and steered with coefficient alpha). A seed gives the same direction for
every vector it controls: the controls of v_Gold and v_Mold differ only in norm.

Alpha 0 adds nothing, so it is generated once without steering and shared by every vector's row
(a zero-coefficient steer equals the unsteered generation; the tests check it on the engine).
All generation is greedy; one engine.generate call per alpha holds every prompt x condition, and a
second one the follow-up ratings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from welfare_server.model.engine import Request, SamplingParams, Scope, SteeringSpec, SteeringTerm
from welfare_server.model.fields import check_int, check_number, check_str
from welfare_server.vectors.types import ConceptVectors

SELF_REPORT_PROMPTS = "self_report.json"
"""The package's self-report questions, under welfare_server/vectors/data/."""
DEFAULT_RATING_QUESTION = ("On a scale from 1 to 9, where 1 means very bad and 9 means very good, how do you "
                           "feel right now? Answer with a single digit.")
DEFAULT_JUDGE_INSTRUCTION = ("Rate the sentiment of the following text on a scale from 1 to 9, where 1 is very "
                             "negative, 5 is neutral and 9 is very positive. Answer with a single digit.\n\n"
                             "Text: \"{text}\"")
RATING_SCALE = tuple(range(1, 10))
"""The digits of the 1-9 scale."""


def load_self_report_prompts(path: str | Path | None = None) -> list[str]:
    """The self-report questions: the package's (data/self_report.json) or a JSON file of the same
    form ({"prompts": [...]})."""
    if path is None:
        text = resources.files("welfare_server.vectors").joinpath("data", SELF_REPORT_PROMPTS).read_text(encoding="utf-8")
        where = f"package data {SELF_REPORT_PROMPTS}"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = json.loads(text)
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{where}: expected {{'prompts': [...]}} with at least one prompt")
    return [check_str(p, f"{where}: prompts[{i}]", ValueError) for i, p in enumerate(prompts)]


# --------------------------------------------------------------------------- ratings
def rating_token_ids(tokenizer, scale: Sequence[int] = RATING_SCALE) -> list[int]:
    """The token id of each digit of `scale` as the first token of an answer. A tokenizer that
    encodes a lone digit as several tokens (a sentencepiece word-start marker, then the digit)
    contributes the last one when it decodes to the digit; anything else is refused."""
    ids = []
    for k in scale:
        enc = tokenizer.encode(str(k), add_special_tokens=False)
        if not enc or tokenizer.decode([enc[-1]]).strip() != str(k):
            raise ValueError(f"tokenizer: the digit {k} is not a token of its own ({enc}); a 1-9 rating cannot "
                             "be read from one position")
        ids.append(int(enc[-1]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"tokenizer: the digits share token ids {ids}")
    return ids


def expected_rating(logprobs: Sequence[float], scale: Sequence[int] = RATING_SCALE) -> tuple[float, float]:
    """(expectation of the scale under the digits' probabilities renormalised over them, the
    probability mass the digits held) from their raw log-probabilities at one position."""
    lp = torch.tensor(list(logprobs), dtype=torch.float64)
    if lp.numel() != len(scale):
        raise ValueError(f"logprobs: {lp.numel()} values for a scale of {len(scale)}")
    total = torch.logsumexp(lp, 0)
    p = torch.exp(lp - total)
    return float((p * torch.tensor(list(scale), dtype=torch.float64)).sum()), float(torch.exp(total))


@runtime_checkable
class Judge(Protocol):
    """Scores the sentiment of texts: score(texts) returns one float per text in score_range
    (low = negative, high = positive)."""

    score_range: tuple[float, float]

    def score(self, texts: Sequence[str]) -> list[float]:
        ...


class ModelJudge:
    """A Judge backed by any loaded model: each text is put in `instruction` as one user turn and
    the score is the expected 1-9 digit of the model's first answer token (expected_rating),
    unsteered and greedy. The same engine as the steered model may serve (its requests carry no
    steering)."""

    score_range = (1.0, 9.0)

    def __init__(self, engine, *, instruction: str = DEFAULT_JUDGE_INSTRUCTION, max_text_chars: int = 2000):
        check_str(instruction, "instruction", ValueError)
        if "{text}" not in instruction:
            raise ValueError("instruction: must contain {text}, where the rated text goes")
        self.engine = engine
        self.instruction = instruction
        self.max_text_chars = check_int(max_text_chars, "max_text_chars", ValueError, 1)
        """Texts are cut to this many characters: a judge's prompt stays bounded."""
        self.token_ids = rating_token_ids(engine.tokenizer)
        self.last_mass: list[float] = []
        """The digits' probability mass of each text of the last score() call (how far the judge
        was answering with a digit at all)."""

    def score(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            self.last_mass = []
            return []
        requests = [Request(messages=[{"role": "user", "content": self.instruction.replace(
                            "{text}", t[: self.max_text_chars])}],
                            sampling=SamplingParams(max_new_tokens=1, score_token_ids=self.token_ids, seed=0))
                    for t in texts]
        outs = self.engine.generate(requests)
        ratings = [expected_rating(o.scores[0]) for o in outs]
        self.last_mass = [m for _v, m in ratings]
        return [v for v, _m in ratings]


# --------------------------------------------------------------------------- the experiment
def control_vectors(vector: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """[len(seeds), D] fp32: per seed a Gaussian direction (torch.Generator(seed)), scaled to the
    norm of `vector` (computed in float64), so beta * ||u|| = alpha * ||v|| with beta = alpha."""
    v = vector.detach().double().reshape(-1)
    target = v.norm()
    rows = []
    for seed in seeds:
        u = torch.randn(v.numel(), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
        rows.append(u * (target / u.norm()))
    return torch.stack(rows).float() if rows else torch.zeros(0, v.numel())


@dataclass
class DoseConfig:
    """What dose_response runs. Every field is checked when the config is made."""

    alphas: tuple[float, ...] = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
    """Steering coefficients (alpha * v is added; v is not normalised, as in the paper)."""
    vectors: tuple[str, ...] = ("gold", "mold")
    """Classes of the extraction whose vectors are steered along."""
    layer: int | None = None
    """Steering layer of every vector; None = each vector's selected l* (selection[cls].best_layer)."""
    control_seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the norm-matched random control directions (per vector); () = no controls."""
    prompts: tuple[str, ...] | None = None
    """Self-report questions; None = the package's (data/self_report.json)."""
    max_new_tokens: int = 48
    """Tokens of each free-text answer (greedy); bounds the run's cost."""
    rating_question: str = DEFAULT_RATING_QUESTION
    """The fixed follow-up turn asking for a 1-9 self-rating (answered in one token)."""
    scope: Scope = Scope.ASSISTANT_AND_GENERATED
    """Tokens steered: the paper's assistant-turn and generated tokens (user turns never)."""
    seed: int = 0
    """Sampling seed of every request (greedy decoding does not use it; kept for reproducibility)."""

    def __post_init__(self):
        for name in ("alphas", "vectors", "control_seeds"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"DoseConfig.{name}: {getattr(self, name)!r} must be a tuple")
        if not self.alphas:
            raise ValueError("DoseConfig.alphas: empty")
        self.alphas = tuple(check_number(a, f"DoseConfig.alphas[{i}]", ValueError) for i, a in enumerate(self.alphas))
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"DoseConfig.alphas: {self.alphas} repeats a value")
        if not self.vectors:
            raise ValueError("DoseConfig.vectors: empty")
        self.vectors = tuple(check_str(v, f"DoseConfig.vectors[{i}]", ValueError) for i, v in enumerate(self.vectors))
        if len(set(self.vectors)) != len(self.vectors):
            raise ValueError(f"DoseConfig.vectors: {self.vectors} repeats a class")
        self.control_seeds = tuple(check_int(s, f"DoseConfig.control_seeds[{i}]", ValueError, 0, 2**63 - 1)
                                   for i, s in enumerate(self.control_seeds))
        if len(set(self.control_seeds)) != len(self.control_seeds):
            raise ValueError(f"DoseConfig.control_seeds: {self.control_seeds} repeats a seed")
        if self.layer is not None:
            check_int(self.layer, "DoseConfig.layer", ValueError, 0)
        if self.prompts is not None:
            if not isinstance(self.prompts, (tuple, list)) or not self.prompts:
                raise ValueError("DoseConfig.prompts: must be None or a non-empty tuple of strings")
            self.prompts = tuple(check_str(p, f"DoseConfig.prompts[{i}]", ValueError) for i, p in enumerate(self.prompts))
        check_int(self.max_new_tokens, "DoseConfig.max_new_tokens", ValueError, 1, 4096)
        check_str(self.rating_question, "DoseConfig.rating_question", ValueError)
        if not isinstance(self.scope, Scope):
            try:
                self.scope = Scope(self.scope)
            except ValueError:
                raise ValueError(f"DoseConfig.scope: {self.scope!r} is not one of {[s.value for s in Scope]}") from None
        check_int(self.seed, "DoseConfig.seed", ValueError, -2**63, 2**63 - 1)

    def to_json(self) -> dict:
        data = asdict(self)
        data["scope"] = self.scope.value
        return data


@dataclass
class DoseSample:
    """One answer: a condition, an alpha, a prompt, the text and its scores."""

    vector: str
    """The class steered along ("gold"), its control ("control:gold"), or "none" (alpha 0)."""
    seed: int | None
    """The control's seed (None for a concept vector and for "none")."""
    alpha: float
    layer: int | None
    prompt: str
    text: str
    rating: float
    """The model's own 1-9 rating (expectation over the digit tokens)."""
    rating_mass: float
    """The digits' probability mass at the rating position."""
    judge: float | None = None
    """The judge's sentiment score of `text`, or None without a judge."""


@dataclass
class DoseRow:
    """mean +/- standard error of the scores of one (vector, alpha) cell."""

    vector: str
    alpha: float
    n: int
    rating_mean: float
    rating_se: float
    rating_mass_mean: float
    judge_mean: float | None
    judge_se: float | None


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class DoseResult:
    config: DoseConfig
    prompts: list[str]
    layers: dict[str, int]
    """Per steered class: the layer it was steered at (its controls too)."""
    norms: dict[str, float]
    """Per steered class: ||v|| at its layer (every control of it has this norm)."""
    samples: list[DoseSample]
    rows: list[DoseRow]
    """One per (vector or "control:<class>", alpha), in config order; a control row pools its
    seeds (n = prompts x seeds); every row at alpha 0 is the one unsteered run (n = prompts)."""
    judge_range: tuple[float, float] | None = None

    @property
    def row_names(self) -> list[str]:
        return list(dict.fromkeys(r.vector for r in self.rows))

    def table(self, score: str = "rating") -> dict[str, list[tuple[float, float, float]]]:
        """Per row name: [(alpha, mean, se)] of `score` ("rating" or "judge") over the alphas."""
        if score not in ("rating", "judge"):
            raise ValueError(f"score: {score!r} is not 'rating' or 'judge'")
        out: dict[str, list] = {}
        for r in self.rows:
            mean, se = (r.rating_mean, r.rating_se) if score == "rating" else (r.judge_mean, r.judge_se)
            out.setdefault(r.vector, []).append((r.alpha, mean, se))
        return out

    def to_json(self) -> dict:
        return dict(config=self.config.to_json(), prompts=self.prompts, layers=self.layers, norms=self.norms,
                    judge_range=None if self.judge_range is None else list(self.judge_range),
                    rows=[asdict(r) for r in self.rows], samples=[asdict(s) for s in self.samples])


@dataclass
class _Condition:
    name: str
    seed: int | None
    layer: int | None
    vector: torch.Tensor | None
    bank_id: int | None = field(default=None, repr=False)


def _layer_for(cv: ConceptVectors, cls: str, config: DoseConfig) -> int:
    L = cv.means.shape[0]
    if config.layer is not None:
        if config.layer >= L:
            raise ValueError(f"DoseConfig.layer: {config.layer} is out of range for {L} layers")
        return config.layer
    if cls not in cv.selection:
        raise ValueError(f"DoseConfig.layer: None asks for the selected l* of {cls!r}, but the extraction has no "
                         "layer selection for it; give a layer")
    return int(cv.selection[cls].best_layer)


def dose_response(engine, cv: ConceptVectors, config: DoseConfig | None = None, *, judge: Judge | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> DoseResult:
    """Steer along each of config.vectors and its norm-matched controls at every alpha, score the
    answers (see the module docstring) and tabulate mean +/- SE per (vector, alpha).
    on_progress(done, total) counts generate calls."""
    config = config or DoseConfig()
    if engine.D != cv.model.hidden_size or engine.L != cv.model.num_layers:
        raise ValueError(f"engine: the model has {engine.L} layers of {engine.D}, the extraction "
                         f"{cv.model.num_layers} of {cv.model.hidden_size}")
    if judge is not None and not isinstance(judge, Judge):
        raise ValueError(f"judge: a {type(judge).__name__} has no score(texts) / score_range")
    prompts = list(config.prompts) if config.prompts is not None else load_self_report_prompts()
    digits = rating_token_ids(engine.tokenizer)
    conditions, layers, norms = [], {}, {}
    for cls in config.vectors:
        if cls not in cv.classes:
            raise ValueError(f"DoseConfig.vectors: {cls!r} is not a class of the extraction {list(cv.classes)}")
        layer = _layer_for(cv, cls, config)
        v = cv.vector(cls)[layer].float()
        layers[cls], norms[cls] = layer, float(v.double().norm())
        conditions.append(_Condition(cls, None, layer, v))
        for seed, u in zip(config.control_seeds, control_vectors(v, config.control_seeds)):
            conditions.append(_Condition(f"control:{cls}", seed, layer, u))
    unsteered = _Condition("none", None, None, None)
    sampling = dict(temperature=0.0, seed=config.seed)
    nonzero = [a for a in config.alphas if a != 0]
    total_calls = 2 * (len(nonzero) + (0.0 in config.alphas))
    done = 0
    samples: list[DoseSample] = []
    try:
        # Persistent bank entries: each condition's vector occupies one slot however many requests use it.
        for c in conditions:
            c.bank_id = engine.register_vector(c.vector)
        plan = ([(0.0, [unsteered])] if 0.0 in config.alphas else []) + [(a, conditions) for a in nonzero]
        for alpha, conds in plan:
            def spec(c):
                if c.vector is None:
                    return None
                return SteeringSpec([SteeringTerm(c.bank_id, layers=[c.layer], coefficient=alpha)], config.scope)
            cells = [(c, p) for c in conds for p in prompts]
            answers = engine.generate([Request(messages=[{"role": "user", "content": p}], steering=spec(c),
                                               sampling=SamplingParams(max_new_tokens=config.max_new_tokens, **sampling))
                                       for c, p in cells])
            done += 1
            if on_progress is not None:
                on_progress(done, total_calls)
            follow = engine.generate([Request(messages=[{"role": "user", "content": p},
                                                        {"role": "assistant", "content": out.text},
                                                        {"role": "user", "content": config.rating_question}],
                                              steering=spec(c),
                                              sampling=SamplingParams(max_new_tokens=1, score_token_ids=digits, **sampling))
                                      for (c, p), out in zip(cells, answers)])
            done += 1
            if on_progress is not None:
                on_progress(done, total_calls)
            for (c, p), out, rated in zip(cells, answers, follow):
                rating, mass = expected_rating(rated.scores[0])
                samples.append(DoseSample(vector=c.name, seed=c.seed, alpha=alpha, layer=c.layer, prompt=p,
                                          text=out.text, rating=rating, rating_mass=mass))
    finally:
        for c in conditions:
            if c.bank_id is not None:
                engine.remove_vector(c.bank_id)
    if judge is not None:
        scores = judge.score([s.text for s in samples])
        if len(scores) != len(samples):
            raise ValueError(f"judge: {len(scores)} scores for {len(samples)} texts")
        for s, value in zip(samples, scores):
            s.judge = float(value)
    rows = []
    names = [c.name for c in conditions]
    for name in dict.fromkeys(names):
        for alpha in config.alphas:
            if alpha == 0:
                cell = [s for s in samples if s.vector == "none"]
            else:
                cell = [s for s in samples if s.vector == name and s.alpha == alpha]
            rating = _mean_se([s.rating for s in cell])
            jm, js = _mean_se([s.judge for s in cell]) if judge is not None else (None, None)
            rows.append(DoseRow(vector=name, alpha=alpha, n=len(cell), rating_mean=rating[0], rating_se=rating[1],
                                rating_mass_mean=_mean_se([s.rating_mass for s in cell])[0],
                                judge_mean=jm, judge_se=js))
    return DoseResult(config=config, prompts=prompts, layers=layers, norms=norms, samples=samples, rows=rows,
                      judge_range=None if judge is None else tuple(float(x) for x in judge.score_range))
