"""The vector registry: round trips, content ids, integrity checks, atomic writes, refusal of
mismatched vectors, and loading into the engine (tiny Llama preset, CPU fp32, real files)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.vectors.conftest import rand_rows
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.steering import Scope, SteeringSpec, SteeringTerm
from welfare_server.vectors.registry import (ID_HEX_CHARS, META_FILE, STALE_TMP_SECONDS, TENSOR_FILE,
                                             CorruptRecord, IncompatibleVector, RecordNotFound, RegistryError,
                                             VectorRegistry, check_compatible, load_into_engine, steering_term,
                                             steering_terms, unload_from_engine)
from welfare_server.vectors.types import ConceptVectors, LayerSelection


def put_rand(registry, identity, seed=0, **kw):
    L, D = identity.num_layers, identity.hidden_size
    args = dict(model=identity, layers=list(range(L)), method="contrast", name="test", concept="mold",
                classes=["mold", "gold"], counts=[5, 7], source={"seed": seed})
    args.update(kw)
    tensor = args.pop("tensor", None)
    if tensor is None:
        tensor = rand_rows(len(args["layers"]), D, seed)
    return registry.put(tensor, **args), tensor


# ------------------------------------------------------------------------------- round trips
def test_put_get_list_delete_round_trip(registry, tiny_identity):
    rid, tensor = put_rand(registry, tiny_identity, seed=1, best_layer=2)
    assert len(rid) == ID_HEX_CHARS
    rec = registry.get(rid)
    assert torch.equal(rec.tensor, tensor) and rec.tensor.dtype == torch.float32
    m = rec.meta
    assert (m.id, m.name, m.method, m.concept, m.point) == (rid, "test", "contrast", "mold", "block_input")
    assert m.model == tiny_identity and m.hidden_size == tiny_identity.hidden_size
    assert m.layers == list(range(tiny_identity.num_layers)) and m.classes == ["mold", "gold"] and m.counts == [5, 7]
    assert m.norms == [float(n) for n in tensor.double().norm(dim=1)] and m.best_layer == 2 and m.source == {"seed": 1}
    assert m.created.endswith("+00:00") and m.content_sha256.startswith(rid)
    assert torch.equal(rec.row(3), tensor[3])
    assert [x.id for x in registry.list()] == [rid]
    # A fresh registry on the same root reads the same record.
    assert torch.equal(VectorRegistry(registry.root).get(rid).tensor, tensor)
    registry.delete(rid)
    assert registry.list() == [] and registry.ids() == []
    with pytest.raises(RecordNotFound) as exc:
        registry.get(rid)
    assert exc.value.field == "record_id" and rid in str(exc.value)
    assert not [p for p in registry.root.iterdir()]  # nothing left behind, not even a trash dir


def test_single_layer_vector(registry, tiny_identity):
    v = rand_rows(1, tiny_identity.hidden_size, 3)[0]
    rid = registry.put(v, model=tiny_identity, layers=2, method="contrast", name="one")
    rec = registry.get(rid)
    assert rec.meta.layers == [2] and rec.tensor.shape == (1, tiny_identity.hidden_size)
    assert torch.equal(rec.row(2), v)
    with pytest.raises(RegistryError) as exc:
        rec.row(1)
    assert exc.value.field == "layer" and rid in str(exc.value)


def test_content_ids_are_idempotent_and_content_sensitive(registry, tiny_identity):
    rid, tensor = put_rand(registry, tiny_identity, seed=2)
    created = registry.get(rid).meta.created
    time.sleep(0.002)
    again, _ = put_rand(registry, tiny_identity, seed=2, tensor=tensor.clone(), source={"other": "description"})
    assert again == rid and registry.ids() == [rid]
    assert registry.get(rid).meta.created == created and registry.get(rid).meta.source == {"seed": 2}
    # One ulp in one element, or any identity-relevant field, is another vector.
    bumped = tensor.clone()
    bumped[1, 5] = torch.nextafter(bumped[1, 5], torch.tensor(float("inf")))
    other_model = dataclasses.replace(tiny_identity, weights_sha256="0" * 64)
    L = tiny_identity.num_layers
    variants = [dict(tensor=bumped), dict(name="other"), dict(method="rollouts"), dict(point="block_output"),
                dict(concept="gold"), dict(classes=["mold", "gold", "path"], counts=[]),
                dict(model=other_model), dict(tensor=tensor[:2].clone(), layers=[1, 2]),
                dict(tensor=tensor.flip(0).clone(), layers=list(range(L))[::-1])]
    ids = {rid}
    for kw in variants:
        vid, _ = put_rand(registry, tiny_identity, seed=2, **({"tensor": tensor.clone()} | kw))
        assert vid not in ids, kw
        ids.add(vid)
    assert sorted(ids) == registry.ids()


def test_refuses_bad_arguments(registry, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    ok = dict(model=tiny_identity, layers=[0, 1], method="contrast", name="n")
    cases = [
        (dict(tensor=torch.zeros(2, D + 1)), "tensor"),
        (dict(tensor=torch.zeros(3, D)), "tensor"),
        (dict(tensor=torch.zeros(2, D, dtype=torch.int32)), "tensor"),
        (dict(tensor=torch.full((2, D), float("nan"))), "tensor"),
        (dict(layers=[0, L]), "layers[1]"),
        (dict(layers=[1, 1]), "layers"),
        (dict(layers=[0, True]), "layers[1]"),
        (dict(point="middle"), "point"),
        (dict(name=""), "name"),
        (dict(method=3), "method"),
        (dict(classes=["a"], counts=[1, 2]), "counts"),
        (dict(counts=[-1]), "counts[0]"),
        (dict(source={"x": float("nan")}), "source"),
        (dict(source={"x": object()}), "source"),
        (dict(best_layer=L), "best_layer"),
        (dict(model="tiny"), "model"),
    ]
    for change, field in cases:
        args = ok | change
        tensor = args.pop("tensor", torch.zeros(2, D))
        with pytest.raises(RegistryError) as exc:
            registry.put(tensor, **args)
        assert exc.value.field == field, (change, str(exc.value))
    assert registry.ids() == []


def test_resolve_prefixes(registry, tiny_identity):
    rid, _ = put_rand(registry, tiny_identity, seed=4)
    assert registry.resolve(rid[:6]) == rid and registry.get(rid[:6].upper()).meta.id == rid
    assert rid[:4] in registry and "ffff0000ffff0000" not in registry
    for bad in ["abc", "xyz123", 123, rid + "0"]:
        with pytest.raises(RegistryError) as exc:
            registry.resolve(bad)
        assert exc.value.field == "record_id"
    # Two ids sharing a prefix: the prefix is refused as ambiguous, naming both.
    twin = rid[:4] + ("0" if rid[4] != "0" else "1") * (ID_HEX_CHARS - 4)
    shutil.copytree(registry.root / rid, registry.root / twin)
    with pytest.raises(RecordNotFound) as exc:
        registry.resolve(rid[:4])
    assert "ambiguous" in str(exc.value) and rid in str(exc.value) and twin in str(exc.value)
    with pytest.raises(CorruptRecord):  # the copy's content does not hash to its name
        registry.get(twin)


def test_list_filters_and_order(registry, tiny_identity):
    other = dataclasses.replace(tiny_identity, weights_sha256="1" * 64)
    a, _ = put_rand(registry, tiny_identity, seed=10, name="run1", method="contrast")
    b, _ = put_rand(registry, other, seed=11, name="run1", method="maze_classes")
    c, _ = put_rand(registry, tiny_identity, seed=12, name="run2", method="maze_classes", concept="gold")
    assert [m.id for m in registry.list()] == [a, b, c]  # oldest first
    assert [m.id for m in registry.list(model_sha256=tiny_identity.weights_sha256)] == [a, c]
    assert [m.id for m in registry.list(name="run1")] == [a, b]
    assert [m.id for m in registry.list(method="maze_classes", name="run2")] == [c]
    assert [m.id for m in registry.list(concept="gold")] == [c]
    assert registry.list(name="none") == []


def test_put_concept_vectors(registry, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    g = torch.Generator().manual_seed(5)
    sel = {c: LayerSelection(auroc=[0.5 + 0.1 * i for i in range(L)], cohens_d=[0.1 * i for i in range(L)],
                             overlap=[1.0 - 0.2 * i for i in range(L)], best_layer=k)
           for k, c in enumerate(["mold", "gold"], start=1)}
    cv = ConceptVectors(model=tiny_identity, classes=("mold", "gold", "path"), means=torch.randn(L, 3, D, generator=g),
                        counts=[10, 11, 12], method="maze_classes", selection=sel, source={"seed": 7, "size": 9})
    ids = registry.put_concept_vectors(cv)
    assert set(ids) == {"mold", "gold"} and ids["mold"] != ids["gold"]
    for cls_name, rid in ids.items():
        rec = registry.get(rid)
        assert torch.equal(rec.tensor, cv.vector(cls_name))
        m = rec.meta
        assert (m.concept, m.method, m.name, m.point) == (cls_name, "maze_classes", "maze_classes", "block_input")
        assert m.classes == ["mold", "gold", "path"] and m.counts == [10, 11, 12] and m.layers == list(range(L))
        assert m.selection == sel and m.best_layer == sel[cls_name].best_layer and m.source == cv.source
    assert registry.put_concept_vectors(cv) == ids  # idempotent
    assert registry.put_concept_vectors(cv, classes=["path"], name="x")["path"] not in ids.values()
    with pytest.raises(RegistryError) as exc:
        registry.put_concept_vectors(cv, classes=["mold", "lava"])
    assert exc.value.field == "classes[1]"


# ------------------------------------------------------------------------------- integrity
def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _corruptions():
    def tensor_byte(d):  # the last byte is in the tensor data, after the header
        _flip_byte(d / TENSOR_FILE, (d / TENSOR_FILE).stat().st_size - 1)

    def header_byte(d):  # a byte inside the JSON header's record id
        data = (d / TENSOR_FILE).read_bytes()
        _flip_byte(d / TENSOR_FILE, data.index(b'"record_id":"' + d.name.encode()) + 16)

    def edit_meta(d, key, value):
        data = json.loads((d / META_FILE).read_text())
        data[key] = value
        (d / META_FILE).write_text(json.dumps(data))

    return {
        "tensor byte": (tensor_byte, TENSOR_FILE),
        "header byte": (header_byte, TENSOR_FILE),
        "truncated tensor file": (lambda d: (d / TENSOR_FILE).write_bytes((d / TENSOR_FILE).read_bytes()[:-9]),
                                  TENSOR_FILE),
        "meta counts edited": (lambda d: edit_meta(d, "counts", [6, 7]), META_FILE),
        "meta layers edited": (lambda d: edit_meta(d, "layers", [3, 2, 1, 0]), META_FILE),
        "meta reformatted only": (lambda d: (d / META_FILE).write_text(
            json.dumps(json.loads((d / META_FILE).read_text()), indent=4) + "\n"), None),
        "meta not json": (lambda d: (d / META_FILE).write_text("{"), META_FILE),
        "tensor file deleted": (lambda d: (d / TENSOR_FILE).unlink(), TENSOR_FILE),
        "meta deleted": (lambda d: (d / META_FILE).unlink(), META_FILE),
    }


@pytest.mark.parametrize("what", list(_corruptions()))
def test_corruption_is_refused_with_a_named_error(registry, tiny_identity, what):
    damage, field = _corruptions()[what]
    rid, tensor = put_rand(registry, tiny_identity, seed=20)
    damage(registry.root / rid)
    if field is None:  # whitespace is not content: the record still loads
        assert torch.equal(registry.get(rid).tensor, tensor)
        return
    with pytest.raises(CorruptRecord) as exc:
        registry.get(rid)
    assert exc.value.record_id == rid and exc.value.field == field and rid in str(exc.value)
    assert field in str(exc.value)
    assert list(registry.verify()) == [rid]
    if field == META_FILE or what in ("header byte", "tensor file deleted"):
        with pytest.raises(CorruptRecord):
            registry.list()
        assert registry.list(skip_corrupt=True) == []
    # Putting the same content again replaces the corrupt copy atomically.
    again, _ = put_rand(registry, tiny_identity, seed=20, tensor=tensor.clone())
    assert again == rid and torch.equal(registry.get(rid).tensor, tensor) and registry.verify() == {}
    assert sorted(p.name for p in registry.root.iterdir()) == [rid]


def test_a_record_deleted_while_read_is_not_found_not_corrupt(registry, tiny_identity, monkeypatch):
    rid, _ = put_rand(registry, tiny_identity, seed=22)
    keep, header = put_rand(registry, tiny_identity, seed=23)[0], registry._header

    def delete_first(r):
        if r == rid:
            registry.delete(rid)  # another process deletes it between listing and reading
        return header(r)
    monkeypatch.setattr(registry, "_header", delete_first)
    assert [m.id for m in registry.list()] == [keep]
    rid, _ = put_rand(registry, tiny_identity, seed=22)
    with pytest.raises(RecordNotFound):
        registry.get(rid)


def test_delete_removes_a_corrupt_record(registry, tiny_identity):
    rid, _ = put_rand(registry, tiny_identity, seed=21)
    (registry.root / rid / META_FILE).unlink()
    registry.delete(rid[:8])
    assert registry.ids() == []


# ------------------------------------------------------------------------------- atomicity
_CRASHING_WRITER = r"""
import os, sys, torch
from welfare_server.vectors import registry as reg
from welfare_server.vectors.types import ModelIdentity
ident = ModelIdentity(name="m", family="llama", hidden_size=8, num_layers=2, weights_sha256="ab" * 32)
r = reg.VectorRegistry(sys.argv[1])
def crash(*args, **kwargs):
    os._exit(17)  # dies between writing the temporary directory and renaming it into place
