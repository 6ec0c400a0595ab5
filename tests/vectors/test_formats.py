"""llama.cpp control vectors (GGUF): export/import round trips bit for bit, the layer mapping
(direction.N = block N's output = block_input N+1), a file written as repeng writes it, and the
files llama.cpp refuses (tiny Llama preset, real files in tmp_path)."""
import dataclasses

import gguf
import numpy as np
import pytest
import torch

from tests.vectors.conftest import rand_rows
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.model.steering import Scope, SteeringSpec
from welfare_server.vectors.formats import (KEY_LAYER_COUNT, KEY_MODEL_HINT, GGUFError, direction_index,
                                            export_gguf, export_record, import_gguf, import_gguf_to_registry,
                                            layer_for_direction)
from welfare_server.vectors.registry import IncompatibleVector, steering_terms


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_layer_mapping():
    # direction.N is added to block N's output, the residual entering block N+1.
    assert direction_index(5, "block_output") == 5 and direction_index(5, "block_input") == 4
    assert layer_for_direction(4, "block_input", 8) == 5 and layer_for_direction(4, "block_output", 8) == 4
    for layer, point in [(0, "block_input"), (1, "block_input"), (0, "block_output")]:
        with pytest.raises(GGUFError):
            direction_index(layer, point)
    assert layer_for_direction(7, "block_output", 8) == 7
    with pytest.raises(GGUFError) as exc:  # the last block's output enters no block
        layer_for_direction(7, "block_input", 8)
    assert exc.value.field == "direction.7"


def test_export_import_round_trip_bit_for_bit(tmp_path):
    L, D = 6, 24
    rows = rand_rows(L, D, 1)
    rows[3, 0] = -0.0
    rows[4, 1] = torch.finfo(torch.float32).tiny / 8  # a subnormal survives too
    path = tmp_path / "v.gguf"
    with pytest.raises(GGUFError) as exc:  # block_input rows 0 and 1 have no llama.cpp form
        export_gguf(path, rows, model_hint="llama")
    assert exc.value.field == "layers" and not path.exists()
    written = export_gguf(path, rows, model_hint="llama", drop_unrepresentable=True)
    assert written == {l: l - 1 for l in range(2, L)}
    cv = import_gguf(path)
    assert list(cv.directions) == [1, 2, 3, 4] and cv.model_hint == "llama" and cv.layer_count == 4
    for layer, n in written.items():
        assert cv.directions[n].dtype == torch.float32 and torch.equal(bits(cv.directions[n]), bits(rows[layer]))
    assert cv.metadata["welfare_server.point"] == "block_input" and cv.hidden_size == D
    # block_output rows map one to one; a dict works as well as a tensor; the coefficient scales.
    out = export_gguf(path, {3: rows[3], 1: rows[1]}, model_hint="qwen2", point="block_output", coefficient=-2.0)
    assert out == {1: 1, 3: 3}
    cv = import_gguf(path)
    assert list(cv.directions) == [1, 3] and cv.model_hint == "qwen2"
    assert torch.equal(cv.directions[3], rows[3] * -2.0) and cv.metadata["welfare_server.coefficient"] == -2.0
    single = export_gguf(path, rows[2], 2, model_hint="llama")
    assert single == {2: 1} and torch.equal(import_gguf(path).directions[1], rows[2])


