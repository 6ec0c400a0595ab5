"""`welfare-server vectors extract|analyse|list|export|import` and `welfare-server report`: the
concept-vector pipeline from the command line, on a model loaded here (no server needed). Sizes
default to what runs on 2 CPU cores in minutes; `extract --paper` uses the paper's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from welfare_server import config_cli


def _registry(args):
    from welfare_server.vectors.registry import VectorRegistry

    return VectorRegistry(args.registry_root)


def _engine(args, loaded=None):
    from welfare_server.model.engine import Engine, EngineConfig
    from welfare_server.model.loading import RuntimeConfig, load_model

    loaded = loaded or load_model(args.model, config_cli.build(RuntimeConfig, args))
    return Engine(loaded, EngineConfig(max_batch_slots=args.slots, max_context_len=args.max_context_len))


def _bar(description: str):
    """on_progress(stage, done, total) drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars = {}

    def progress(stage, done, total):
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{description}: {stage}", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return progress


def _extract(args) -> int:
    from welfare_server.maze import MazeConfig, MazeTokenTable
    from welfare_server.vectors import model_identity
    from welfare_server.vectors.extract import PAPER_EXTRACTION, ExtractionConfig, contrast_vectors, maze_vectors

    config = config_cli.build(ExtractionConfig, args)
    if args.paper:
        config = dataclasses.replace(PAPER_EXTRACTION, seed=config.seed)
    maze = config_cli.build(MazeConfig, args)
    registry = _registry(args)
    engine = _engine(args)
    identity = model_identity(engine.loaded)
    if args.contrast:
        sets = json.loads(Path(args.contrast).read_text())
        cv = contrast_vectors(engine, identity, sets["positive"], sets["negative"], config, on_progress=_bar("extract"))
        ids = registry.put_concept_vectors(cv, ("positive",), name=args.name or "contrast")
    else:
        table = MazeTokenTable.from_tokenizer(engine.tokenizer, maze)
        cv = maze_vectors(engine, identity, table, config, on_progress=_bar("extract"))
        ids = registry.put_concept_vectors(cv, ("mold", "gold"), name=args.name or "welfare")
    out = Path(args.out) if args.out else (registry.root.parent / "extractions" /
                                           f"{cv.method}-{identity.weights_sha256[:12]}-seed{config.seed}.safetensors")
    cv.save(out)
    print(f"extraction of {identity.name}: classes {list(cv.classes)} with {cv.counts} training examples")
    for name, selection in cv.selection.items():
        print(f"  v_{name}: l* = {selection.best_layer} (AUROC there {selection.auroc[selection.best_layer]:.3f})")
    print(f"registry records: {ids}")
    print(f"extraction saved to {out}")
    return 0


def _analyse(args) -> int:
    from welfare_server.vectors.analysis import AnalysisOptions, analyse
    from welfare_server.vectors.types import ConceptVectors

    cv = ConceptVectors.load(args.extraction)
    baseline = ConceptVectors.load(args.baseline) if args.baseline else None
    options = config_cli.build(AnalysisOptions, args)
    engine = None if args.no_model else _engine(args)
    result = analyse(cv, engine, options, baseline=baseline, on_progress=lambda m: print(f"... {m}", file=sys.stderr))
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
        print(f"every number in {args.json}")
    return 0


def _remote(args) -> bool:
    """--address given: the command asks that running server instead of the local registry."""
    return getattr(args, "address", None) is not None


def _list(args) -> int:
    if _remote(args):
        from welfare_server.client_commands import run_vectors_list

        return run_vectors_list(args)
    registry = _registry(args)
    for meta in registry.list(name=args.name, method=args.method):
        print(f"{meta.id}  {meta.name:12} {meta.method:14} {meta.concept:8} layers {len(meta.layers):3}  "
              f"{meta.model.name} ({meta.model.weights_sha256[:12]})  {meta.created}")
    return 0


def _export(args) -> int:
    from welfare_server.vectors.formats import export_record

    if _remote(args):
        from welfare_server.client_commands import run_vectors_export

        return run_vectors_export(args)
    layers = args.layers or None
    mapping = export_record(_registry(args), args.id, args.path, layers=layers, coefficient=args.scale,
                            drop_unrepresentable=layers is None)
    print(f"wrote {args.path}: our layers -> llama.cpp direction.N {mapping}")
    return 0


def _import(args) -> int:
    if _remote(args):
        from welfare_server.client_commands import run_vectors_import

        return run_vectors_import(args)
    from welfare_server.model.loading import RuntimeConfig, load_model
    from welfare_server.vectors import model_identity
    from welfare_server.vectors.formats import import_gguf_to_registry

    identity = model_identity(load_model(args.model, config_cli.build(RuntimeConfig, args)))
    record = import_gguf_to_registry(_registry(args), args.path, identity, name=args.name)
    print(f"imported {args.path} as record {record}")
    return 0


def _delete(args) -> int:
    if _remote(args):
        from welfare_server.client_commands import run_vectors_delete

        return run_vectors_delete(args)
    from welfare_server.vectors.registry import RecordNotFound

    try:
        _registry(args).delete(args.id)
    except RecordNotFound:
        print(f"record {args.id}: not found")
        return 1
    print(f"record {args.id}: deleted")
    return 0


def _report(args) -> int:
    from welfare_server.vectors.analysis import AnalysisOptions
    from welfare_server.vectors.dose import DoseConfig
    from welfare_server.vectors.report import ReportOptions, make_report
    from welfare_server.vectors.types import ConceptVectors

    cv = ConceptVectors.load(args.extraction)
    baseline = ConceptVectors.load(args.baseline) if args.baseline else None
    options = ReportOptions(analysis=config_cli.build(AnalysisOptions, args),
                            dose=None if args.no_dose else config_cli.build(DoseConfig, args))
    engine = _engine(args)
    make_report(args.out, cv, engine, options, baseline=baseline, metrics=args.metrics,
                notes=[f"extraction: {args.extraction}"] + ([f"baseline: {args.baseline}"] if args.baseline else []),
                on_progress=lambda m: print(f"... {m}", file=sys.stderr))
    print(f"report written to {args.out}")
    return 0


