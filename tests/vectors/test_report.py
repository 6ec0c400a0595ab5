"""The HTML report: built on the tiny model, self-contained, every figure inline and every table
present; the parts that need no engine; the training curve from a metrics JSONL."""
import json
import re

import pytest
import torch

from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.vectors.analysis import AnalysisOptions, analyse
from welfare_server.vectors.dose import DoseConfig
from welfare_server.vectors.report import (ReportData, ReportOptions, build_report, load_metrics, make_report,
                                           write_report)
from welfare_server.vectors.types import ConceptVectors, LayerSelection

CLASSES = ("mold", "gold", "path")
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def concept_vectors(engine, identity, permutations=5, per_class=5, seed=0) -> ConceptVectors:
    """Concept vectors of random token prompts through Engine.capture, with label permutations."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * per_class
    prompts = [torch.randint(100, 5000, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    labels = torch.arange(N) % 3
    table = torch.stack([labels] + [labels[torch.randperm(N, generator=g)] for _ in range(permutations)], dim=1)
    means = engine.capture(prompts, table.tolist(), 3).means  # [L, J, C, D]
    L = means.shape[0]
    selection = {c: LayerSelection([0.5 + 0.1 * l for l in range(L)], [0.2 * l for l in range(L)],
                                   [1.0 - 0.2 * l for l in range(L)], best_layer=2) for c in CLASSES}
    return ConceptVectors(identity, CLASSES, means[:, 0].contiguous(), [per_class] * 3, "test",
                          permuted_means=means[:, 1:].permute(1, 0, 2, 3).contiguous(), selection=selection)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny, EngineConfig(max_batch_slots=16, max_context_len=256))


def self_contained(doc: str) -> None:
    assert doc.startswith("<!DOCTYPE html>") and doc.rstrip().endswith("</html>")
    assert "<script" not in doc and "<link" not in doc
    assert not re.search(r'(src|href)="(?!data:)', doc)  # no external asset of any kind
    assert "http://" not in doc and "https://" not in doc


def test_report_on_the_tiny_model_has_every_figure_and_table(engine, tiny_identity, tmp_path):
    cv = concept_vectors(engine, tiny_identity)
    baseline = concept_vectors(engine, tiny_identity, seed=1)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "return_mean": -1.0 + 0.1 * s, "gold_per_episode": 0.1 * s,
                                             "mold_per_episode": 2.0 - 0.1 * s, "loss": 0.5}) for s in range(12)) + "\n")
    options = ReportOptions(analysis=AnalysisOptions(lens_k=5),
                            dose=DoseConfig(alphas=(-4.0, 0.0, 4.0), control_seeds=(0,),
                                            prompts=("How's it going?", "How are you feeling right now?"),
                                            max_new_tokens=4),
                            title="Tiny <report>")
    steps = []
    path = tmp_path / "out" / "report.html"
    data = make_report(path, cv, engine, options, baseline=baseline, metrics=metrics, notes=["made in a test"],
                       on_progress=steps.append)
    assert steps[:3] == ["cosines", "logit lens", "emotion vectors"] and "dose-response" in steps
    doc = path.read_text(encoding="utf-8")
    self_contained(doc)
    images = IMG.findall(doc)
    # cosines, selection, comparison, emotion scatter, emotion PC per layer, dose X, training curve
    assert len(images) == 7
    for b64 in images:
        import base64

        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    tables = re.findall(r'<table class="numbers" id="([a-z0-9-]+)"', doc)
    assert tables == ["table-cosines", "table-selection", "table-comparison", "table-lens-0", "table-lens-1",
                      "table-lens-2", "table-lens-3", "table-emotions", "table-emotion-layers", "table-dose",
                      "table-dose-samples", "table-training"]
    assert "Tiny &lt;report&gt;" in doc and "<report>" not in doc  # text is escaped
    assert "made in a test" in doc
    # The numbers behind the plots are in the tables.
    assert f"{data.analysis.cosines.observed[0]:+.3f}" in doc
    assert "return_mean" in doc and "gold_per_episode" in doc and "loss" not in doc.split("table-training")[1][:2000]
    assert data.dose is not None and data.dose.judge_range == (1.0, 9.0)
    assert json.dumps(data.to_json())  # every number is JSON-serialisable
    # Written again from the same data: the same figures (only the timestamp may differ).
    again = write_report(tmp_path / "again.html", data)
    assert IMG.findall(again.read_text(encoding="utf-8")) == images


def test_report_without_an_engine(tiny_identity, tmp_path):
    g = torch.Generator().manual_seed(2)
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    cv = ConceptVectors(tiny_identity, CLASSES, torch.randn(L, 3, D, generator=g), [3, 3, 3], "test",
                        permuted_means=torch.randn(4, L, 3, D, generator=g))
    data = build_report(cv)
    assert data.dose is None and data.analysis.lenses == [] and data.analysis.alignment is None
    assert "middle layer" in data.analysis.layer_note
    doc = write_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    self_contained(doc)
    assert len(IMG.findall(doc)) == 1  # cosines only: no selection figures, no comparison, no engine
    assert re.findall(r'<table class="numbers" id="([a-z0-9-]+)"', doc) == ["table-cosines"]
    assert "carries no layer-selection figures" in doc


def test_report_from_analysis_pieces(tiny_identity, tmp_path):
    g = torch.Generator().manual_seed(3)
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    cv = ConceptVectors(tiny_identity, CLASSES, torch.randn(L, 3, D, generator=g), [3, 3, 3], "test")
    records = [{"iteration": i, "episode_return": float(i)} for i in range(500)]
    data = ReportData(analysis=analyse(cv), metrics=records)
    doc = write_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    assert len(IMG.findall(doc)) == 2  # cosines, training curve
    training = doc.split('id="table-training"')[1].split("</table>")[0]
    assert training.count("<tr>") == 1 + 167  # header + every 3rd record: at most MAX_METRIC_ROWS
    assert "<td>498</td>" in training  # steps shown as given


def test_load_metrics_and_options(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "return": 2.0}\n\n{"step": 2, "return": 3.0}\n')
    assert load_metrics(path) == [{"step": 1, "return": 2.0}, {"step": 2, "return": 3.0}]
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_metrics(path)
    with pytest.raises(ValueError, match="dpi"):
        ReportOptions(dpi=5)
    with pytest.raises(ValueError, match="ReportOptions.dose"):
        ReportOptions(dose={"alphas": [1]})