def _write_repeng_style(path, model_type, directions):
    """As repeng's ControlVector.export_gguf writes it (vgel/repeng repeng/extract.py)."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _repeng_hook_generate(model, prompt, directions, coeff, n):
    """Greedy HF generate with repeng's ControlModule behaviour: coeff * directions[l] added to
    the output of model.layers[l] at every position (one unpadded row)."""
    handles = []
    for layer, vec in directions.items():
        control = torch.tensor(coeff * vec).reshape(1, 1, -1)

        def hook(module, args, output, control=control):
            if isinstance(output, tuple):
                return (output[0] + control,) + tuple(output[1:])
            return output + control
        handles.append(model.model.layers[layer].register_forward_hook(hook))
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # exactly n tokens, as the engine's ignore_eos
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0, top_p=None, top_k=None,
                                 temperature=None)
    finally:
        model.generation_config.eos_token_id = saved
        for h in handles:
            h.remove()
    return out[0, len(prompt):].tolist()


PROMPT = [5, 812, 77, 9001, 31, 4420, 18, 260, 3]


def test_a_repeng_file_imports_and_steers_as_repeng_does(tmp_path, registry, tiny, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    g = np.random.default_rng(3)
    # repeng's default layers: range(-1, -num_layers, -1) normalised, i.e. L-1 down to 1.
    directions = {layer: g.standard_normal(D).astype(np.float32) * 3 for layer in range(L - 1, 0, -1)}
    path = tmp_path / "happy.gguf"
    _write_repeng_style(str(path), "llama", directions)
    cv = import_gguf(path)
    assert list(cv.directions) == list(range(1, L)) and cv.layer_count == L - 1 and cv.model_hint == "llama"
    for n, vec in directions.items():
        assert np.array_equal(cv.directions[n].numpy().view(np.int32), vec.view(np.int32))
    rid = import_gguf_to_registry(registry, path, tiny_identity)
    rec = registry.get(rid)
    m = rec.meta
    assert (m.point, m.layers, m.method, m.name) == ("block_output", list(range(1, L)), "gguf_import", "happy")
    assert m.model == tiny_identity and m.source["model_hint"] == "llama" and m.source["file"] == "happy.gguf"
    assert import_gguf_to_registry(registry, path, tiny_identity) == rid  # the same file, the same record
    # Steering here with the imported record equals repeng's own hooks on the HF model.
    eng = Engine(tiny, EngineConfig(max_batch_slots=1, max_context_len=64, max_bank_vectors=8))
    coeff = 1.5
    terms = steering_terms(registry, eng, rid, list(range(1, L)), coeff)
    ours = eng.generate([Request(prompt=PROMPT, steering=SteeringSpec(terms, Scope.ALL),
                                 sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])[0].token_ids
    assert ours == _repeng_hook_generate(tiny.model, PROMPT, directions, coeff, 10)
    plain = eng.generate([Request(prompt=PROMPT, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])
    assert ours != plain[0].token_ids
    # The same residual named at block_input, one layer up (all but the last block's output).
    as_input = steering_terms(registry, eng, rid, list(range(2, L)), coeff, point="block_input")
    assert [t.point for t in as_input] == ["block_input"] * (L - 2)
    only_out = steering_terms(registry, eng, rid, list(range(1, L - 1)), coeff)
    got = [eng.generate([Request(prompt=PROMPT, steering=SteeringSpec(t, Scope.ALL),
                                 sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])[0].token_ids
           for t in (as_input, only_out)]
    assert got[0] == got[1]


def test_registry_export_import_round_trip(tmp_path, registry, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    rows = rand_rows(L, D, 7)
    rid = registry.put(rows, model=tiny_identity, layers=list(range(L)), method="maze_classes", name="run",
                       concept="mold", classes=["mold", "gold", "path"])
    path = tmp_path / "mold.gguf"
    with pytest.raises(GGUFError):
        export_record(registry, rid, path)
    assert export_record(registry, rid, path, drop_unrepresentable=True) == {l: l - 1 for l in range(2, L)}
    cv = import_gguf(path)
    assert cv.model_hint == tiny_identity.family
    assert cv.metadata["welfare_server.record_id"] == rid
    assert cv.metadata["welfare_server.model_sha256"] == tiny_identity.weights_sha256
    # Back into the registry: the point the file was exported from, the same layers, the same bits.
    back = registry.get(import_gguf_to_registry(registry, path, tiny_identity))
    assert back.meta.point == "block_input" and back.meta.layers == list(range(2, L))
    assert back.meta.concept == "mold" and back.meta.source["provenance"]["record_id"] == rid
    assert torch.equal(bits(back.tensor), bits(rows[2:]))
    as_output = registry.get(import_gguf_to_registry(registry, path, tiny_identity, point="block_output"))
    assert as_output.meta.layers == list(range(1, L - 1)) and torch.equal(bits(as_output.tensor), bits(rows[2:]))
    assert as_output.id != back.id
    # Only chosen layers; a layer the record lacks is refused by name.
    assert export_record(registry, rid, path, layers=[3]) == {3: 2} and list(import_gguf(path).directions) == [2]
    with pytest.raises(GGUFError) as exc:
        export_record(registry, registry.put(rows[:1], model=tiny_identity, layers=[2], method="m", name="n"),
                      path, layers=[3])
    assert exc.value.field == "layers[0]"


def test_import_refuses_other_models(tmp_path, registry, tiny_identity):
    L, D = tiny_identity.num_layers, tiny_identity.hidden_size
    path = tmp_path / "v.gguf"
    export_gguf(path, rand_rows(1, D + 8, 1), [2], model_hint="llama")
    with pytest.raises(IncompatibleVector) as exc:
        import_gguf_to_registry(registry, path, tiny_identity)
    assert exc.value.field == "model.hidden_size" and "v.gguf" in str(exc.value)
    export_gguf(path, rand_rows(1, D, 1), [L], model_hint="llama", point="block_output")  # block L: no such block
    with pytest.raises(GGUFError) as exc:
        import_gguf_to_registry(registry, path, tiny_identity)
    assert exc.value.field == f"direction.{L}"
    # A file exported here names the weights it came from: others need allow_other_weights.
    other = dataclasses.replace(tiny_identity, name="untrained", weights_sha256="d" * 64)
    rid = registry.put(rand_rows(2, D, 2), model=other, layers=[2, 3], method="m", name="n")
    export_record(registry, rid, path)
    with pytest.raises(IncompatibleVector) as exc:
        import_gguf_to_registry(registry, path, tiny_identity)
    assert exc.value.field == "model.weights_sha256" and "'untrained'" in str(exc.value)
    got = registry.get(import_gguf_to_registry(registry, path, tiny_identity, allow_other_weights=True))
    assert got.meta.model == tiny_identity and got.meta.layers == [2, 3]
    assert registry.ids() and all(m.method != "gguf_import" or m.model == tiny_identity for m in registry.list())


def _write_raw(path, arch="controlvector", tensors=(), keys=()):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys:
        writer.add_string(key, value)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_import_refuses_what_llama_cpp_refuses(tmp_path):
    v = np.ones(8, dtype=np.float32)
    cases = {
        "llama": (dict(arch="llama", tensors=[("direction.1", v)]), "general.architecture"),
        "other tensor": (dict(tensors=[("direction.1", v), ("bias", v)]), "bias"),
        "zero": (dict(tensors=[("direction.0", v)]), "direction.0"),
        "f16": (dict(tensors=[("direction.1", v.astype(np.float16))]), "direction.1"),
        "2-D": (dict(tensors=[("direction.2", np.ones((2, 8), dtype=np.float32))]), "direction.2"),
        "sizes": (dict(tensors=[("direction.1", v), ("direction.2", np.ones(9, dtype=np.float32))]), "direction.2"),
        "empty": (dict(tensors=[]), "path"),
        "bad name": (dict(tensors=[("direction.x", v)]), "direction.x"),
    }
    for what, (kw, field) in cases.items():
        path = tmp_path / f"{what}.gguf"
        _write_raw(path, **kw)
        with pytest.raises(GGUFError) as exc:
            import_gguf(path)
        assert exc.value.field == field, (what, str(exc.value))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError) as exc:
        import_gguf(tmp_path / "junk.gguf")
    assert exc.value.field == "path"
    # Two tensors for one block are summed, as llama.cpp does.
    _write_raw(tmp_path / "twice.gguf", tensors=[("direction.1", v), ("direction.01", 2 * v)])
    assert torch.equal(import_gguf(tmp_path / "twice.gguf").directions[1], torch.full((8,), 3.0))


def test_export_refuses_bad_arguments(tmp_path):
    rows = rand_rows(2, 8, 1)
    path = tmp_path / "v.gguf"
    cases = [
        (dict(vectors=rows, layers=[2, 2]), "layers"),
        (dict(vectors=rows, layers=[2]), "layers"),
        (dict(vectors=rows, layers=[2, 3], point="middle"), "point"),
        (dict(vectors=rows, layers=[2, 3], coefficient=float("inf")), "coefficient"),
        (dict(vectors=rows, layers=[2, 3], model_hint=""), "model_hint"),
        (dict(vectors=torch.full((1, 8), float("nan")), layers=[2]), "vectors"),
        (dict(vectors={2: rows[0], 3: torch.ones(9)}), "vectors"),
        (dict(vectors=rows, layers=[2, 3], metadata={"x": [1]}), "metadata['x']"),
        (dict(vectors=rows, layers=[0, 1], drop_unrepresentable=True), "layers"),
    ]
    for kw, field in cases:
        args = dict(model_hint="llama") | kw
        with pytest.raises(GGUFError) as exc:
            export_gguf(path, **args)
        assert exc.value.field == field, (kw, str(exc.value))
        assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written left
    assert KEY_MODEL_HINT == "controlvector.model_hint" and KEY_LAYER_COUNT == "controlvector.layer_count"