reg.os.rename = crash
r.put(torch.ones(2, 8), model=ident, layers=[0, 1], method="contrast", name="crash")
"""


def test_a_crashed_writer_leaves_no_visible_record_and_is_cleaned(tmp_path):
    root = tmp_path / "vectors"
    proc = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(root)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 17, proc.stderr
    leftovers = [p for p in root.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert sorted(p.name for p in leftovers[0].iterdir()) == [META_FILE, TENSOR_FILE]  # whole, but not renamed
    # A temporary directory of a live writer (this process) is left alone, however it looks.
    live = root / f".tmp-{os.getpid()}-inflight"
    live.mkdir()
    registry = VectorRegistry(root)  # opening cleans the dead writer's directory
    assert registry.ids() == [] and registry.list() == []
    assert sorted(p.name for p in root.iterdir()) == [live.name]
    # One whose writer cannot be checked goes once it is old.
    old = root / ".tmp-elsewhere-x"
    old.mkdir()
    VectorRegistry(root)
    assert old.exists()
    past = time.time() - STALE_TMP_SECONDS - 10
    os.utime(old, (past, past))
    assert VectorRegistry(root).clean_leftovers() == [] and not old.exists()


def test_concurrent_writers_of_the_same_content_agree(tmp_path, tiny_identity):
    a, b = VectorRegistry(tmp_path / "v"), VectorRegistry(tmp_path / "v")
    rid, tensor = put_rand(a, tiny_identity, seed=30)
    meta, t = b._build(tensor, model=tiny_identity, layers=list(range(tiny_identity.num_layers)), method="contrast",
                       name="test", point="block_input", concept="mold", classes=["mold", "gold"], counts=[5, 7],
                       selection={}, best_layer=None, source={})
    assert meta.id == rid
    b._write(meta, t)  # the rename finds the other writer's record in place: theirs is kept
    assert a.ids() == [rid] and a.get(rid).meta.source == {"seed": 30}
    assert [p.name for p in (tmp_path / "v").iterdir()] == [rid]


# ------------------------------------------------------------------------------- compatibility
def test_check_compatible_refuses_other_models(registry, tiny_identity):
    rid, _ = put_rand(registry, tiny_identity, seed=40)
    rec = registry.get(rid)
    check_compatible(rec, tiny_identity)
    check_compatible(rec.meta, tiny_identity)
    wider = dataclasses.replace(tiny_identity, name="wide-model", hidden_size=tiny_identity.hidden_size * 2)
    deeper = dataclasses.replace(tiny_identity, name="deep-model", num_layers=tiny_identity.num_layers + 1)
    trained = dataclasses.replace(tiny_identity, name="trained-model", weights_sha256="f" * 64)
    for other, field in [(wider, "model.hidden_size"), (deeper, "model.num_layers"), (trained, "model.weights_sha256")]:
        for allow in (False, True):
            if field == "model.weights_sha256" and allow:
                check_compatible(rec, other, allow_other_weights=True)  # explicit: allowed
                continue
            with pytest.raises(IncompatibleVector) as exc:
                check_compatible(rec, other, allow_other_weights=allow)
            msg = str(exc.value)
            assert exc.value.field == field and exc.value.record_id == rid
            assert repr(tiny_identity.name) in msg and repr(other.name) in msg and rid in msg
    with pytest.raises(RegistryError):
        check_compatible(rec, trained, allow_other_weights=1)


# ------------------------------------------------------------------------------- engine
def _greedy(engine, prompt, spec, n=10):
    out = engine.generate([Request(prompt=prompt, steering=spec,
                                   sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))])
    return out[0].token_ids


def _engine(tiny):
    return Engine(tiny, EngineConfig(max_batch_slots=2, max_context_len=64, max_bank_vectors=8))


PROMPT = [5, 812, 77, 9001, 31, 4420, 18, 260, 3]


def test_load_into_engine_steers_as_the_inline_tensor(registry, tiny, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    rid, tensor = put_rand(registry, tiny_identity, seed=50, tensor=rand_rows(L, D, 50, scale=4.0))
    eng = _engine(tiny)
    free = eng.bank.num_free
    idx = load_into_engine(registry, eng, rid, 2)
    assert torch.equal(eng.bank.tensor[idx], tensor[2])
    assert load_into_engine(registry, eng, rid[:6], 2) == idx and eng.bank.num_free == free - 1  # cached
    for scope in (Scope.ALL, Scope.GENERATED):
        by_id = _greedy(eng, PROMPT, SteeringSpec([SteeringTerm(idx, [2], 3.0)], scope))
        inline = _greedy(eng, PROMPT, SteeringSpec([SteeringTerm(tensor[2].clone(), [2], 3.0)], scope))
        assert by_id == inline
    assert by_id != _greedy(eng, PROMPT, None)  # the steering is strong enough to matter
    # Several layers: one term per layer, each with its own row; and the single-layer helper.
    terms = steering_terms(registry, eng, rid, [1, -1], 2.5, SteerMode.ADD_RENORM, identity=tiny_identity)
    assert [t.layers for t in terms] == [[1], [L - 1]] and all(isinstance(t.vector, int) for t in terms)
    inline = [SteeringTerm(tensor[l].clone(), [l], 2.5, SteerMode.ADD_RENORM) for l in (1, L - 1)]
    assert _greedy(eng, PROMPT, SteeringSpec(terms, Scope.ALL)) == _greedy(eng, PROMPT, SteeringSpec(inline, Scope.ALL))
    assert len(steering_terms(registry, eng, rid, [1, 1 - L])) == 1  # one layer named twice
    one = steering_term(registry, eng, rid, 2, 3.0)
    assert one.vector == idx and one.layers == [2] and one.point == "block_input"
    # The residual entering block l+1 is block l's output: a block_input record serves both.
    out_term = steering_term(registry, eng, rid, 1, 3.0, point="block_output")
    assert out_term.vector == idx and out_term.point == "block_output"
    assert _greedy(eng, PROMPT, SteeringSpec([out_term], Scope.ALL)) == \
        _greedy(eng, PROMPT, SteeringSpec([SteeringTerm(tensor[2].clone(), [1], 3.0, point="block_output")], Scope.ALL))
    with pytest.raises(RegistryError) as exc:  # block L-1's output is no row of a block_input record
        steering_term(registry, eng, rid, L - 1, 1.0, point="block_output")
    assert exc.value.field == "layers[0]"
    with pytest.raises(RegistryError) as exc:
        load_into_engine(registry, eng, rid, L)
    assert exc.value.field == "layer"


def test_engine_cache_survives_removal_and_unload(registry, tiny, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    rid, tensor = put_rand(registry, tiny_identity, seed=51)
    eng = _engine(tiny)
    idx = load_into_engine(registry, eng, rid, 1)
    eng.remove_vector(idx)
    other = eng.register_vector(torch.ones(D))  # takes the freed slot
    again = load_into_engine(registry, eng, rid, 1)
    assert again != other and torch.equal(eng.bank.tensor[again], tensor[1])
    assert torch.equal(eng.bank.tensor[other], torch.ones(D))
    # Another engine has its own bank: the cache is per engine.
    eng2 = _engine(tiny)
    assert eng2.bank.is_live(load_into_engine(registry, eng2, rid, 1))
    free = eng.bank.num_free
    assert unload_from_engine(eng, registry.get(rid)) == 1 and eng.bank.num_free == free + 1
    assert eng.bank.is_live(other)


def test_engine_refuses_vectors_of_other_models(registry, tiny, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    trained = dataclasses.replace(tiny_identity, name="trained", weights_sha256="e" * 64)
    rid, tensor = put_rand(registry, trained, seed=52)
    eng = _engine(tiny)
    free = eng.bank.num_free
    with pytest.raises(IncompatibleVector) as exc:
        load_into_engine(registry, eng, rid, 1)  # identity computed from the engine's model
    assert exc.value.field == "model.weights_sha256" and "'trained'" in str(exc.value)
    with pytest.raises(IncompatibleVector):
        steering_terms(registry, eng, rid, [1])
    assert eng.bank.num_free == free  # a refusal places nothing
    idx = load_into_engine(registry, eng, rid, 1, allow_other_weights=True)
    assert torch.equal(eng.bank.tensor[idx], tensor[1])
    wide = dataclasses.replace(tiny_identity, hidden_size=2 * D)
    wid = registry.put(torch.ones(1, 2 * D), model=wide, layers=[0], method="contrast", name="wide")
    with pytest.raises(IncompatibleVector) as exc:
        load_into_engine(registry, eng, wid, 0, allow_other_weights=True)
    assert exc.value.field == "model.hidden_size"
    with pytest.raises(IncompatibleVector) as exc:
        load_into_engine(registry, eng, rid, 1, identity=wide)
    assert exc.value.field == "identity"
