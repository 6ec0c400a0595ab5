"""The vector registry: named steering-vector sets on disk, addressed by content, loaded into an
engine's bank by id.

A record is one tensor fp32 [R, D] (row r is the residual direction at decoder layer layers[r], at
`point`: "block_input" = entering block l, what a forward pre-hook sees; "block_output" = the
block's output, i.e. entering block l+1) plus its metadata (VectorMeta). On disk, under the root:

    <id>/vectors.safetensors   the tensor "vectors"; header metadata: record_id, content_sha256,
                               meta_sha256, format_version
    <id>/meta.json             VectorMeta as JSON (the model identity, layers, point, method, ...)

The id is the first ID_HEX_CHARS hex digits of content_sha256, a sha256 over the tensor's fp32
little-endian bytes and shape and over the metadata that says what the vector is (the model's
weights fingerprint, layers, point, method, concept, classes, name): the same content always
gets the same id, so putting it twice stores it once, and anything that changes what the vector
means gets another id. Figures that describe a record without changing it (counts, selection,
source, created time) are outside the id but inside meta_sha256, so an edit to any of them is
still caught on load.

Writes are atomic: a record is built in a temporary directory beside its final place, fsynced and
renamed into place, so readers see either no record or a whole one. A temporary directory left by
a crashed writer is never listed and is removed when a registry is next opened.

Refusals raise RegistryError (a ValueError) or one of its kinds: RecordNotFound, CorruptRecord,
IncompatibleVector; each names the record and the field or file that broke the rule.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from welfare_server.model.fields import check_int, check_int_list, check_str, check_tensor, is_int
from welfare_server.model.steering import POINTS, SteeringTerm
from welfare_server.vectors.types import ConceptVectors, LayerSelection, ModelIdentity, model_identity

FORMAT_VERSION = 1
"""Version of the on-disk layout and of the content hash; a record of another version is refused
rather than misread."""

ID_HEX_CHARS = 16
"""Hex digits of content_sha256 that make a record id (64 bits: a collision among a registry's
records is vanishingly unlikely, and the full hash is still checked on every load)."""

MIN_PREFIX_CHARS = 4
"""Shortest id prefix resolve() accepts, so that a stray short string never picks a record."""

TENSOR_FILE = "vectors.safetensors"
META_FILE = "meta.json"
TENSOR_KEY = "vectors"

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
STALE_TMP_SECONDS = 3600.0
"""A temporary directory whose writer's process is gone is removed at once; one whose process
cannot be checked (another host on a shared filesystem, a reused pid) only after this age, so a
live writer elsewhere is never disturbed."""

_ID_RE = re.compile(r"^[0-9a-f]{%d}$" % ID_HEX_CHARS)
_HASH_DOMAIN = b"welfare_server.vector_record\x00"


# --------------------------------------------------------------------------------------- errors
class RegistryError(ValueError):
    """A registry operation was refused. `field` names what broke the rule (an argument such as
    "layers[2]", a file such as "meta.json", a metadata field such as "model.hidden_size");
    `record_id` names the record when there is one."""

    def __init__(self, message: str, field: str | None = None, record_id: str | None = None):
        super().__init__(message)
        if field is None and ": " in message:
            # fields.py's checks raise with the message alone, which starts with the field's name.
            field = message.split(": ", 1)[0]
        self.field = field or ""
        self.record_id = record_id


class RecordNotFound(RegistryError):
    """No record has this id (or an id prefix matches none, or several)."""


class CorruptRecord(RegistryError):
    """A stored record fails its integrity check (a file missing or unreadable, the tensor bytes
    or meta.json changed since it was written). It is never returned."""


class IncompatibleVector(RegistryError):
    """A record was made from a model that differs from the one it would steer."""


# --------------------------------------------------------------------------------------- records
@dataclass
class VectorMeta:
    """What a record is and where it came from (meta.json)."""

    id: str
    """The record id: content_sha256[:ID_HEX_CHARS]."""
    content_sha256: str
    """sha256 over the tensor bytes and shape and the identity-relevant metadata (module docstring)."""
    name: str
    """A free name chosen by whoever stored it (a run, an experiment); part of the id."""
    model: ModelIdentity
    """The model the vectors were computed on."""
    hidden_size: int
    """D, the length of every row (equal to model.hidden_size)."""
    layers: list[int]
    """Decoder layer of each row, in row order, each in [0, model.num_layers)."""
    point: str
    """"block_input" (residual entering block l) or "block_output" (block l's output)."""
    method: str
    """How the vectors were made: an extraction method ("maze_classes", "contrast", "rollouts")
    or an import ("gguf_import")."""
    concept: str = ""
    """The class this vector stands for (v_mold: "mold"); empty when it has none."""
    classes: list[str] = field(default_factory=list)
    """All classes of the extraction it came from."""
    counts: list[int] = field(default_factory=list)
    """Examples per class (same order as classes)."""
    norms: list[float] = field(default_factory=list)
    """L2 norm of each row (computed in float64), to size coefficients and norm-matched controls without loading."""
    selection: dict[str, LayerSelection] = field(default_factory=dict)
    """Per class: the held-out layer-selection figures of the extraction."""
    best_layer: int | None = None
    """The selected steering layer l* for this vector, when one was selected."""
    source: dict = field(default_factory=dict)
    """How the examples (or the imported file) were made: enough to make them again."""
    created: str = ""
    """When the record was first written, UTC ISO 8601."""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dict(format_version=self.format_version, id=self.id, content_sha256=self.content_sha256,
                    name=self.name, model=self.model.to_json(), hidden_size=self.hidden_size,
                    layers=list(self.layers), point=self.point, method=self.method, concept=self.concept,
                    classes=list(self.classes), counts=list(self.counts), norms=list(self.norms),
                    selection={k: v.to_json() for k, v in self.selection.items()},
                    best_layer=self.best_layer, source=self.source, created=self.created)

    @classmethod
    def from_json(cls, data: dict) -> "VectorMeta":
        """Parse meta.json's content; raises KeyError/TypeError/ValueError on a malformed one (the
        registry turns those into CorruptRecord)."""
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, expected an object")
        selection = {}
        for cls_name, sel in dict(data["selection"]).items():
            selection[cls_name] = LayerSelection(auroc=list(sel["auroc"]), cohens_d=list(sel["cohens_d"]),
                                                 overlap=list(sel["overlap"]), best_layer=sel["best_layer"])
        return cls(id=data["id"], content_sha256=data["content_sha256"], name=data["name"],
                   model=ModelIdentity.from_json(data["model"]), hidden_size=data["hidden_size"],
                   layers=list(data["layers"]), point=data["point"], method=data["method"],
                   concept=data["concept"], classes=list(data["classes"]), counts=list(data["counts"]),
                   norms=list(data["norms"]), selection=selection, best_layer=data["best_layer"],
                   source=dict(data["source"]), created=data["created"], format_version=data["format_version"])

    def describe_model(self) -> str:
        return describe_identity(self.model)


@dataclass
class VectorRecord:
    """A loaded, verified record."""

    tensor: torch.Tensor
    """fp32 [R, D] on the CPU, row r for meta.layers[r]."""
    meta: VectorMeta

    @property
    def id(self) -> str:
        return self.meta.id

    def row(self, layer: int) -> torch.Tensor:
        """The [D] row for decoder layer `layer` at the record's point."""
        try:
            return self.tensor[self.meta.layers.index(layer)]
        except ValueError:
            raise RegistryError(f"layer: record {self.id} has no row for layer {layer} at {self.meta.point} "
                                f"(its layers: {self.meta.layers})", "layer", self.id) from None


def describe_identity(identity: ModelIdentity) -> str:
    return (f"{identity.name!r} ({identity.family}, hidden size {identity.hidden_size}, "
            f"{identity.num_layers} layers, weights {identity.weights_sha256[:12]})")


# --------------------------------------------------------------------------------------- hashing
def _canonical(obj: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces. NaN and inf are refused: JSON has
    no form for them (Python's "NaN" extension breaks other readers of meta.json)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Explicit little-endian fp32, so the id is the same on any host for the same values.
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _identity_fields(meta: VectorMeta) -> dict:
    """The metadata that says what a vector is; everything else may be described differently
    without making it another vector."""
    return dict(model_sha256=meta.model.weights_sha256, layers=list(meta.layers), point=meta.point,
                method=meta.method, concept=meta.concept, classes=list(meta.classes), name=meta.name)


def content_sha256(tensor: torch.Tensor, meta: VectorMeta) -> str:
    """sha256 over the format version, the tensor's shape and fp32 bytes and the identity fields."""
    digest = hashlib.sha256(_HASH_DOMAIN)
    digest.update(_canonical(dict(format_version=FORMAT_VERSION, shape=list(tensor.shape),
                                  identity=_identity_fields(meta))))
    digest.update(b"\x00")
    digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _meta_sha256(meta_json: dict) -> str:
    return hashlib.sha256(_canonical(meta_json)).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open directories; nothing to sync then
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or cannot be told: treat as alive
    return True


def default_root() -> Path:
    """$WELFARE_SERVER_CACHE/vectors, else ~/.cache/welfare_server/vectors."""
    from welfare_server.model.bundled import cache_root

    return cache_root() / "vectors"


# --------------------------------------------------------------------------------------- registry
class VectorRegistry:
    """Records under one root directory (see the module docstring). Several processes may share a
    root: every write is an atomic rename, and readers verify what they load."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_leftovers()

    def __repr__(self) -> str:
        return f"VectorRegistry({str(self.root)!r})"

    # ------------------------------------------------------------------ writing
    def put(self, tensor: torch.Tensor, *, model: ModelIdentity, layers: Sequence[int] | int, method: str,
            name: str, point: str = "block_input", concept: str = "", classes: Sequence[str] = (),
            counts: Sequence[int] = (), selection: dict[str, LayerSelection] | None = None,
            best_layer: int | None = None, source: dict | None = None) -> str:
        """Store a vector set; returns its id. `tensor` is [R, D] with one row per entry of
        `layers`, or [D] with `layers` a single int (or a one-element list). Putting the same
        content again returns the same id and keeps the first record (its created time and
        description); a stored record that fails its check is replaced by the new one."""
        meta, tensor = self._build(tensor, model=model, layers=layers, method=method, name=name, point=point,
                                   concept=concept, classes=classes, counts=counts,
                                   selection=selection or {}, best_layer=best_layer, source=source or {})
        target = self.root / meta.id
        if target.exists():
            try:
                self.get(meta.id)
                return meta.id
            except CorruptRecord:
                pass  # replaced below by the good copy we are holding
        self._write(meta, tensor)
        return meta.id

    def put_concept_vectors(self, cv: ConceptVectors, classes: Sequence[str] = ("mold", "gold"),
                            name: str | None = None) -> dict[str, str]:
        """Store v_c = cv.vector(c) [L, D] for each class c (every layer, at cv.point) with cv's
        model, method, counts, source and that class's layer selection; returns {class: id}.
        `name` defaults to cv.method."""
        if not isinstance(cv, ConceptVectors):
            raise RegistryError(f"cv: a {type(cv).__name__}, expected ConceptVectors", "cv")
        if isinstance(classes, str):
            raise RegistryError(f"classes: {classes!r} is a string, expected a list of class names", "classes")
        ids = {}
        for i, cls_name in enumerate(classes):
            if cls_name not in cv.classes:
                raise RegistryError(f"classes[{i}]: {cls_name!r} is not one of the extraction's classes "
                                    f"{list(cv.classes)}", f"classes[{i}]")
            sel = cv.selection.get(cls_name)
            ids[cls_name] = self.put(
                cv.vector(cls_name), model=cv.model, layers=list(range(cv.means.shape[0])), method=cv.method,
                name=name if name is not None else cv.method, point=cv.point, concept=cls_name,
                classes=list(cv.classes), counts=list(cv.counts), selection=dict(cv.selection),
                best_layer=None if sel is None else sel.best_layer, source=dict(cv.source))
        return ids

    def _build(self, tensor, *, model, layers, method, name, point, concept, classes, counts, selection,
               best_layer, source) -> tuple[VectorMeta, torch.Tensor]:
        """Check every argument strictly (fields.py's rules) and build the record's metadata."""
        if not isinstance(model, ModelIdentity):
            raise RegistryError(f"model: a {type(model).__name__}, expected a ModelIdentity", "model")
        D, L = model.hidden_size, model.num_layers
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
            if is_int(layers):
                layers = [layers]
        check_tensor(tensor, "tensor", RegistryError, shape=(None, D),
                     what=f"[R, {D}] or [{D}] (rows of the model's hidden size)")
        layers = check_int_list(layers, "layers", RegistryError, lo=0, hi=L - 1, what="layer indices",
                                nonempty=True, rule=f"decoder layers of a {L}-layer model are in [0, {L})")
        if len(set(layers)) != len(layers):
            raise RegistryError(f"layers: {layers} names a layer twice (one row per layer)", "layers")
        if tensor.shape[0] != len(layers):
            raise RegistryError(f"tensor: {tensor.shape[0]} rows for {len(layers)} layers {layers} "
                                "(one row per layer)", "tensor")
        check_str(point, "point", RegistryError, choices=list(POINTS))
        check_str(method, "method", RegistryError, max_len=200)
        check_str(name, "name", RegistryError, max_len=200)
        check_str(concept, "concept", RegistryError, nonempty=False, max_len=200)
        if isinstance(classes, str):
            raise RegistryError(f"classes: {classes!r} is a string, expected a list of class names", "classes")
        classes = [check_str(c, f"classes[{i}]", RegistryError, max_len=200) for i, c in enumerate(classes)]
        counts = [check_int(c, f"counts[{i}]", RegistryError, lo=0) for i, c in enumerate(counts)]
        if counts and len(counts) != len(classes):
            raise RegistryError(f"counts: {len(counts)} counts for {len(classes)} classes", "counts")
        if not isinstance(selection, dict) or not all(
                isinstance(k, str) and isinstance(v, LayerSelection) for k, v in selection.items()):
            raise RegistryError("selection: expected a dict of class name -> LayerSelection", "selection")
        if best_layer is not None:
            best_layer = check_int(best_layer, "best_layer", RegistryError, lo=0, hi=L - 1)
        if not isinstance(source, dict):
            raise RegistryError(f"source: a {type(source).__name__}, expected a dict", "source")
        for what, value in (("source", source), ("selection", {k: v.to_json() for k, v in selection.items()})):
            try:
                _canonical(value)
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"{what}: not storable as JSON ({exc})", what) from None
        tensor = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        meta = VectorMeta(id="", content_sha256="", name=name, model=model, hidden_size=D, layers=layers,
                          point=point, method=method, concept=concept, classes=classes, counts=counts,
                          norms=[float(n) for n in tensor.double().norm(dim=1)], selection=dict(selection),
                          best_layer=best_layer, source=json.loads(_canonical(source)),
                          created=datetime.now(timezone.utc).isoformat(timespec="microseconds"))
        meta.content_sha256 = content_sha256(tensor, meta)
        meta.id = meta.content_sha256[:ID_HEX_CHARS]
        return meta, tensor

    def _write(self, meta: VectorMeta, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        meta_json = meta.to_json()
        header = dict(record_id=meta.id, content_sha256=meta.content_sha256, meta_sha256=_meta_sha256(meta_json),
                      format_version=str(FORMAT_VERSION))
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            save_file({TENSOR_KEY: tensor}, str(tmp / TENSOR_FILE), metadata=header)
            with open(tmp / TENSOR_FILE, "rb+") as handle:  # save_file does not sync
                os.fsync(handle.fileno())
            _write_file(tmp / META_FILE, json.dumps(meta_json, indent=1, sort_keys=True, ensure_ascii=False,
                                                    allow_nan=False).encode("utf-8"))
            _fsync_dir(tmp)
            target = self.root / meta.id
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.exists():
                    raise
                # Someone else holds this id: another writer of the same content (fine, theirs is
                # kept), or a corrupt copy being replaced: move it aside, then rename ours in.
                try:
                    self.get(meta.id)
                    return
                except CorruptRecord:
                    trash = self.root / f"{TRASH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
                    os.rename(target, trash)
                    os.rename(tmp, target)
                    shutil.rmtree(trash, ignore_errors=True)
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def resolve(self, record_id: str) -> str:
        """The full id of a record given its id or a unique prefix of at least MIN_PREFIX_CHARS."""
        if not isinstance(record_id, str):
            raise RegistryError(f"record_id: {record_id!r} is a {type(record_id).__name__}, expected a "
                                "hex string", "record_id")
        rid = record_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]+", rid) or not MIN_PREFIX_CHARS <= len(rid) <= ID_HEX_CHARS:
            raise RegistryError(f"record_id: {record_id!r} is not a record id ({ID_HEX_CHARS} hex digits, or a "
                                f"prefix of at least {MIN_PREFIX_CHARS})", "record_id")
        if len(rid) == ID_HEX_CHARS:
            if (self.root / rid).is_dir():
                return rid
            raise RecordNotFound(f"record_id: no record {rid} in {self.root}", "record_id", rid)
        matches = [i for i in self.ids() if i.startswith(rid)]
        if not matches:
            raise RecordNotFound(f"record_id: no record id starts with {rid!r} in {self.root}", "record_id", rid)
        if len(matches) > 1:
            raise RecordNotFound(f"record_id: prefix {rid!r} is ambiguous ({len(matches)} records: "
                                 f"{', '.join(sorted(matches)[:5])}{'...' if len(matches) > 5 else ''})",
                                 "record_id", rid)
        return matches[0]

    def ids(self) -> list[str]:
        """Ids of every record directory (not verified)."""
        return sorted(p.name for p in self.root.iterdir() if _ID_RE.match(p.name) and p.is_dir())

    def __contains__(self, record_id: str) -> bool:
        try:
            self.resolve(record_id)
            return True
        except RegistryError:
            return False

    def get(self, record_id: str) -> VectorRecord:
        """Load and verify a record (id or unique prefix). Raises RecordNotFound, or CorruptRecord
        naming the file and the check that failed."""
        rid = self.resolve(record_id)
        with self._vanished_is_not_found(rid):
            meta, header = self._read_meta(rid)
            tensor = self._read_tensor(rid)
        if tuple(tensor.shape) != (len(meta.layers), meta.hidden_size):
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} holds shape {tuple(tensor.shape)}, meta.json says "
                                f"[{len(meta.layers)}, {meta.hidden_size}]", TENSOR_FILE, rid)
        digest = content_sha256(tensor, meta)
        if digest != header.get("content_sha256"):
            raise CorruptRecord(f"record {rid}: content hash mismatch: the tensor bytes in {TENSOR_FILE} (or the "
                                f"identity fields of {META_FILE}) changed since the record was written "
                                f"(stored {header.get('content_sha256', '?')[:16]}..., now {digest[:16]}...)",
                                TENSOR_FILE, rid)
        if digest[:ID_HEX_CHARS] != rid or meta.content_sha256 != digest:
            raise CorruptRecord(f"record {rid}: its content hashes to {digest[:ID_HEX_CHARS]}, not its id",
                                TENSOR_FILE, rid)
        return VectorRecord(tensor=tensor, meta=meta)

    def meta(self, record_id: str) -> VectorMeta:
        """A record's metadata, checked against the hash in its tensor file's header (the tensor
        itself is not read)."""
        rid = self.resolve(record_id)
        with self._vanished_is_not_found(rid):
            return self._read_meta(rid)[0]

    @contextlib.contextmanager
    def _vanished_is_not_found(self, rid: str):
        """A record deleted by another process while we read it is gone, not corrupt: delete
        renames the whole directory away at once, so a missing directory means a deletion."""
        try:
            yield
        except CorruptRecord:
            if not (self.root / rid).is_dir():
                raise RecordNotFound(f"record_id: record {rid} was deleted meanwhile", "record_id", rid) from None
            raise

    def _header(self, rid: str) -> dict:
        from safetensors import safe_open

        path = self.root / rid / TENSOR_FILE
        if not path.is_file():
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} is missing", TENSOR_FILE, rid)
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = dict(handle.metadata() or {})
                keys = list(handle.keys())
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} is unreadable ({type(exc).__name__}: {exc})",
                                TENSOR_FILE, rid) from None
        if keys != [TENSOR_KEY]:
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} holds tensors {keys}, expected [{TENSOR_KEY!r}]",
                                TENSOR_FILE, rid)
        version = header.get("format_version")
        if version != str(FORMAT_VERSION):
            raise CorruptRecord(f"record {rid}: format_version {version!r} in {TENSOR_FILE}; this build reads "
                                f"version {FORMAT_VERSION}", TENSOR_FILE, rid)
        if header.get("record_id") != rid:
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} belongs to record {header.get('record_id')!r}",
                                TENSOR_FILE, rid)
        return header

    def _read_tensor(self, rid: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.root / rid / TENSOR_FILE), framework="pt") as handle:
                tensor = handle.get_tensor(TENSOR_KEY).clone()
        except Exception as exc:  # noqa: BLE001
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} is unreadable ({type(exc).__name__}: {exc})",
                                TENSOR_FILE, rid) from None
        if tensor.dtype != torch.float32 or tensor.dim() != 2:
            raise CorruptRecord(f"record {rid}: {TENSOR_FILE} holds a {tensor.dtype} tensor of shape "
                                f"{tuple(tensor.shape)}, expected fp32 [R, D]", TENSOR_FILE, rid)
        return tensor

    def _read_meta(self, rid: str) -> tuple[VectorMeta, dict]:
        header = self._header(rid)
        path = self.root / rid / META_FILE
        if not path.is_file():
            raise CorruptRecord(f"record {rid}: {META_FILE} is missing", META_FILE, rid)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptRecord(f"record {rid}: {META_FILE} is not valid JSON ({exc})", META_FILE, rid) from None
        try:
            digest = _meta_sha256(data)
        except ValueError as exc:  # NaN/inf smuggled in: not canonical JSON
            raise CorruptRecord(f"record {rid}: {META_FILE} is not canonical JSON ({exc})", META_FILE, rid) from None
        if digest != header.get("meta_sha256"):
            raise CorruptRecord(f"record {rid}: {META_FILE} was changed after the record was written (its hash "
                                f"does not match the one in {TENSOR_FILE})", META_FILE, rid)
        try:
            meta = VectorMeta.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(f"record {rid}: {META_FILE} is malformed ({type(exc).__name__}: {exc})",
                                META_FILE, rid) from None
        if meta.id != rid:
            raise CorruptRecord(f"record {rid}: {META_FILE} describes record {meta.id!r}", META_FILE, rid)
        return meta, header

    def list(self, *, model_sha256: str | None = None, name: str | None = None, method: str | None = None,
             concept: str | None = None, skip_corrupt: bool = False) -> list[VectorMeta]:
        """Metadata of every record matching all the given filters, oldest first. A record whose
        metadata fails its check raises CorruptRecord, or is left out with skip_corrupt=True
        (verify() lists them)."""
        out = []
        for rid in self.ids():
            try:
                with self._vanished_is_not_found(rid):
                    meta = self._read_meta(rid)[0]
            except RecordNotFound:  # deleted while we listed
                continue
            except CorruptRecord:
                if skip_corrupt:
                    continue
                raise
            if ((model_sha256 is None or meta.model.weights_sha256 == model_sha256)
                    and (name is None or meta.name == name) and (method is None or meta.method == method)
                    and (concept is None or meta.concept == concept)):
                out.append(meta)
        return sorted(out, key=lambda m: (m.created, m.id))

    def verify(self) -> dict[str, str]:
        """Check every record fully; returns {id: what failed} for the corrupt ones."""
        bad = {}
        for rid in self.ids():
            try:
                self.get(rid)
            except CorruptRecord as exc:
                bad[rid] = str(exc)
            except RecordNotFound:
                continue
        return bad

    # ------------------------------------------------------------------ removing
    def delete(self, record_id: str) -> None:
        """Remove a record (id or unique prefix), corrupt or not. The directory is renamed aside
        first, so readers never see half of it."""
        rid = self.resolve(record_id)
        trash = self.root / f"{TRASH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.root / rid, trash)
        except FileNotFoundError:
            raise RecordNotFound(f"record_id: record {rid} was deleted meanwhile", "record_id", rid) from None
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self) -> list[str]:
        """Remove temporary and trash directories left by writers that died (their process is
        gone, or STALE_TMP_SECONDS passed); returns their names."""
        removed = []
        now = time.time()
        for path in self.root.iterdir():
            if not (path.name.startswith(TMP_PREFIX) or path.name.startswith(TRASH_PREFIX)):
                continue
            pid_text = path.name.split("-", 2)[1] if path.name.count("-") >= 2 else ""
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            dead = pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
            if dead or age > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed


# --------------------------------------------------------------------------------------- compatibility
def check_compatible(record: VectorRecord | VectorMeta, identity: ModelIdentity,
                     allow_other_weights: bool = False) -> None:
    """Refuse a record made from a model of another shape (hidden size, layer count: always) or
    with other weights (unless allow_other_weights: applying a trained model's vectors to the
    untrained model is a legitimate experiment, but it must be asked for)."""
    meta = record.meta if isinstance(record, VectorRecord) else record
    if not isinstance(meta, VectorMeta):
        raise RegistryError(f"record: a {type(record).__name__}, expected a VectorRecord or VectorMeta", "record")
    if not isinstance(identity, ModelIdentity):
        raise RegistryError(f"identity: a {type(identity).__name__}, expected a ModelIdentity", "identity")
    if not isinstance(allow_other_weights, bool):
        raise RegistryError(f"allow_other_weights: {allow_other_weights!r} is not a bool", "allow_other_weights")
    made, target = describe_identity(meta.model), describe_identity(identity)
    if meta.hidden_size != identity.hidden_size:
        raise IncompatibleVector(f"model.hidden_size: record {meta.id} has vectors of size {meta.hidden_size} "
                                 f"from {made}; the target model {target} has hidden size {identity.hidden_size}",
                                 "model.hidden_size", meta.id)
    if meta.model.num_layers != identity.num_layers:
        raise IncompatibleVector(f"model.num_layers: record {meta.id} was made from {made}; the target model "
                                 f"{target} has {identity.num_layers} layers", "model.num_layers", meta.id)
    if meta.model.weights_sha256 != identity.weights_sha256 and not allow_other_weights:
        raise IncompatibleVector(f"model.weights_sha256: record {meta.id} was made from {made}; the target model "
                                 f"{target} has other weights (pass allow_other_weights=True to apply it anyway)",
                                 "model.weights_sha256", meta.id)


# --------------------------------------------------------------------------------------- engine
# Bank ids placed by load_into_engine, per engine: {(content_sha256, row index): (bank id, row)}.
# The bank belongs to one engine; the same row loaded twice would take a second slot for nothing.
_ENGINE_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[str, int], tuple[int, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _row_index(record: VectorRecord, layer: int, point: str, field_name: str) -> int:
    """Which row steers `layer` at `point`. The residual entering block l is block l-1's output,
    so a record of one point also serves the other, one layer over."""
    meta = record.meta
    if point == meta.point:
        source_layer = layer
    elif meta.point == "block_output":  # asked for block_input l: that is block l-1's output
        source_layer = layer - 1
    else:  # record at block_input, asked for block_output l: the residual entering block l+1
        source_layer = layer + 1
    if source_layer not in meta.layers:
        raise RegistryError(f"{field_name}: record {meta.id} has no row for layer {layer} at {point} (its rows are "
                            f"layers {meta.layers} at {meta.point})", field_name, meta.id)
    return meta.layers.index(source_layer)


def layer_rows(record: VectorRecord, layers: Sequence[int], point: str, field_name: str = "layers"
               ) -> list[tuple[int, torch.Tensor]]:
    """(layer, row [D]) that steers each of `layers` (already in [0, L)) at `point`, a layer named
    twice once: for callers that pass the rows inline (a request's own bank slots, released when
    it ends) instead of loading them into the bank for good."""
    rows, seen = [], set()
    for i, layer in enumerate(layers):
        if layer not in seen:
            seen.add(layer)
            rows.append((layer, record.tensor[_row_index(record, layer, point, f"{field_name}[{i}]")]))
    return rows


def _engine_identity(engine, identity: ModelIdentity | None) -> ModelIdentity:
    if identity is None:
        # Computed afresh: a trainer may have stepped the engine's weights since the last call.
        return model_identity(engine.loaded)
    if not isinstance(identity, ModelIdentity):
        raise RegistryError(f"identity: a {type(identity).__name__}, expected a ModelIdentity", "identity")
    if identity.hidden_size != engine.D or identity.num_layers != engine.L:
        raise IncompatibleVector(f"identity: {describe_identity(identity)} is not the engine's model (hidden size "
                                 f"{engine.D}, {engine.L} layers)", "identity")
    return identity


def _load_row(engine, record: VectorRecord, row: int) -> int:
    key = (record.meta.content_sha256, row)
    vector = record.tensor[row]
    with _CACHE_LOCK:
        cache = _ENGINE_CACHE.setdefault(engine, {})
        if key in cache and _holds(engine, *cache[key]):
            return cache[key][0]
        idx = engine.register_vector(vector)
        cache[key] = (idx, vector.clone())
        return idx


def _holds(engine, idx: int, vector: torch.Tensor) -> bool:
    """Whether bank slot idx still holds `vector`: someone may have removed it (engine.remove_vector)
    and the slot been given to another vector since."""
    return engine.bank.is_live(idx) and torch.equal(engine.bank.tensor[idx].detach().to("cpu", torch.float32),
                                                    vector)


def load_into_engine(registry: VectorRegistry, engine, record_id: str, layer: int, *, point: str | None = None,
                     identity: ModelIdentity | None = None, allow_other_weights: bool = False) -> int:
    """Place the record's row for `layer` (at `point`, default the record's own) in the engine's
    bank; returns the bank id for SteeringTerm.vector. The record is checked against the engine's
    model (identity: computed from engine.loaded when not given; see check_compatible). Loading
    the same row into the same engine again returns the same id. Call it from the thread that
    owns the engine's loop (or before Engine.start), as Engine.register_vector."""
    record = registry.get(record_id)
    ident = _engine_identity(engine, identity)
    check_compatible(record, ident, allow_other_weights)
    point = record.meta.point if point is None else check_str(point, "point", RegistryError, choices=list(POINTS))
    layer = check_int(layer, "layer", RegistryError, lo=-engine.L, hi=engine.L - 1) % engine.L
    return _load_row(engine, record, _row_index(record, layer, point, "layer"))


def steering_terms(registry: VectorRegistry, engine, record_id: str, layers: Sequence[int],
                   coefficient: float = 1.0, mode=None, point: str | None = None, *,
                   identity: ModelIdentity | None = None, allow_other_weights: bool = False) -> list[SteeringTerm]:
    """One SteeringTerm per layer, each with the record's row for that layer (loaded into the
    bank once per engine): steering a record across several layers needs a different vector at
    each, and a term carries one. mode defaults to SteerMode.ADD; coefficient and mode are
    checked by the engine when the request is submitted."""
    from welfare_server.kernels import SteerMode

    record = registry.get(record_id)
    ident = _engine_identity(engine, identity)
    check_compatible(record, ident, allow_other_weights)
    point = record.meta.point if point is None else check_str(point, "point", RegistryError, choices=list(POINTS))
    L = engine.L
    layers = check_int_list(layers, "layers", RegistryError, lo=-L, hi=L - 1, what="layer indices", nonempty=True,
                            rule=f"layer indices are in [-{L}, {L})")
    terms, seen = [], set()
    for i, layer in enumerate(l % L for l in layers):
        if layer in seen:  # a layer named twice (3 and -L+3 too) is one term there, as in the engine
            continue
        seen.add(layer)
        idx = _load_row(engine, record, _row_index(record, layer, point, f"layers[{i}]"))
        terms.append(SteeringTerm(vector=idx, layers=[layer], coefficient=coefficient,
                                  mode=SteerMode.ADD if mode is None else mode, point=point))
    return terms


def steering_term(registry: VectorRegistry, engine, record_id: str, layer: int, coefficient: float = 1.0,
                  mode=None, point: str | None = None, *, identity: ModelIdentity | None = None,
                  allow_other_weights: bool = False) -> SteeringTerm:
    """The SteeringTerm that applies the record's row for `layer` at that layer (steering_terms
    for one layer)."""
    if not is_int(layer):
        raise RegistryError(f"layer: {layer!r} is a {type(layer).__name__}, not an int (steering_terms takes "
                            "several layers)", "layer")
    return steering_terms(registry, engine, record_id, [layer], coefficient, mode, point, identity=identity,
                          allow_other_weights=allow_other_weights)[0]


def unload_from_engine(engine, record: VectorRecord | VectorMeta | None = None) -> int:
    """Remove from the engine's bank the rows load_into_engine placed (of one record, or all);
    returns how many. A row still used by a running request stays until that request ends."""
    sha = None
    if record is not None:
        sha = (record.meta if isinstance(record, VectorRecord) else record).content_sha256
    removed = 0
    with _CACHE_LOCK:
        cache = _ENGINE_CACHE.get(engine, {})
        for key in [k for k in cache if sha is None or k[0] == sha]:
            idx, vector = cache.pop(key)
            if _holds(engine, idx, vector):
                engine.remove_vector(idx)
                removed += 1
    return removed


__all__ = ["VectorRegistry", "VectorRecord", "VectorMeta", "RegistryError", "RecordNotFound", "CorruptRecord",
           "IncompatibleVector", "check_compatible", "load_into_engine", "steering_terms", "steering_term",
           "unload_from_engine", "layer_rows", "content_sha256", "default_root", "describe_identity", "FORMAT_VERSION",
           "ID_HEX_CHARS"]
