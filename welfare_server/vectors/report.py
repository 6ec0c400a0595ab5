"""One self-contained HTML report of an extraction's analyses: every figure is a PNG inline as
base64, every figure has the numbers behind it as an HTML table, and nothing is fetched from
anywhere (no scripts, fonts or style sheets from outside the file).

API (for the command line and the server):

    data = build_report(cv, engine, ReportOptions(...), baseline=None, metrics=None, judge=None)
    write_report(path, data)                      # -> the path written
    make_report(path, cv, engine, ...)            # both, returns the ReportData

build_report runs analysis.analyse (cosines and their nulls, the comparison with a baseline
extraction, logit lens, emotion alignment) and dose.dose_response (unless options.dose is None);
write_report only draws and writes, so a ReportData made once (or pieces computed elsewhere) can
be written again. Figures need matplotlib (imported when a report is written).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from welfare_server.model.fields import check_bool, check_int, check_str
from welfare_server.vectors.analysis import AnalysisOptions, VectorAnalysis, analyse
from welfare_server.vectors.dose import DoseConfig, DoseResult, Judge, ModelJudge, dose_response
from welfare_server.vectors.types import ConceptVectors

METRIC_SERIES = ("return", "gold", "mold")
"""Training-curve series: every numeric key of a metrics record whose name contains one of these
words (case-insensitive) is plotted against the step."""
STEP_KEYS = ("step", "update", "iteration", "iter")
"""The first of these keys a metrics record has is its x value (else its line number)."""
MAX_METRIC_ROWS = 200
"""Rows of the training-metrics table (evenly subsampled beyond this; the figure uses every row)."""


@dataclass
class ReportOptions:
    """What build_report computes and how the report looks. Checked when made."""

    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    """Options of the analyses (analysis.AnalysisOptions)."""
    dose: DoseConfig | None = field(default_factory=DoseConfig)
    """The dose-response experiment; None leaves it out (it is the slow part: it generates)."""
    judge_with_engine: bool = True
    """Without an explicit judge, score the free text's sentiment with the same engine
    (ModelJudge, unsteered); False leaves the judge column out."""
    title: str = "Concept-vector report"
    dpi: int = 110
    """Resolution of the inline figures."""

    def __post_init__(self):
        if not isinstance(self.analysis, AnalysisOptions):
            raise ValueError(f"ReportOptions.analysis: a {type(self.analysis).__name__}, expected AnalysisOptions")
        if self.dose is not None and not isinstance(self.dose, DoseConfig):
            raise ValueError(f"ReportOptions.dose: a {type(self.dose).__name__}, expected a DoseConfig or None")
        check_bool(self.judge_with_engine, "ReportOptions.judge_with_engine", ValueError)
        check_str(self.title, "ReportOptions.title", ValueError)
        check_int(self.dpi, "ReportOptions.dpi", ValueError, 30, 600)


@dataclass
class ReportData:
    """Everything a report shows."""

    analysis: VectorAnalysis
    dose: DoseResult | None = None
    metrics: list[dict] | None = None
    """Training metrics records (one JSON object per line of a run's metrics JSONL)."""
    title: str = "Concept-vector report"
    dpi: int = 110
    notes: list[str] = field(default_factory=list)
    """Free lines shown at the top (e.g. how the vectors were made)."""

    def to_json(self) -> dict:
        return dict(title=self.title, notes=self.notes, analysis=self.analysis.to_json(),
                    dose=None if self.dose is None else self.dose.to_json(), metrics=self.metrics)


def load_metrics(path: str | Path) -> list[dict]:
    """A run's metrics JSONL: one JSON object per non-empty line."""
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: a {type(record).__name__}, expected a JSON object")
        records.append(record)
    return records


def build_report(cv: ConceptVectors, engine=None, options: ReportOptions | None = None, *,
                 baseline: ConceptVectors | None = None, baseline_labels: tuple[str, str] = ("trained", "untrained"),
                 metrics: str | Path | Sequence[dict] | None = None, judge: Judge | None = None,
                 notes: Sequence[str] = (), on_progress: Callable[[str], None] | None = None) -> ReportData:
    """Run every analysis of `cv` (with an engine of the same model: logit lens, emotions, dose)."""
    options = options or ReportOptions()
    say = on_progress or (lambda _m: None)
    result = analyse(cv, engine, options.analysis, baseline=baseline, baseline_labels=baseline_labels, on_progress=say)
    dose = None
    if engine is not None and options.dose is not None:
        if judge is None and options.judge_with_engine:
            judge = ModelJudge(engine)
        say("dose-response")
        dose = dose_response(engine, cv, options.dose, judge=judge,
                             on_progress=lambda d, t: say(f"dose-response: {d}/{t} generate calls"))
    if isinstance(metrics, (str, Path)):
        metrics = load_metrics(metrics)
    return ReportData(analysis=result, dose=dose, metrics=None if metrics is None else list(metrics),
                      title=options.title, dpi=options.dpi, notes=list(notes))


def make_report(path: str | Path, cv: ConceptVectors, engine=None, options: ReportOptions | None = None,
                **kwargs: Any) -> ReportData:
    """build_report(cv, engine, options, **kwargs), then write_report(path, data)."""
    data = build_report(cv, engine, options, **kwargs)
    write_report(path, data)
    return data


# --------------------------------------------------------------------------- HTML pieces
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:+.{digits}f}" if digits else f"{x:.0f}"
    return _e(x)