def _model_options(parser) -> None:
    from welfare_server.model.loading import BUNDLED_NAME, RuntimeConfig

    parser.add_argument("--model", default=BUNDLED_NAME,
                        help="the bundled model's name, a tiny preset, or a local Hugging Face directory")
    parser.add_argument("--slots", type=int, default=16, help="engine cache slots (prompts prefilled at once)")
    parser.add_argument("--max-context-len", type=int, default=2048, help="engine context (a trajectory must fit)")
    config_cli.add_options(parser.add_argument_group("device and precision (RuntimeConfig)"), RuntimeConfig,
                           only=("device", "dtype"))


def _registry_option(parser, remote: bool = True) -> None:
    parser.add_argument("--registry-root", default=None, help="the vector registry (default: the cache's vectors/)")
    if not remote:
        return
    parser.add_argument("--address", default=None, help="a running server's host:port: use its registry instead")
    parser.add_argument("--token", default=None, help="bearer token for --address (default: $WELFARE_SERVER_TOKEN)")


def add_commands(commands) -> None:
    """Register `vectors ...` and `report` on the welfare-server parser."""
    from welfare_server.maze import MazeConfig
    from welfare_server.vectors.analysis import AnalysisOptions
    from welfare_server.vectors.dose import DoseConfig
    from welfare_server.vectors.extract import ExtractionConfig

    fmt = argparse.ArgumentDefaultsHelpFormatter
    vectors = commands.add_parser("vectors", help="concept vectors: extract, analyse, list, export, import, delete (--address: a running server's)")
    sub = vectors.add_subparsers(dest="vectors_command", required=True)
    extract = sub.add_parser("extract", formatter_class=fmt,
                             help="v_Mold and v_Gold from the paper's synthetic trajectories (or --contrast chats)")
    _model_options(extract)
    _registry_option(extract, remote=False)
    extract.add_argument("--paper", action="store_true", help="the paper's sizes (5000 trajectories per class)")
    extract.add_argument("--contrast", help='a JSON file {"positive": [chats], "negative": [chats]} instead of the maze')
    extract.add_argument("--name", help="registry name of the records (default: welfare, or contrast)")
    extract.add_argument("--out", help="where to save the whole extraction (default: next to the registry)")
    config_cli.add_options(extract.add_argument_group("sizes and seeds (ExtractionConfig)"), ExtractionConfig)
    config_cli.add_options(extract.add_argument_group("maze rules (MazeConfig)"), MazeConfig, prefix="maze-",
                           exclude=("autoreset", "max_state_bytes", "wind_prob"))
    extract.set_defaults(run=_extract)

    analyse = sub.add_parser("analyse", formatter_class=fmt, help="cosines with their nulls, logit lens, emotions")
    analyse.add_argument("extraction", help="a saved extraction (vectors extract's output)")
    analyse.add_argument("--baseline", help="another model's extraction to compare with (e.g. the untrained one)")
    analyse.add_argument("--no-model", action="store_true", help="only what needs no model (cosines, selection)")
    analyse.add_argument("--json", help="write every number to this file")
    _model_options(analyse)
    config_cli.add_options(analyse.add_argument_group("analyses (AnalysisOptions)"), AnalysisOptions,
                           only=("layer", "lens_k", "emotions", "allow_other_weights"))
    analyse.set_defaults(run=_analyse)

    listing = sub.add_parser("list", help="the registry's records")
    _registry_option(listing)
    listing.add_argument("--name")
    listing.add_argument("--method")
    listing.set_defaults(run=_list)

    export = sub.add_parser("export", help="a record as a llama.cpp control vector (GGUF)")
    _registry_option(export)
    export.add_argument("id")
    export.add_argument("path")
    export.add_argument("--scale", type=float, default=1.0, help="multiply every row by this")
    export.add_argument("--layers", type=int, nargs="+", default=None,
                        help="the record's layers to write (default: every row llama.cpp can steer)")
    export.set_defaults(run=_export)

    delete = sub.add_parser("delete", help="remove a record from the registry")
    _registry_option(delete)
    delete.add_argument("id")
    delete.set_defaults(run=_delete)

    importing = sub.add_parser("import", help="a llama.cpp / repeng control vector (GGUF) into the registry")
    _registry_option(importing)
    _model_options(importing)
    importing.add_argument("path")
    importing.add_argument("--name", default="gguf")
    importing.set_defaults(run=_import)

    report = commands.add_parser("report", formatter_class=fmt,
                                 help="one self-contained HTML report of an extraction (figures and their numbers)")
    report.add_argument("extraction")
    report.add_argument("--out", default="report.html")
    report.add_argument("--baseline", help="another extraction to compare with (e.g. the untrained model's)")
    report.add_argument("--metrics", help="a training run's metrics JSONL: its curve goes in the report")
    report.add_argument("--no-dose", action="store_true", help="leave out the dose-response (the slow part)")
    _model_options(report)
    config_cli.add_options(report.add_argument_group("analyses (AnalysisOptions)"), AnalysisOptions,
                           only=("layer", "lens_k", "emotions", "allow_other_weights"))
    config_cli.add_options(report.add_argument_group("dose-response (DoseConfig)"), DoseConfig,
                           only=("max_new_tokens", "layer", "seed"), prefix="dose-")
    report.set_defaults(run=_report)
