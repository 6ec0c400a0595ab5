"""The Vectors service (welfare.v1.Vectors): concept-vector extraction on the served model and the
registry the vectors live in (list, get, put, delete, llama.cpp GGUF export and import).

Extract runs the extraction (vectors/extract.py) in a worker thread: its engine work goes through
Engine.capture, one loop command per group of prompts, so generation is served between groups and
the asyncio loop never waits on it. Progress comes back through an asyncio.Queue fed from the
worker with call_soon_threadsafe; a client that cancels or disconnects stops the worker at its next
progress report. The registry calls do file I/O (atomic writes, fsync), so they run in threads too.

Refusals follow errors.py: an invalid field is INVALID_ARGUMENT naming it in this service's
messages; the record an RPC is about (Get, Delete, Export) is NOT_FOUND when it does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import tempfile
import threading
import time
from pathlib import Path

import grpc

from welfare_server.maze import MazeConfig, MazeTokenTable
from welfare_server.model.fields import InvalidRequest
from welfare_server.model.prompts import render_chat
from welfare_server.server import wire
from welfare_server.server.errors import WireError, invalid, to_status, translate
from welfare_server.server.observe import log_call
from welfare_server.server.proto import vectors_pb2 as vec
from welfare_server.server.proto import vectors_pb2_grpc
from welfare_server.train.rollout import episode_context_tokens
from welfare_server.vectors.extract import ExtractionConfig, contrast_vectors, maze_vectors
from welfare_server.vectors.formats import export_record, import_gguf_to_registry
from welfare_server.vectors.registry import CorruptRecord, RegistryError

REQUEST_ID_KEY = "x-request-id"

MAX_NAME_CHARS = 200
"""A record name's longest form (the registry's own limit, checked before any work is done)."""
ROLES = ("system", "user", "assistant")
MAZE_CLASSES = ("mold", "gold", "path")
CONTRAST_CLASSES = ("positive", "negative")


# --------------------------------------------------------------------------------------- calls
class _Call:
    """One call's bookkeeping, shared by the Vectors and Maze services: admission (for the calls
    that hold engine or memory resources), metrics, the JSON log line, and every error turned into
    its status. `translate_args` tunes errors.translate for the call (NOT_FOUND subjects, field
    names in the message's own terms)."""

    _ids = itertools.count()

    def __init__(self, state, method: str, context, admit: bool):
        self.state, self.method, self.context, self.admit = state, method, context, admit
        self.translate_args: dict = {}
        self.log: dict = {}
        self.code = "OK"
        metadata = dict(context.invocation_metadata() or ())
        self.request_id = metadata.get(REQUEST_ID_KEY) or f"srv-{method.lower()}-{next(self._ids)}"


@contextlib.asynccontextmanager
async def served_call(state, method: str, context, *, admit: bool = False):
    """Wrap one call (see _Call): `async with served_call(...) as call:` around its whole body."""
    call = _Call(state, method, context, admit)
    started = time.perf_counter()
    counted = False
    try:
        if admit:
            state.admission.enter(method)
        counted = True
        state.metrics.in_flight.labels(method).inc()
        yield call
    except asyncio.CancelledError:
        call.code = "CANCELLED"
        raise
    except Exception as error:  # noqa: BLE001 - every refusal goes back as a status
        refusal = translate(error, **call.translate_args)
        call.code = refusal.code.name
        await context.abort_with_status(to_status(refusal))
    finally:
        if counted:
            if admit:
                state.admission.leave()
            state.metrics.in_flight.labels(method).dec()
        state.metrics.requests.labels(method, call.code).inc()
        state.metrics.duration.labels(method).observe(time.perf_counter() - started)
        log_call(state.logger, method=method, request_id=call.request_id, code=call.code,
                 ms=round(1000 * (time.perf_counter() - started), 1), **call.log)


class Stopped(Exception):
    """Raised inside a worker thread when its call has ended (cancelled, disconnected, past its
    deadline): the work stops at its next progress report instead of running on for nobody."""


class Progress:
    """Long work (an extraction, a rollout) in a thread of its own, its reports passed in order to
    the call's coroutine through an asyncio.Queue fed with call_soon_threadsafe. report() raises
    Stopped once the call has gone away. A thread per call, not the loop's default executor: a few
    long calls would otherwise take every executor thread from the short ones (registry reads,
    session steps)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()

    def report(self, item) -> None:
        if self.stopped.is_set():
            raise Stopped()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ("report", item))
        except RuntimeError:  # the loop is closed: the server is gone
            raise Stopped() from None

    async def run(self, work, on_end=None):
        """Run work() in a new thread; yield every reported item, then return with work's value in
        self.value (work's exception is raised here). on_end() runs on the loop when the thread
        ends, even when the call has ended long before (whatever the work held is held till then)."""

        def finish(outcome):
            if on_end is not None:
                on_end()
            self.queue.put_nowait(("end", outcome))

        def target():
            try:
                outcome = (True, work())
            except BaseException as error:  # noqa: BLE001 - handed to the call's coroutine
                outcome = (False, error)
            try:
                self.loop.call_soon_threadsafe(finish, outcome)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass

        threading.Thread(target=target, name="welfare-work", daemon=True).start()
        try:
            while True:
                kind, item = await self.queue.get()
                if kind == "end":
                    ok, value = item
                    if not ok:
                        raise value
                    self.value = value
                    return
                yield item
        finally:
            self.stopped.set()


# --------------------------------------------------------------------------------------- helpers
def maze_config(message, prefix: str, **fields) -> MazeConfig:
    """A MazeConfig of a message's set fields (size, episode_steps, ... where the message has
    them; glyphs "" = the default preset), refusals named as prefix.<field>."""
    values = dict(fields)
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        if name == "glyphs":
            if message.glyphs:
                values["glyphs"] = message.glyphs
        elif message.HasField(name):
            values[name] = getattr(message, name)
    try:
        return MazeConfig(**values)
    except ValueError as error:
        text = str(error)
        name = text.split("MazeConfig.", 1)[1] if "MazeConfig." in text else ""
        name = "".join(itertools.takewhile(lambda ch: ch.isalnum() or ch == "_", name))
        known = {d.name for d in message.DESCRIPTOR.fields}
        raise invalid(f"{prefix}.{name}" if name in known else prefix, text) from None


def meta_message(meta) -> vec.VectorMeta:
    return vec.VectorMeta(id=meta.id, name=meta.name, method=meta.method, point=meta.point, layers=list(meta.layers),
                          hidden_size=meta.hidden_size, model_name=meta.model.name,
                          model_fingerprint=meta.model.weights_sha256, created=meta.created, norms=list(meta.norms),
                          meta_json=json.dumps(meta.to_json(), sort_keys=True, ensure_ascii=False))


def _check_record_name(name: str, field: str = "name") -> None:
    if len(name) > MAX_NAME_CHARS:
        raise invalid(field, f"{len(name)} characters, more than the limit {MAX_NAME_CHARS}")


# --------------------------------------------------------------------------------------- service
class VectorsService(vectors_pb2_grpc.VectorsServicer):
    def __init__(self, state):
        self.state = state

    def _registry(self):
        if self.state.registry is None:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, "this server has no vector registry")
        return self.state.registry

    # ------------------------------------------------------------------ Extract
    async def Extract(self, request, context):
        s = self.state
        async with served_call(s, "Extract", context, admit=True) as call:
            registry = self._registry()
            config = self._extraction_config(request)
            name = request.name
            _check_record_name(name)
            if s.engine.tokenizer is None:
                raise invalid("source", "this model has no tokenizer: it reads neither mazes nor chats")
            kind = request.WhichOneof("source")
            if kind is None:
                raise invalid("source", "unset: give maze or contrast")
            call.log.update(source=kind, per_class=config.per_class, permutations=config.permutations)
            loop = asyncio.get_running_loop()
            if kind == "maze":
                table = await loop.run_in_executor(None, self._maze_table, request.maze)
                classes = MAZE_CLASSES
            else:
                prompts = await loop.run_in_executor(None, self._contrast_prompts, request.contrast)
                classes = CONTRAST_CLASSES
            progress = Progress(loop)

            def report(stage, done, total):
                progress.report((stage, done, total))

            def work():
                if kind == "maze":
                    cv = maze_vectors(s.engine, s.identity, table, config, classes, on_progress=report)
                else:
                    cv = contrast_vectors(s.engine, s.identity, prompts[0], prompts[1], config, classes,
                                          on_progress=report)
                return cv, registry.put_concept_vectors(cv, classes, name=name or None)

            async for stage, done, total in progress.run(work):
                yield vec.ExtractProgress(stage=stage, done=done, total=total)
            cv, ids = progress.value
            final = vec.ExtractProgress(stage="done", done=1, total=1, vector_ids=ids, counts=list(cv.counts))
            for cls, selection in cv.selection.items():
                final.selection[cls].CopyFrom(vec.LayerFigures(
                    auroc=selection.auroc, cohens_d=selection.cohens_d, overlap=selection.overlap,
                    best_layer=selection.best_layer))
            call.log.update(vector_ids=ids)
            yield final

    def _extraction_config(self, request) -> ExtractionConfig:
        per_class = request.per_class if request.HasField("per_class") else self.state.config.extract_per_class
        limit = self.state.config.max_extract_per_class
        if not 2 <= per_class <= limit:
            raise invalid("per_class", f"{per_class} is out of range [2, {limit}] (max_extract_per_class)")
        values = dict(per_class=per_class)
        if request.HasField("heldout_fraction"):
            fraction = request.heldout_fraction
            if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
                raise invalid("heldout_fraction", f"{fraction} is not in (0, 1)")
            values["heldout_fraction"] = fraction
        if request.HasField("permutations"):
            limit = self.state.config.max_extract_permutations
            if not 0 <= request.permutations <= limit:
                raise invalid("permutations", f"{request.permutations} is out of range [0, {limit}] "
                                              "(max_extract_permutations)")
            values["permutations"] = request.permutations
        if request.HasField("seed"):
            if request.seed < 0:
                raise invalid("seed", f"{request.seed} is negative")
            values["seed"] = request.seed
        return ExtractionConfig(**values)

    def _maze_table(self, message) -> MazeTokenTable:
        """The token table of the requested maze classes, refused when the longest trajectory
        would not fit the engine's context."""
        config = maze_config(message, "maze")
        engine = self.state.engine
        try:
            table = MazeTokenTable.from_tokenizer(engine.tokenizer, config)
        except ValueError as error:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"this model cannot read maze prompts: {error}")
        longest = episode_context_tokens(table)
        if longest > engine.cfg.max_context_len:
            raise invalid("maze.episode_steps", f"a trajectory of {config.episode_steps} moves can reach {longest} "
                                                f"tokens, more than the engine's max_context_len="
                                                f"{engine.cfg.max_context_len}")
        return table

    def _contrast_prompts(self, message) -> tuple[list[list[int]], list[list[int]]]:
        """Each set's chats rendered by the tokenizer's template (a chat ending in a user turn gets
        the generation prompt), every one checked and named."""
        engine = self.state.engine
        out = []
        for set_name in CONTRAST_CLASSES:
            examples = getattr(message, set_name)
            if len(examples) < 2:
                raise invalid(f"contrast.{set_name}", f"{len(examples)} examples; at least 2 are needed (one held "
                                                      "out for the layer selection)")
            prompts = []
            for i, example in enumerate(examples):
                where = f"contrast.{set_name}[{i}].messages"
                if not example.messages:
                    raise invalid(where, "empty; at least one message is required")
                if len(example.messages) > engine.cfg.max_messages:
                    raise invalid(where, f"{len(example.messages)} messages, more than max_messages="
                                         f"{engine.cfg.max_messages}")
                for j, m in enumerate(example.messages):
                    if m.role not in ROLES:
                        raise invalid(f"{where}[{j}].role", f"{m.role!r} is not one of {list(ROLES)}")
                messages = [{"role": m.role, "content": m.content} for m in example.messages]
                try:
                    ids = render_chat(engine.tokenizer, messages, messages[-1]["role"] != "assistant")[0]
                except ValueError as error:
                    raise invalid(where, str(error)) from None
                except Exception as error:  # noqa: BLE001 - a template that raises on this chat
                    raise invalid(where, f"the chat template refuses it ({type(error).__name__}: {error})") from None
                if not 0 < len(ids) <= engine.cfg.max_context_len:
                    raise invalid(where, f"{len(ids)} tokens, more than the engine's max_context_len="
                                         f"{engine.cfg.max_context_len}")
                prompts.append(ids)
            out.append(prompts)
        return out[0], out[1]

    # ------------------------------------------------------------------ registry calls
    async def List(self, request, context):
        s = self.state
        async with served_call(s, "List", context) as call:
            registry = self._registry()
            metas = await asyncio.to_thread(
                registry.list, model_sha256=s.identity.weights_sha256 if request.this_model_only else None,
                name=request.name or None, method=request.method or None, skip_corrupt=True)
            call.log.update(count=len(metas))
            return vec.ListVectorsResponse(vectors=[meta_message(m) for m in metas])

    async def Get(self, request, context):
        async with served_call(self.state, "Get", context) as call:
            call.translate_args = dict(subject_is_record=True, field_map={"record_id": "id"})
            call.log.update(id=request.id)
            registry = self._registry()
            try:
                record = await asyncio.to_thread(registry.get, request.id)
            except CorruptRecord as error:  # the server's data, not the caller's field: DATA_LOSS
                raise translate(error) from None
            return vec.VectorRecord(meta=meta_message(record.meta), tensor=wire.from_torch(record.tensor))

    async def Put(self, request, context):
        s = self.state
        async with served_call(s, "Put", context) as call:
            registry = self._registry()
            if not request.HasField("tensor"):
                raise invalid("tensor", "unset")
            tensor = wire.to_torch(request.tensor, "tensor", s.config.max_tensor_elements)
            D = s.identity.hidden_size
            if tensor.dim() not in (1, 2) or tensor.shape[-1] != D:
                raise invalid("tensor.shape", f"{list(tensor.shape)}: expected [{D}] or [len(layers), {D}] (the "
                                              f"model's hidden size is {D})")
            layers = list(request.layers)
            if not layers:
                raise invalid("layers", "empty; name the decoder layer of each row")
            if tensor.dim() == 1:
                # As a steering term's inline [D]: the same vector at every named layer.
                tensor = tensor.unsqueeze(0).expand(len(layers), D)
            elif tensor.shape[0] != len(layers):
                raise invalid("layers", f"{len(layers)} layers for {tensor.shape[0]} rows (one layer per row)")
            point = wire.enum_value(wire.POINTS, request.point, "point", "Point")
            method = request.method or "put"
            name = request.name or method
            _check_record_name(name)
            _check_record_name(method, "method")
            record_id = await asyncio.to_thread(registry.put, tensor, model=s.identity, layers=layers,
                                                method=method, name=name, point=point)
            call.log.update(id=record_id)
            return vec.PutVectorResponse(id=record_id)

    async def Delete(self, request, context):
        async with served_call(self.state, "Delete", context) as call:
            call.translate_args = dict(subject_is_record=True, field_map={"record_id": "id"})
            call.log.update(id=request.id)
            await asyncio.to_thread(self._registry().delete, request.id)
            return vec.DeleteVectorResponse(deleted=True)

    async def Export(self, request, context):
        async with served_call(self.state, "Export", context) as call:
            # A record none of whose rows llama.cpp can steer is a refusal about the record asked for.
            call.translate_args = dict(subject_is_record=True, field_map={"record_id": "id", "coefficient": "scale"})
            call.log.update(id=request.id)
            registry = self._registry()
            scale = request.scale or 1.0
            if not math.isfinite(scale):
                raise invalid("scale", f"{scale} is not finite")

            def export() -> bytes:
                with tempfile.TemporaryDirectory(prefix="welfare-export-") as tmp:
                    path = Path(tmp) / "vector.gguf"
                    # Without a layer list, rows llama.cpp never steers (block_input 0 and 1) have no
                    # GGUF form and are left out; asked for by name, such a row is refused.
                    layers = list(request.layers) or None
                    export_record(registry, request.id, path, layers=layers, coefficient=scale,
                                  drop_unrepresentable=layers is None)
                    return path.read_bytes()

            try:
                data = await asyncio.to_thread(export)
            except CorruptRecord as error:  # the server's data, not the caller's field: DATA_LOSS
                raise translate(error) from None
            call.log.update(bytes=len(data))
            return vec.ExportVectorResponse(gguf=data)

    async def Import(self, request, context):
        s = self.state
        async with served_call(s, "Import", context) as call:
            registry = self._registry()
            if not request.gguf:
                raise invalid("gguf", "empty")
            _check_record_name(request.name)
            call.log.update(bytes=len(request.gguf))

            def load() -> str:
                with tempfile.TemporaryDirectory(prefix="welfare-import-") as tmp:
                    path = Path(tmp) / "upload.gguf"
                    path.write_bytes(request.gguf)
                    try:
                        return import_gguf_to_registry(registry, path, s.identity, name=request.name or "gguf_import")
                    except (InvalidRequest, RegistryError) as error:
                        # Whatever the file breaks (a tensor, a key, the hidden size) is in the bytes sent.
                        raise invalid("gguf", str(error)) from None

            record_id = await asyncio.to_thread(load)
            call.log.update(id=record_id)
            return vec.ImportVectorResponse(id=record_id)
