"""llama.cpp control vectors (GGUF): export our vectors so they steer llama.cpp, import theirs (and
repeng's) so they steer here.

The format, as llama.cpp reads it and repeng writes it:

- general.architecture = "controlvector"; "controlvector.model_hint" (a string: repeng writes the
  HF config.model_type) and "controlvector.layer_count" (uint32: repeng writes the number of
  direction tensors, not the model's layer count). llama.cpp reads neither key; it reads tensors.
- One tensor per steered layer, named "direction.N", F32, one dimension of n_embd elements.
  Every tensor must be so named: llama.cpp refuses a file with any other tensor, a non-F32 or
  non-1-D one, sizes that differ, or N = 0 ("invalid (zero) direction tensor layer index").
  Two tensors for the same N are summed.

Layer mapping (read in ggml-org/llama.cpp: common/common.cpp common_control_vector_load_one puts
direction.N at data offset n_embd*(N-1), "layer 1 at [0]"; src/llama-adapter.cpp
llama_adapter_cvec::apply copies that into tensors[N], tensors[0] being "never" present, and
tensor_for(il) returns tensors[il]; src/models/llama.cpp adds it with `cur = build_cvec(cur, il)`
right after the block's second residual add, as the block's output "l_out" that becomes the next
block's input; read at commits 00758e06, 0650ea8c and 069be0ae of those three files). So
direction.N is added to the output of decoder block N (0-based) on every token, i.e. to the
residual entering block N+1. repeng agrees (vgel/repeng repeng/extract.py:
directions[layer] is read from hidden_states[layer + 1], the output of block `layer`;
repeng/control.py adds it to the output of model.layers[layer]; its default layers are
num_layers-1 down to 1, never 0).

In our terms:
    direction.N  ==  point "block_output", layer N  ==  point "block_input", layer N+1
so a vector of ours at block_input l is written as direction.(l-1) and one at block_output l as
direction.l. Our block_input rows 0 and 1 (the embeddings, and block 0's output) have no
llama.cpp form: llama.cpp never steers there. Imports land at block_output N by default (exact
for every N, including the last block's output, which no block_input names).

llama.cpp adds every direction in the file at every layer in --control-vector-layer-range (default
all), scaled by --control-vector-scaled's factor, on every token (our Scope.ALL, SteerMode.ADD).
To reproduce one-layer steering at l* there, export just that layer or pass the layer range.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from welfare_server.model.fields import check_bool, check_int_list, check_number, check_str, check_tensor
from welfare_server.model.steering import POINTS
from welfare_server.vectors.registry import (IncompatibleVector, RegistryError, VectorRegistry, describe_identity)
from welfare_server.vectors.types import ModelIdentity

ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
WELFARE_KEY_PREFIX = "welfare_server."
"""Our provenance keys in an exported file (llama.cpp and repeng ignore keys they do not know):
point (where the rows were taken), coefficient (the factor applied on export), and the record's
id, name, concept, method and model weights fingerprint when it came from the registry."""

_DIRECTION_RE = re.compile(r"^direction\.(\d+)$")


class GGUFError(RegistryError):
    """A control-vector file breaks the format, or a vector has no control-vector form. `field`
    names the tensor, key or argument."""


@dataclass
class GGUFControlVector:
    """What import_gguf read from a file."""

    directions: dict[int, torch.Tensor]
    """N -> fp32 [D] for each "direction.N": the vector llama.cpp adds to decoder block N's output
    (our block_output layer N), ascending N."""
    model_hint: str | None
    layer_count: int | None
    metadata: dict = field(default_factory=dict)
    """Every other key/value of the file (our welfare_server.* provenance keys among them)."""

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).shape[0]


def direction_index(layer: int, point: str) -> int:
    """The N of "direction.N" that llama.cpp adds where we steer `layer` at `point`; raises
    GGUFError where llama.cpp cannot steer (N would be below 1)."""
    n = layer if point == "block_output" else layer - 1
    if n < 1:
        raise GGUFError(f"layers: layer {layer} at {point} is {'the embeddings' if n < 0 else 'block 0 output'}, "
                        "which llama.cpp never steers (direction.N needs N >= 1: block N's output; our block_input "
                        "l is direction.(l-1))", "layers")
    return n


def layer_for_direction(n: int, point: str, num_layers: int) -> int:
    """Our layer at `point` for llama.cpp's direction.N, checked against num_layers."""
    layer = n if point == "block_output" else n + 1
    if not 0 <= layer < num_layers:
        raise GGUFError(f"direction.{n}: is block {n}'s output, which is {point} layer {layer}, outside a "
                        f"{num_layers}-layer model" + (" (the last block's output has no block_input form; import "
                                                       "at block_output)" if point == "block_input"
                                                       and n == num_layers - 1 else ""),
                        f"direction.{n}")
    return layer