def _table(table_id: str, caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="text">{_e(c)}</td>' if isinstance(c, str) else f"<td>{_num(c, digits)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return (f'<table class="numbers" id="{_e(table_id)}"><caption>{_e(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


class _Figures:
    """Draws figures with matplotlib's object API (no pyplot state: safe beside other threads)."""

    def __init__(self, dpi: int):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the install
            raise RuntimeError("write_report needs matplotlib (pip install matplotlib)") from error
        self._Figure, self._Canvas, self.dpi = Figure, FigureCanvasAgg, dpi
        self.count = 0

    def new(self, ncols: int = 1, width: float = 6.4, height: float = 3.8, integer_x: bool = False):
        fig = self._Figure(figsize=(width * ncols, height), dpi=self.dpi)
        self._Canvas(fig)
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
        if integer_x:  # layers and steps are whole numbers
            from matplotlib.ticker import MaxNLocator

            for ax in axes:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, axes

    def img(self, fig, alt: str) -> str:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi)
        self.count += 1
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
table.numbers{border-collapse:collapse;font-size:0.82em;margin:0.6em 0 1.2em}
table.numbers td,table.numbers th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.numbers td:first-child,table.numbers th:first-child{text-align:left}
caption{text-align:left;font-weight:bold;padding:4px 0}
figure{margin:0.5em 0}img{max-width:100%}p.read{background:#f6f6f2;padding:0.5em 0.8em;border-left:3px solid #bba}
details{margin:0.5em 0}td.text{text-align:left;max-width:520px}"""


def _section(title: str, read: str, parts: Sequence[str]) -> str:
    return f"<h2>{_e(title)}</h2><p class=\"read\">{_e(read)}</p>" + "".join(parts)


def _cosine_section(a: VectorAnalysis, figs: _Figures) -> str:
    c, (x, y) = a.cosines, a.pair
    layers = list(range(c.num_layers))
    fig, (ax,) = figs.new(width=11.0, height=4.6, integer_x=True)
    if c.null is not None:
        ax.fill_between(layers, c.null.p05, c.null.p95, color="#999", alpha=0.3,
                        label="permutation null 5-95% (shuffled class labels)")
        ax.plot(layers, c.null.mean, color="#777", ls="--", lw=1, label="permutation null mean")
    ax.plot(layers, c.observed, color="k", marker="o", ms=3, label=f"cos(v_{x}, v_{y})")
    if c.path_referenced is not None:
        if c.path_null is not None:
            ax.fill_between(layers, c.path_null.p05, c.path_null.p95, color="#6a9fd8", alpha=0.2,
                            label="Path-referenced: permutation null 5-95%")
        ax.plot(layers, c.path_referenced, color="#1f5fa8", marker="s", ms=3,
                label=f"Path-referenced cos({x}-{c.reference}, {y}-{c.reference})")
        ax.plot(layers, c.orthogonal_ref, color="#c0392b", ls=":", lw=1.5,
                label="orthogonal-offsets reference (unrelated effects, observed sizes)")
    if a.comparison is not None:
        other = a.comparison.labels[1]
        ax.plot(layers, a.comparison.tables[other].observed, color="#8e44ad", ls="-.", marker=".",
                label=f"cos(v_{x}, v_{y}) of the {other} model")
    ax.axhline(-0.5, color="#bbb", lw=0.8)
    ax.axhline(0.0, color="#ddd", lw=0.8)
    ax.axvline(a.layer, color="#e67e22", lw=1, ls="--", label=f"summary layer {a.layer}")
    ax.set_xlabel("layer (residual entering the block)")
    ax.set_ylabel("cosine")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    headers = ["layer", f"cos(v_{x},v_{y})"]
    if c.null is not None:
        headers += ["null mean", "null 5%", "null 95%", "p (lower)"]
    if c.path_referenced is not None:
        headers += ["Path-ref cos", "orthogonal ref", f"|{x}-{c.reference}|", f"|{y}-{c.reference}|"]
    if c.path_null is not None:
        headers += ["Path-ref null mean", "Path-ref null 5%", "Path-ref null 95%"]
    if a.comparison is not None:
        headers += [f"cos ({a.comparison.labels[1]})"]
    rows = []
    for l in layers:
        row: list[Any] = [l, c.observed[l]]
        if c.null is not None:
            row += [c.null.mean[l], c.null.p05[l], c.null.p95[l], f"{c.null.p_lower[l]:.3g}"]
        if c.path_referenced is not None:
            row += [c.path_referenced[l], c.orthogonal_ref[l], f"{c.offset_norms[0][l]:.3g}", f"{c.offset_norms[1][l]:.3g}"]
        if c.path_null is not None:
            row += [c.path_null.mean[l], c.path_null.p05[l], c.path_null.p95[l]]
        if a.comparison is not None:
            row += [a.comparison.tables[a.comparison.labels[1]].observed[l]]
        rows.append(row)
    summary = (f"Most negative cos(v_{x}, v_{y}): {c.min_value:+.3f} at layer {c.min_layer}"
               + ("" if c.min_null is None else
                  f"; under permutation the minimum over layers averages {sum(c.min_null) / len(c.min_null):+.3f}, "
                  f"lower-tail p = {c.min_p_lower:.3g} ({len(c.min_null)} permutations)") + ".")
    read = ("v_Mold and v_Gold are each a class mean minus the mean of the other two, so their cosine is negative "
            "by construction: about -0.5 when the classes do not differ at all (the permutation null, grey), "
            "-0.8 when Mold and Gold move the residual away from Path along unrelated directions of equal size, "
            "and towards -1 when one class's offset is much larger than the other's (the red dotted line is "
            "this orthogonal-offsets value for the observed offset sizes). The Path-referenced cosine (blue) "
            "compares the two offsets from Path directly: 0 = unrelated, negative = opposed; its own "
            "permutation null sits near +0.5 because both differences share the Path mean's noise. "
            "p (lower) is the fraction of permutations at or below the observed value. "
            "A cosine is evidence of a shared Mold/Gold axis only where it lies below both the null band "
            "and the orthogonal-offsets reference, with a negative Path-referenced cosine.")
    return _section("Mold/Gold cosine per layer, with its nulls", read,
                    [f"<p>{_e(summary)}</p>", figs.img(fig, "cos(v_Mold, v_Gold) per layer with the permutation "
                                                             "null, the Path-referenced cosine and the orthogonal-offsets reference"),
                     _table("table-cosines", "Cosines per layer", headers, rows)])


def _selection_section(a: VectorAnalysis, figs: _Figures) -> str:
    if not a.selection:
        return _section("Layer selection", "This extraction carries no layer-selection figures.", [])
    names = list(a.selection)
    fig, axes = figs.new(ncols=3, width=4.2, height=3.4, integer_x=True)
    stats = [("auroc", "AUROC (held-out projections)"), ("cohens_d", "|Cohen's d|"), ("overlap", "histogram overlap")]
    for ax, (key, label) in zip(axes, stats):
        for i, name in enumerate(names):
            sel = a.selection[name]
            values = getattr(sel, key)
            values = [abs(v) for v in values] if key == "cohens_d" else values
            line, = ax.plot(range(len(values)), values, marker=".", label=name)
            ax.axvline(sel.best_layer, color=line.get_color(), ls="--", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    L = len(a.selection[names[0]].auroc)
    headers = ["layer"] + [f"{n} {k}" for n in names for k in ("AUROC", "|d|", "overlap")]
    rows = [[l] + [v for n in names for v in (a.selection[n].auroc[l], abs(a.selection[n].cohens_d[l]),
                                                a.selection[n].overlap[l])] for l in range(L)]
    rows.append(["l*"] + [x for n in names for x in (str(a.selection[n].best_layer), "", "")])
    read = ("Separability of held-out examples' projections onto each class's vector (class vs the rest). "
            "Dashed lines: l* = floor of the mean of argmax AUROC, argmax |d| and argmin overlap (the "
            "steering layer). High AUROC on the extraction's own synthetic trajectories says the classes are "
            "linearly separable there; it says nothing yet about what the direction means.")
    return _section("Layer selection", read, [figs.img(fig, "AUROC, |Cohen's d| and overlap per layer, l* dashed"),
                                              _table("table-selection", "Selection figures per layer", headers, rows)])


def _comparison_section(a: VectorAnalysis, figs: _Figures) -> str:
    comp = a.comparison
    first, other = comp.labels
    fig, (ax,) = figs.new(width=8.0, integer_x=True)
    L = len(next(iter(comp.vector_cosine.values())))
    for cls, values in comp.vector_cosine.items():
        ax.plot(range(L), values, marker=".", label=f"cos(v_{cls} {first}, v_{cls} {other})")
    band = 2 / math.sqrt(a.model.hidden_size)
    ax.axhspan(-band, band, color="#ccc", alpha=0.4, label=f"+/- 2/sqrt(D): two random directions")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine")
    ax.legend(fontsize=7)
    headers = ["layer"] + [f"v_{c} {first} vs {other}" for c in comp.vector_cosine] + [
        f"cos(v_{a.pair[0]},v_{a.pair[1]}) {first}", f"cos(v_{a.pair[0]},v_{a.pair[1]}) {other}"]
    rows = [[l] + [v[l] for v in comp.vector_cosine.values()]
            + [comp.tables[first].observed[l], comp.tables[other].observed[l]] for l in range(L)]
    read = (f"The same classes extracted from the {other} model (the paper's control): how far each {first} "
            f"vector points the way the {other} one does, and each model's own Mold/Gold cosine side by side. "
            "Two unrelated directions in D dimensions have cosine near 0 (grey band).")
    return _section(f"{first} vs {other}", read, [figs.img(fig, f"cosine between {first} and {other} vectors per layer"),
                                                  _table("table-comparison", f"{first} vs {other} per layer", headers, rows)])


def _lens_section(a: VectorAnalysis) -> str:
    tables = []
    for i, lens in enumerate(a.lenses):
        k = max(len(lens.promoted), len(lens.suppressed))
        rows = []
        for j in range(k):
            p = lens.promoted[j] if j < len(lens.promoted) else None
            s = lens.suppressed[j] if j < len(lens.suppressed) else None
            rows.append([j + 1, repr(p.text) if p else "", p.logit if p else None,
                         repr(s.text) if s else "", s.logit if s else None])
        tables.append(_table(f"table-lens-{i}", f"Logit lens of {lens.name} at layer {lens.layer}",
                             ["rank", "promoted", "logit", "suppressed", "logit"], rows))
    read = ("Each vector scaled by the final norm's weight and read by the unembedding (no RMS division: it scales "
            "all logits of one vector alike). Tokens are shown as Python strings (a leading space is visible). "
            "The first layer is floor(5L/6), where the residual is close to what the unembedding reads; earlier "
            "layers are shown for reference and are less interpretable this way.")
    return _section("Logit lens", read, tables)


def _emotion_section(a: VectorAnalysis, figs: _Figures) -> str:
    al, ev = a.alignment, a.emotions
    neg, pos = a.pair
    l = al.layer
    colours = {1: "#1e8449", 0: "#7f8c8d", -1: "#c0392b"}
    fig, (ax,) = figs.new(width=7.0, height=5.0)
    for name, vx, vy, val in zip(al.emotions, al.scatter_x, al.scatter_y, al.valence):
        ax.scatter([vx], [vy], color=colours[val], s=28)
        ax.annotate(name, (vx, vy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="#ddd", lw=0.8)
    ax.axvline(0, color="#ddd", lw=0.8)
    ax.set_xlabel(f"projection on unit(v_{pos} - v_{neg}) at layer {l}")
    ax.set_ylabel(f"projection on the emotions' valence PC at layer {l}")
    ax.set_title("emotion vectors (green positive, red negative, grey mixed valence)", fontsize=9)
    fig2, (ax2,) = figs.new(width=8.0, integer_x=True)
    L = len(al.pc_cosine[neg])
    for cls in a.pair:
        ax2.plot(range(L), al.pc_cosine[cls], marker=".", label=f"cos(v_{cls}, valence PC)")
    band = 2 / math.sqrt(a.model.hidden_size)
    ax2.axhspan(-band, band, color="#ccc", alpha=0.4, label="+/- 2/sqrt(D): two random directions")
    ax2.axvline(l, color="#e67e22", lw=1, ls="--")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("cosine")
    ax2.legend(fontsize=7)
    rows = [[name, str(val), str(aro), al.emotion_cosine[neg][l][e], al.emotion_cosine[pos][l][e],
             al.scatter_x[e], al.scatter_y[e]]
            for e, (name, val, aro) in enumerate(zip(al.emotions, al.valence, ev.arousal))]
    per_layer = [[k, al.pc_cosine[neg][k], al.pc_cosine[pos][k], ev.explained[k], ev.valence_corr[k],
                  ev.arousal_corr[k]] for k in range(L)]
    read = (f"Emotion vectors: per emotion, the mean residual at the last token of its passages (each passage a "
            f"{ev.role} message of the chat template), minus the mean of the other emotions' means. The valence PC "
            "is their first principal component, signed so positive emotions project positive; 'explained' is its "
            "share of their variance and 'corr valence' how well its scores follow the valence signs (if low, the "
            f"first component is not valence and the PC panels should not be read as such). Axis correlation with "
            f"valence at layer {l}: {al.axis_valence_corr:+.3f}. Cosines near 0 (within about 2/sqrt(D) = "
            f"{band:.3f}) are what unrelated directions give.")
    return _section("Emotion alignment", read, [
        figs.img(fig, f"emotion vectors on the {pos}-minus-{neg} axis vs the valence PC (layer {l})"),
        figs.img(fig2, "cosine of the concept vectors with the valence PC per layer"),
        _table("table-emotions", f"Emotions at layer {l}",
               ["emotion", "valence", "arousal", f"cos v_{neg}", f"cos v_{pos}", "x (axis)", "y (PC)"], rows),
        _table("table-emotion-layers", "Valence PC per layer",
               ["layer", f"cos(v_{neg}, PC)", f"cos(v_{pos}, PC)", "explained", "corr valence", "corr arousal"],
               per_layer)])


def _dose_section(d: DoseResult, figs: _Figures) -> str:
    scores = ["rating"] + (["judge"] if d.judge_range is not None else [])
    fig, axes = figs.new(ncols=len(scores), width=5.6, height=4.2)
    palette = ["#1e8449", "#c0392b", "#2471a3", "#b9770e"]
    names = d.row_names
    concept = [n for n in names if not n.startswith("control:")]
    for ax, score in zip(axes, scores):
        table = d.table(score)
        for name in names:
            pts = table[name]
            base = name.split(":", 1)[-1]
            colour = palette[concept.index(base) % len(palette)] if base in concept else "#555"
            control = name.startswith("control:")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[0 if p[2] is None or math.isnan(p[2]) else p[2] for p in pts],
                        color=colour, ls="--" if control else "-", marker="o" if not control else "x", ms=4,
                        capsize=2, alpha=0.6 if control else 1.0,
                        label=(f"random control, |u| = |v_{base}|" if control else f"v_{name} (layer {d.layers[name]})"))
        ax.set_xlabel("alpha (added alpha * v)")
        ax.set_ylabel("self-rating 1-9 (expected digit)" if score == "rating" else
                      f"judge sentiment {d.judge_range[0]:g}-{d.judge_range[1]:g}")
        ax.legend(fontsize=7)
    headers = ["vector", "alpha", "n", "rating mean", "rating SE", "digit mass"] + (
        ["judge mean", "judge SE"] if d.judge_range is not None else [])
    rows = [[r.vector, r.alpha, str(r.n), r.rating_mean, r.rating_se, r.rating_mass_mean]
            + ([r.judge_mean, r.judge_se] if d.judge_range is not None else []) for r in d.rows]
    sample_rows = [[s.vector, "" if s.seed is None else str(s.seed), s.alpha, s.prompt, s.text, s.rating]
                   + ([s.judge] if d.judge_range is not None else []) for s in d.samples]
    samples = (f"<details><summary>All {len(d.samples)} answers</summary>"
               + _table("table-dose-samples", "Answers", ["vector", "seed", "alpha", "prompt", "answer", "rating"]
                        + (["judge"] if d.judge_range is not None else []), sample_rows) + "</details>")
    read = (f"Each vector added with coefficient alpha at its layer on assistant-turn and generated tokens (never the "
            f"user's), greedy answers of at most {d.config.max_new_tokens} tokens to {len(d.prompts)} self-report "
            "questions. Rating: after the answer, a fixed follow-up asks for a digit 1-9, and the score is the "
            "expected digit under the model's probabilities of the nine digits (renormalised; 'digit mass' is how "
            "much probability they held: near 0 means the model was not answering with a digit and the rating "
            "means little). Judge: the free text's sentiment rated by a model. Controls are random directions "
            "with the vector's norm (pooled over seeds); alpha 0 is one unsteered run shared by every row. "
            "Error bars: standard error over prompts (and seeds). The y axes are zoomed to the data: read the "
            "differences against the whole 1-9 scale and against the controls.")
    return _section("Dose-response (the X)", read, [
        figs.img(fig, "self-report scores against alpha, concept vectors and norm-matched controls"),
        _table("table-dose", "Mean and standard error per (vector, alpha)", headers, rows), samples])


def _metric_series(records: list[dict]) -> tuple[list[float], dict[str, list[float | None]]]:
    xs = []
    for i, rec in enumerate(records):
        key = next((k for k in STEP_KEYS if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)),
                   None)
        xs.append(rec[key] if key else i)
    keys = []
    for rec in records:
        for k, v in rec.items():
            if (k not in keys and k not in STEP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and any(word in k.lower() for word in METRIC_SERIES)):
                keys.append(k)
    series = {k: [float(r[k]) if isinstance(r.get(k), (int, float)) else None for r in records] for k in keys}
    return xs, series


def _training_section(records: list[dict], figs: _Figures) -> str:
    xs, series = _metric_series(records)
    if not series:
        return _section("Training curve", f"The metrics ({len(records)} records) have no numeric key containing any of "
                                          f"{list(METRIC_SERIES)}.", [])
    groups = [[k for k in series if "return" in k.lower()], [k for k in series if "return" not in k.lower()]]
    groups = [g for g in groups if g]
    fig, axes = figs.new(ncols=len(groups), width=5.6, height=3.8)
    for ax, keys in zip(axes, groups):
        for k in keys:
            pts = [(x, y) for x, y in zip(xs, series[k]) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    stride = max(1, math.ceil(len(records) / MAX_METRIC_ROWS))
    rows = [[xs[i]] + [series[k][i] for k in series] for i in range(0, len(records), stride)]
    read = (f"Per training step, every metric whose name contains {list(METRIC_SERIES)} (e.g. episode return and "
            "the Gold / Mold tiles entered per episode)." + (f" The table shows every {stride}th record." if stride > 1 else ""))
    return _section("Training curve", read, [figs.img(fig, "training metrics against step"),
                                             _table("table-training", "Training metrics", ["step"] + list(series), rows)])


def write_report(path: str | Path, data: ReportData) -> Path:
    """Draw every figure and write the one HTML file; returns its path."""
    figs = _Figures(data.dpi)
    a = data.analysis
    m = a.model
    head = [f"<h1>{_e(data.title)}</h1>",
            f"<p>Model <b>{_e(m.name)}</b> ({_e(m.family)}, {m.num_layers} layers, hidden size {m.hidden_size}, weights "
            f"{_e(m.weights_sha256[:12])}). Classes {_e(list(a.classes))} with {_e(a.counts)} examples. "
            f"Summary layer: {_e(a.layer_note)}. Written {_e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>"]
    head += [f"<p>{_e(n)}</p>" for n in data.notes]
    body = [_cosine_section(a, figs), _selection_section(a, figs)]
    if a.comparison is not None:
        body.append(_comparison_section(a, figs))
    if a.lenses:
        body.append(_lens_section(a))
    if a.alignment is not None:
        body.append(_emotion_section(a, figs))
    if data.dose is not None:
        body.append(_dose_section(data.dose, figs))
    if data.metrics:
        body.append(_training_section(data.metrics, figs))
    doc = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_e(data.title)}</title><style>{CSS}</style></head><body>"
           + "".join(head + body) + "</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