def _as_rows(vectors, layers) -> tuple[list[int], list[torch.Tensor]]:
    if isinstance(vectors, dict):
        if layers is not None:
            raise GGUFError("layers: give layers only with a tensor; a dict's keys are its layers", "layers")
        keys = check_int_list(list(vectors), "vectors", GGUFError, lo=0, hi=1 << 30, what="layer indices",
                              nonempty=True)
        rows = [check_tensor(vectors[k], f"vectors[{k}]", GGUFError, shape=(None,), what="[D]") for k in keys]
        return keys, rows
    if isinstance(vectors, torch.Tensor) and vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
    tensor = check_tensor(vectors, "vectors", GGUFError, shape=(None, None), what="[R, D] (one row per layer)")
    if layers is None:
        layers = list(range(tensor.shape[0]))
    layers = check_int_list(layers, "layers", GGUFError, lo=0, hi=1 << 30, what="layer indices", nonempty=True)
    if len(layers) != tensor.shape[0]:
        raise GGUFError(f"layers: {len(layers)} layers for {tensor.shape[0]} rows", "layers")
    return layers, list(tensor)


def export_gguf(path: str | os.PathLike, vectors, layers: Sequence[int] | int | None = None, *, model_hint: str,
                point: str = "block_input", coefficient: float = 1.0, drop_unrepresentable: bool = False,
                metadata: dict[str, str | int | float] | None = None) -> dict[int, int]:
    """Write a llama.cpp control vector. `vectors` is [R, D] (row r at layers[r]; layers default to
    0..R-1), [D] with one layer, or a dict layer -> [D]; `point` says where the rows live. Each row
    times `coefficient` becomes direction.N (see direction_index). A row llama.cpp cannot steer is
    refused, or left out with drop_unrepresentable=True. `metadata` adds welfare_server.<key>
    values. Written to a temporary file and renamed, so a reader never sees half a file. Returns
    {our layer: N} for the rows written."""
    import gguf

    check_str(model_hint, "model_hint", GGUFError, max_len=200)
    check_str(point, "point", GGUFError, choices=list(POINTS))
    coefficient = check_number(coefficient, "coefficient", GGUFError)
    check_bool(drop_unrepresentable, "drop_unrepresentable", GGUFError)
    layers, rows = _as_rows(vectors, layers)
    if len(set(layers)) != len(layers):
        raise GGUFError(f"layers: {layers} names a layer twice", "layers")
    if len({r.shape[0] for r in rows}) != 1:
        raise GGUFError(f"vectors: rows of different sizes {sorted({r.shape[0] for r in rows})}", "vectors")
    written: dict[int, int] = {}
    directions: dict[int, np.ndarray] = {}
    for layer, row in sorted(zip(layers, rows), key=lambda lr: lr[0]):
        try:
            n = direction_index(layer, point)
        except GGUFError:
            if drop_unrepresentable:
                continue
            raise
        scaled = row.detach().to("cpu", torch.float32) * coefficient if coefficient != 1.0 \
            else row.detach().to("cpu", torch.float32)
        directions[n] = np.ascontiguousarray(scaled.numpy(), dtype="<f4")
        written[layer] = n
    if not directions:
        raise GGUFError(f"layers: none of {layers} at {point} has a llama.cpp form (direction.N needs N >= 1)",
                        "layers")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # The same calls, in the same order, as repeng's ControlVector.export_gguf.
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(KEY_MODEL_HINT, model_hint)
        writer.add_uint32(KEY_LAYER_COUNT, len(directions))
        writer.add_string(WELFARE_KEY_PREFIX + "point", point)
        writer.add_float32(WELFARE_KEY_PREFIX + "coefficient", coefficient)
        for key, value in sorted((metadata or {}).items()):
            check_str(key, "metadata", GGUFError, max_len=200)
            full = WELFARE_KEY_PREFIX + key
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise GGUFError(f"metadata[{key!r}]: a {type(value).__name__}, expected str, int or float",
                                f"metadata[{key!r}]")
            if isinstance(value, str):
                writer.add_string(full, value)
            elif isinstance(value, int):
                writer.add_int64(full, value)
            else:
                writer.add_float64(full, value)
        for n in sorted(directions):
            writer.add_tensor(f"direction.{n}", directions[n])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _plain(value):
    """A key's value as a plain Python value (numpy scalars and arrays from the reader become
    int/float/str/list), so it can go into a record's JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def import_gguf(path: str | os.PathLike) -> GGUFControlVector:
    """Read a control-vector file with llama.cpp's rules (see the module docstring), refusing what
    llama.cpp refuses; returns its directions (N -> fp32 [D], copied out of the file) and keys."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"path: {str(path)!r} is not a file", "path")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure: not a GGUF file
        raise GGUFError(f"path: {path.name} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                        "path") from None
    values = {}
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the container's own version and counts
        try:
            values[key] = _plain(reader_field.contents())
        except Exception:  # noqa: BLE001 - a key of a type we do not decode is kept out, not fatal
            continue
    arch = values.pop("general.architecture", None)
    if arch != ARCH:
        raise GGUFError(f"general.architecture: {path.name} is a {arch!r} file, not a {ARCH!r} (control vector)",
                        "general.architecture")
    directions: dict[int, torch.Tensor] = {}
    size = None
    for tensor in reader.tensors:
        where = f"tensor {tensor.name!r}"
        match = _DIRECTION_RE.match(tensor.name)
        if not match:
            raise GGUFError(f"{where}: {path.name} holds a tensor that is not direction.N (llama.cpp refuses it)",
                            tensor.name)
        n = int(match.group(1))
        if n == 0:
            raise GGUFError(f"{where}: direction.0 is invalid (llama.cpp's directions start at block 1's output)",
                            tensor.name)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise GGUFError(f"{where}: type {tensor.tensor_type.name}, expected F32", tensor.name)
        if len(tensor.shape) != 1 and not (len(tensor.shape) > 1 and all(int(s) == 1 for s in tensor.shape[1:])):
            raise GGUFError(f"{where}: shape {list(tensor.shape)}, expected one dimension", tensor.name)
        data = np.array(tensor.data, dtype="<f4", copy=True).reshape(-1)
        if size is None:
            size = data.shape[0]
        elif data.shape[0] != size:
            raise GGUFError(f"{where}: {data.shape[0]} elements, the file's other directions have {size}", tensor.name)
        row = torch.from_numpy(data.astype(np.float32, copy=False))
        # llama.cpp adds a second tensor for the same block to the first.
        directions[n] = directions[n] + row if n in directions else row
    if not directions:
        raise GGUFError(f"path: {path.name} holds no direction tensors", "path")
    hint = values.pop(KEY_MODEL_HINT, None)
    count = values.pop(KEY_LAYER_COUNT, None)
    return GGUFControlVector(directions=dict(sorted(directions.items())),
                             model_hint=hint if isinstance(hint, str) else None,
                             layer_count=int(count) if isinstance(count, (int, np.integer)) else None,
                             metadata=values)


# --------------------------------------------------------------------------------------- registry
def export_record(registry: VectorRegistry, record_id: str, path: str | os.PathLike, *,
                  layers: Sequence[int] | None = None, coefficient: float = 1.0,
                  drop_unrepresentable: bool = False) -> dict[int, int]:
    """Export a registry record (all its rows, or those for `layers`) as a llama.cpp control
    vector, with the model's family as model_hint and the record's provenance keys. Returns
    {our layer: N} as export_gguf."""
    record = registry.get(record_id)
    meta = record.meta
    if layers is None:
        chosen = list(meta.layers)
    else:
        chosen = check_int_list(layers, "layers", GGUFError, lo=0, hi=meta.model.num_layers - 1,
                                what="layer indices", nonempty=True)
        for i, layer in enumerate(chosen):
            if layer not in meta.layers:
                raise GGUFError(f"layers[{i}]: record {meta.id} has no row for layer {layer} (its layers: "
                                f"{meta.layers})", f"layers[{i}]")
    rows = torch.stack([record.row(layer) for layer in chosen])
    extra = dict(record_id=meta.id, name=meta.name, method=meta.method, model_sha256=meta.model.weights_sha256,
                 model_name=meta.model.name, num_layers=meta.model.num_layers)
    if meta.concept:
        extra["concept"] = meta.concept
    return export_gguf(path, rows, chosen, model_hint=meta.model.family, point=meta.point, coefficient=coefficient,
                       drop_unrepresentable=drop_unrepresentable, metadata=extra)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_gguf_to_registry(registry: VectorRegistry, path: str | os.PathLike, identity: ModelIdentity, *,
                            point: str | None = None, name: str | None = None, concept: str | None = None,
                            allow_other_weights: bool = False) -> str:
    """Store a control-vector file as a registry record (method "gguf_import") for the model
    `identity` names: a GGUF does not carry our weights fingerprint, so the caller says which model
    the vectors are for; a file whose vectors are not of its hidden size, or whose directions lie
    outside its layers, is refused. A file exported here carries the fingerprint it was made from:
    another one is refused unless allow_other_weights. `point` defaults to the point the file says
    it was exported from (welfare_server.point), else "block_output" (exact for every direction).
    `name` defaults to the file's stem. Returns the record id."""
    if not isinstance(identity, ModelIdentity):
        raise GGUFError(f"identity: a {type(identity).__name__}, expected a ModelIdentity", "identity")
    cv = import_gguf(path)
    path = Path(path)
    meta = cv.metadata
    if point is None:
        stored = meta.get(WELFARE_KEY_PREFIX + "point")
        point = stored if stored in POINTS else "block_output"
    check_str(point, "point", GGUFError, choices=list(POINTS))
    if cv.hidden_size != identity.hidden_size:
        raise IncompatibleVector(f"model.hidden_size: {path.name} holds vectors of size {cv.hidden_size} "
                                 f"(model_hint {cv.model_hint!r}); the target model {describe_identity(identity)} "
                                 f"has hidden size {identity.hidden_size}", "model.hidden_size")
    made_from = meta.get(WELFARE_KEY_PREFIX + "model_sha256")
    if isinstance(made_from, str) and made_from != identity.weights_sha256 and not allow_other_weights:
        raise IncompatibleVector(f"model.weights_sha256: {path.name} was exported from "
                                 f"{meta.get(WELFARE_KEY_PREFIX + 'model_name', '?')!r} (weights {made_from[:12]}); "
                                 f"the target model {describe_identity(identity)} has other weights (pass "
                                 "allow_other_weights=True to import it anyway)", "model.weights_sha256")
    layers = [layer_for_direction(n, point, identity.num_layers) for n in cv.directions]
    tensor = torch.stack(list(cv.directions.values()))
    coefficient = meta.get(WELFARE_KEY_PREFIX + "coefficient")
    source = dict(format="gguf", file=path.name, file_sha256=_sha256_file(path), model_hint=cv.model_hint,
                  layer_count=cv.layer_count, directions=list(cv.directions),
                  exported_coefficient=float(coefficient) if isinstance(coefficient, (float, int)) else None,
                  provenance={k[len(WELFARE_KEY_PREFIX):]: v
                              for k, v in sorted(meta.items()) if k.startswith(WELFARE_KEY_PREFIX)})
    if concept is None:
        stored = meta.get(WELFARE_KEY_PREFIX + "concept")
        concept = stored if isinstance(stored, str) else ""
    return registry.put(tensor, model=identity, layers=layers, point=point, method="gguf_import",
                        name=name if name is not None else path.stem, concept=concept,
                        classes=[concept] if concept else [], source=source)


__all__ = ["export_gguf", "import_gguf", "export_record", "import_gguf_to_registry", "GGUFControlVector",
           "GGUFError", "direction_index", "layer_for_direction", "ARCH", "KEY_MODEL_HINT", "KEY_LAYER_COUNT"]
