"""Engine: the scheduler of the generation loop (docs/engine.md describes one step).

The engine reuses the Hugging Face model's weights through the ModelAdapter (adapter.py) and runs
its own loop over its own KV cache (passes.py): embed -> per layer: the previous residual add,
steering at block input and the input RMSNorm in one pass -> attention over the cache -> residual
add and the MLP's norm in one pass -> MLP -> steer at block output -> final norm -> lm_head ->
sampling (sampling.py). There are no forward hooks on the hot path: steering and readings are Taps
(taps.py), and the decode step can be captured in a CUDA graph (graphs.py).

Scheduling: step() (1) runs queued session commands (open/fork/close from other threads),
(2) retires cancelled requests, (3) admits waiting requests into slots (in arrival order; one whose
vectors do not fit in the bank yet waits without holding up later requests that fit; a session's
turn reuses its session's slot), prefills them in padded groups, chunk by chunk
(EngineConfig.prefill_chunk_tokens), and samples their first token, (4) decodes one token for every
running request.

Concurrency: one thread owns the loop: the caller of step()/run_until_done()/generate(), or the
engine's own thread after start(). Any thread may submit(), cancel(), read a handle or its stream,
and call the session methods: submit() validates on the caller's thread (requests.prepare reads
engine state, never writes it) and appends to the waiting queue under a lock; cancel() only sets a
flag that the next step acts on; session commands run on the loop's thread between steps.

Weights: the engine reads the HF model's parameters in place (fused q/k/v and gate/up tensors,
whose HF parameters become views of them) and keeps packed copies on CPU (cpu_linear.py). A trainer
that updates the model's weights in place calls refresh_weights() between steps; the engine never
changes the weights itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from welfare_server.model.engine.adapter import ModelAdapter
from welfare_server.model.engine.config import EngineConfig
from welfare_server.model.engine.passes import CaptureTap, DecodeRow, ForwardPasses, PrefillRow
from welfare_server.model.engine.requests import (PreparedRequest, QueueFull, Request, RequestContext,
                                                  RequestOutput, RequestRefused, prepare)
from welfare_server.model.engine.sampling import SamplingRows, choose
from welfare_server.model.engine.sessions import Session, SessionTable
from welfare_server.model.engine.stream import EventBuffer, IncrementalText, StreamEvent, StreamOverflow
from welfare_server.model.fields import (InvalidRequest, check_bool, check_int, check_int_list, check_sequence,
                                         check_str, check_tensor)
from welfare_server.model.loading import LoadedModel
from welfare_server.model.steering import (GENERATED_ROLE, POINTS, ResolvedSteering, VectorBank,
                                           prompt_steer_mask, resolve_spec)

IDLE_WAIT_S = 0.05
"""How long the engine's own thread sleeps when it has no work, between checks for a stop."""


@dataclass
class CaptureResult:
    """Class statistics of the residual at each prompt's last token (Engine.capture)."""

    layers: list[int]
    sums: torch.Tensor
    """fp32 [len(layers), C, D] (or [len(layers), J, C, D] with J labellings)."""
    counts: torch.Tensor
    """int64 [C]: prompts per class (or [J, C])."""
    projections: torch.Tensor | None
    """fp32 [N, len(layers), P]: each prompt's last-token residual projected onto that layer's
    proj_vectors (in the order the prompts were given), or None."""

    @property
    def means(self) -> torch.Tensor:
        """fp32, the shape of sums (NaN for a class without examples)."""
        return (self.sums.double() / self.counts.double()[None, ..., None]).float()


class RequestHandle:
    """A submitted request: its id, whether it is done, its output (complete once done), its
    stream of events (Request.stream) and cancellation; usable from any thread."""

    def __init__(self, engine: "Engine", seq: "_Seq"):
        self._engine = engine
        self._seq = seq

    @property
    def request_id(self) -> str:
        return self._seq.output.request_id

    @property
    def done(self) -> bool:
        return self._seq.done.is_set()

    @property
    def output(self) -> RequestOutput:
        return self._engine._materialise(self._seq)

    def cancel(self) -> None:
        self._engine.cancel(self)

    def wait(self, timeout: float | None = None) -> RequestOutput:
        """The output once the request has finished (the engine must be running: start(), or
        another thread calling step())."""
        if not self._seq.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        return self.output

    def _buffer(self) -> EventBuffer:
        if self._seq.events is None:
            raise ValueError(f"request {self.request_id!r} was not submitted with stream=True")
        return self._seq.events

    def stream(self, timeout: float | None = None):
        """Yield the request's StreamEvents (blocking), the final one last. With no engine thread
        running, the loop is driven from here (step() between events)."""
        buffer = self._buffer()
        while True:
            if not self._engine._loop_running():
                while not buffer._events and self._engine.has_work():
                    self._engine.step()
            event = buffer.get(timeout)
            yield event
            if event.final:
                return

    async def astream(self):
        """Async iterator over the request's StreamEvents (the engine runs in its own thread)."""
        buffer = self._buffer()
        while True:
            event = await buffer.aget()
            yield event
            if event.final:
                return


@dataclass
class _Seq:
    prepared: PreparedRequest
    output: RequestOutput
    seed: int
    steering: ResolvedSteering | None = None
    slot: int = -1
    length: int = 0  # tokens in the cache
    next_token: int = -1
    feed: list[int] = field(default_factory=list)  # tokens the prefill writes (pending + new, per turn)
    feed_roles: list[str] | None = None
    allowed: torch.Tensor | None = None  # bool [V] on the device, or None
    monitor_ids: list[int] = field(default_factory=list)
    monitor_lp: list[tuple[int, int]] = field(default_factory=list)
    monitor_rows: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False
    admitted: bool = False
    events: EventBuffer | None = None
    text: IncrementalText | None = None
    """Incremental decode of the output (streamed requests and those with stop strings)."""
    stop_at: int | None = None
    """Where a stop string starts in the text, once one has appeared."""
    stop_scan: int = 0
    """Characters of the text already searched for stop strings."""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def request(self) -> Request:
        return self.prepared.request

    @property
    def session(self) -> Session | None:
        return self.prepared.session

    @property
    def prefill_only(self) -> bool:
        return self.request.sampling.max_new_tokens == 0


class Engine:
    """Continuous-batching generation with per-request steering, streaming and multi-turn
    sessions. See the module docstring."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.cfg = cfg = config or EngineConfig()
        if not isinstance(cfg, EngineConfig):
            raise ValueError(f"Engine: config is a {type(cfg).__name__}, expected an EngineConfig")
        self.loaded = loaded
        self.device, self.dtype = loaded.device, loaded.dtype
        self.adapter = ModelAdapter(loaded.model, max_positions=cfg.max_context_len, dtype=self.dtype,
                                    device=self.device, fuse_weights=cfg.fuse_weights, cpu_prepack=cfg.cpu_prepack)
        self.bank = VectorBank(cfg.max_bank_vectors, self.adapter.D, self.device)
        self.monitor_bank = VectorBank(cfg.max_monitor_vectors, self.adapter.D, self.device,
                                       limit_name="max_monitor_vectors")
        self.passes = ForwardPasses(self.adapter, cfg, self.bank, self.monitor_bank)
        S = cfg.max_batch_slots
        self._free_slots = list(range(S - 1, -1, -1))
        self._slots: list[_Seq | None] = [None] * S
        self._waiting: list[_Seq] = []
        self._lock = threading.Lock()  # guards the queue, live ids and sessions against other threads
        self._wakeup = threading.Condition(self._lock)
        self._commands: list[tuple[Callable, Future]] = []
        self._live_ids: set[str] = set()
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(cfg.seed)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self.sessions = SessionTable(cfg.max_sessions, cfg.max_session_tokens, cfg.session_policy,
                                     tombstones=max(1, cfg.max_sessions) * 4)
        try:
            tok = loaded.tokenizer
        except Exception:  # noqa: BLE001 - a model without tokenizer still generates token ids
            tok = None
        self.tokenizer = tok
        model = loaded.model
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._context = RequestContext(config=cfg, num_layers=self.adapter.L, vocab=self.adapter.vocab,
                                       bank=self.bank, monitor_bank=self.monitor_bank, tokenizer=tok,
                                       eos_ids=self.eos_ids, live_request_ids=self._live_ids, sessions=self.sessions)

    # ------------------------------------------------------------------ model facts
    @property
    def layers(self):
        return self.adapter.layers

    @property
    def L(self) -> int:
        return self.adapter.L

    @property
    def D(self) -> int:
        return self.adapter.D

    @property
    def vocab(self) -> int:
        return self.adapter.vocab

    # ------------------------------------------------------------------ public API
    def refresh_weights(self) -> None:
        """Re-read the model's weights into the engine's packed CPU copies (cpu_linear.py); call
        it after changing the model's weights in place (the packed copies are snapshots)."""
        self.adapter.refresh_weights()

    def register_vector(self, vector: torch.Tensor) -> int:
        """Put a persistent vector in the bank; returns the id SteeringTerm.vector may use."""
        return self.bank.add(vector)

    def remove_vector(self, idx: int) -> None:
        self.bank.release(idx)

    def submit(self, request: Request) -> RequestHandle:
        """Validate and queue a request (from any thread). Raises RequestRefused / SteeringError,
        naming the field, when it is invalid or can never run under the configured limits; a
        refused request leaves the engine unchanged."""
        return self._enqueue([self._prepare(request)])[0]

    def _prepare(self, request: Request) -> PreparedRequest:
        if self._failure is not None:
            raise RequestRefused(f"engine: stopped after an internal error ({self._failure!r})")
        with self._lock:  # sessions' state is read consistently with the loop's updates
            return prepare(request, self._context)

    def cancel(self, handle: RequestHandle) -> None:
        """Mark a request cancelled (from any thread); its slot is freed at the start of the next step."""
        handle._seq.cancelled = True

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_running > 0 or bool(self._commands)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the outputs of requests finished during it."""
        self._run_commands()
        finished: list[_Seq] = []
        with self._lock:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                finished.append(seq)
        for seq in finished:
            self._finish(seq, "cancelled")
        for seq in self._slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, "cancelled")
                finished.append(seq)
        new = self._admit()
        if new:
            budget = self.cfg.max_prefill_tokens
            group: list[_Seq] = []
            for seq in sorted(new, key=lambda s: len(s.feed)):
                longest = max([len(s.feed) for s in group] + [len(seq.feed)])
                if group and longest * (len(group) + 1) > budget:
                    finished += self._prefill(group)
                    group = []
                group.append(seq)
            finished += self._prefill(group)
        running = [s for s in self._slots if s is not None and s.output.finish_reason is None]
        if running:
            finished += self._decode(running)
        return [self._materialise(s) for s in finished]

    def run_until_done(self, max_steps: int | None = None) -> None:
        steps = 0
        while self.has_work():
            self.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Run these requests to completion. Every request is validated before any is queued: one
        refusal leaves the engine as it found it (nothing of this call is left queued)."""
        if not isinstance(requests, (list, tuple)):
            raise RequestRefused(f"requests: a {type(requests).__name__}, expected a list of Request")
        ids = [r.request_id for r in requests if isinstance(r, Request) and r.request_id is not None]
        if len(ids) != len(set(ids)):
            raise RequestRefused("request.request_id: the same id is given to two requests of this call")
        sessions = [r.session_id for r in requests if isinstance(r, Request) and r.session_id is not None]
        if len(sessions) != len(set(sessions)):
            raise RequestRefused("request.session_id: one session is given two turns in this call")
        prepared = []
        for i, request in enumerate(requests):
            try:
                prepared.append(self._prepare(request))
            except InvalidRequest as error:
                raise type(error)(f"requests[{i}].{error}") from None
        handles = self._enqueue(prepared)
        if self._loop_running():
            return [h.wait() for h in handles]
        self.run_until_done()
        return [h.output for h in handles]

    def _enqueue(self, prepared: list[PreparedRequest]) -> list[RequestHandle]:
        with self._lock:
            if len(self._waiting) + len(prepared) > self.cfg.max_waiting:
                raise QueueFull(f"queue full: max_waiting={self.cfg.max_waiting} requests already waiting",
                                field="max_waiting")
            for p in prepared:  # re-checked under the lock: another thread may have taken them
                if p.request.request_id is not None and p.request.request_id in self._live_ids:
                    raise RequestRefused(f"request.request_id: {p.request.request_id!r} is already used by a "
                                         "live request")
                if p.session is not None and (p.session.busy is not None
                                              or self.sessions.sessions.get(p.session.session_id) is not p.session):
                    raise RequestRefused(f"request.session_id: session {p.session.session_id!r} is busy or was "
                                         "closed meanwhile")
            handles = []
            for p in prepared:
                sp = p.request.sampling
                rid = p.request.request_id or f"req-{next(self._ids)}"
                seed = sp.seed if sp.seed is not None else int(
                    torch.randint(0, 2**62, (1,), generator=self._seed_rng))
                output = RequestOutput(rid, list(p.prompt_ids), logprobs=[] if sp.logprobs else None,
                                       masked_logprobs=[] if sp.logprobs and p.allowed_ids is not None else None,
                                       scores=[] if p.score_ids is not None else None)
                seq = _Seq(prepared=p, output=output, seed=seed)
                if p.request.stream:
                    seq.events = EventBuffer(self.cfg.max_stream_events)
                if p.request.stream or sp.stop_strings:
                    seq.text = IncrementalText(self.tokenizer, sp.stop_strings)
                if p.session is not None:
                    p.session.busy = rid
                    self.sessions.touch(p.session)
                self._waiting.append(seq)
                self._live_ids.add(rid)
                handles.append(RequestHandle(self, seq))
            self._wakeup.notify_all()
            return handles

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str | None = None, *, pinned: bool = False) -> str:
        """Open an empty session (from any thread); returns its id. Its first request's prompt
        starts the conversation. Refused at max_sessions under session_policy "refuse"; under
        "evict_lru" the least recently used idle session that is not pinned is closed to make
        room. A pinned session is never evicted (close it when done)."""
        if session_id is not None:
            check_str(session_id, "session_id", RequestRefused, max_len=self.cfg.max_request_id_chars)
        check_bool(pinned, "pinned", RequestRefused)
        return self._on_loop(lambda: self._open_session(session_id, pinned))

    def fork_session(self, source: str, count: int = 1) -> list[str]:
        """Copy an idle session into `count` new sessions (their caches copied, so the shared
        prefix is never prefilled again; pinned if the source is); returns their ids."""
        check_str(source, "source", RequestRefused)
        check_int(count, "count", RequestRefused, 1, self.cfg.max_batch_slots)
        return self._on_loop(lambda: self._fork_session(source, count))

    def close_session(self, session_id: str) -> None:
        """Close a session and free its cache slot at once (a turn still running in it is
        cancelled first). Closing an evicted session only forgets that it was evicted."""
        check_str(session_id, "session_id", RequestRefused)
        self._on_loop(lambda: self._close_session(session_id))

    def session_history(self, session_id: str) -> list[int]:
        """Every token of the session so far (its prompts and generated tokens)."""
        with self._lock:
            return list(self.sessions.lookup(session_id, "session_id").history)

    def _open_session(self, session_id, pinned: bool):
        if session_id is None:
            session_id = self.sessions.new_id()
        elif session_id in self.sessions.sessions:
            raise RequestRefused(f"session_id: {session_id!r} is already open")
        self._make_room_for_sessions(1, "max_sessions")
        with self._lock:
            return self.sessions.add(session_id, pinned).session_id

    def _fork_session(self, source, count):
        src = self.sessions.lookup(source, "source")
        if src.busy is not None:
            raise RequestRefused(f"source: session {source!r} is busy with request {src.busy!r}")
        self._make_room_for_sessions(count, "max_sessions", keep=(source,))
        need_slots = count if src.length else 0
        self._make_room_for_slots(need_slots, keep=(source,), refuse=True)
        ids = []
        for _ in range(count):
            with self._lock:
                fork = self.sessions.add(self.sessions.new_id(), src.pinned)
            fork.length, fork.pending, fork.pending_role = src.length, src.pending, src.pending_role
            fork.history = list(src.history)
            if src.length:
                fork.slot = self._free_slots.pop()
                self.passes.copy_cache(src.slot, fork.slot, src.length)
            ids.append(fork.session_id)
        return ids

    def _close_session(self, session_id):
        with self._lock:
            session = self.sessions.sessions.get(session_id)
            if session is None:
                if self.sessions.forget_tombstone(session_id):
                    return
                self.sessions.lookup(session_id, "session_id")  # raises: unknown
        if session.busy is not None:
            for seq in self._slots + self._waiting:
                if seq is not None and seq.session is session:
                    self._finish(seq, "cancelled")
        with self._lock:
            self.sessions.remove(session_id)
        self._release_slot(session.slot)

    def _make_room_for_sessions(self, n: int, limit: str, keep=()) -> None:
        table = self.sessions
        while len(table.sessions) + n > table.max_sessions:
            victims = table.idle_lru(exclude=keep) if table.policy == "evict_lru" else []
            if not victims:
                raise RequestRefused(f"{limit}: {len(table.sessions)} sessions are open, the limit is "
                                     f"max_sessions={table.max_sessions}")
            self._evict(victims[0], f"evicted (least recently used) when max_sessions={table.max_sessions} was reached")

    def _make_room_for_slots(self, n: int, keep=(), refuse: bool = False) -> bool:
        """Free slots for n rows, evicting idle sessions under "evict_lru"; False if impossible
        (or, with refuse, RequestRefused)."""
        while len(self._free_slots) < n:
            victims = [s for s in self.sessions.idle_lru(exclude=keep) if s.slot >= 0]
            if self.sessions.policy != "evict_lru" or not victims:
                if refuse:
                    raise RequestRefused(f"count: {n} new sessions need {n} free cache slots, "
                                         f"{len(self._free_slots)} are free (max_batch_slots="
                                         f"{self.cfg.max_batch_slots})")
                return False
            self._evict(victims[0], "evicted (least recently used) to free a cache slot for another request")
        return True

    def _evict(self, session: Session, why: str) -> None:
        with self._lock:
            self.sessions.mark_evicted(session.session_id, why)
        self._release_slot(session.slot)

    def _release_slot(self, slot: int) -> None:
        if slot >= 0:
            self._free_slots.append(slot)
            self._free_slots.sort(reverse=True)  # lowest slot first keeps the batch dense

    # ------------------------------------------------------------------ activation capture
    def capture(self, prompts: Sequence[Sequence[int]], labels, num_classes: int, *,
                layers: Sequence[int] | None = None, point: str = "block_input",
                proj_vectors: torch.Tensor | None = None, on_progress: Callable[[int], None] | None = None
                ) -> CaptureResult:
        """Class sums of the residual at each prompt's last token, at `point` of every layer in
        `layers` (default: all): prompts are prefilled through the engine's own passes in length-
        sorted groups (no logits, nothing sampled, no activation kept: memory does not grow with
        the number of prompts). labels: [N] classes in [-1, num_classes) (-1: prefilled, not
        counted), or [N, J]: J labellings accumulated at once (e.g. the true one and J - 1 label
        permutations). proj_vectors [len(layers), P, D]: also each prompt's projections onto its
        layer's vectors. Runs between steps on the loop's thread, in cache slots no request holds."""
        cfg, L = self.cfg, self.L
        prompts = check_sequence(prompts, "prompts", RequestRefused, what="prompts", nonempty=True)
        prompts = [check_int_list(p, f"prompts[{i}]", RequestRefused, lo=0, hi=self.vocab - 1, what="token ids",
                                  max_len=cfg.max_context_len, limit_name="max_context_len", nonempty=True)
                   for i, p in enumerate(prompts)]
        num_classes = check_int(num_classes, "num_classes", RequestRefused, 1)
        rows = check_sequence(labels, "labels", RequestRefused, what="labels")
        if len(rows) != len(prompts):
            raise RequestRefused(f"labels: {len(rows)} labels for {len(prompts)} prompts")
        single = not isinstance(rows[0], (list, tuple))
        if single:
            table = [[c] for c in check_int_list(rows, "labels", RequestRefused, lo=-1, hi=num_classes - 1)]
        else:
            table = [check_int_list(r, f"labels[{i}]", RequestRefused, lo=-1, hi=num_classes - 1,
                                    what="labels", nonempty=True) for i, r in enumerate(rows)]
        if len({len(r) for r in table}) != 1:
            raise RequestRefused("labels: every prompt needs the same number of labellings")
        layers = list(range(L)) if layers is None else check_int_list(
            layers, "layers", RequestRefused, lo=0, hi=L - 1, what="layer indices", nonempty=True)
        check_str(point, "point", RequestRefused, choices=list(POINTS))
        if proj_vectors is not None:
            check_tensor(proj_vectors, "proj_vectors", RequestRefused, shape=(len(layers), None, self.D),
                         what=f"[{len(layers)}, P, {self.D}]")
        result = self._capture(prompts, table, num_classes, layers, POINTS[point], proj_vectors, on_progress)
        if single:
            result.sums, result.counts = result.sums[:, 0], result.counts[0]
        return result

    def _capture(self, prompts, labels, num_classes, layers, point, proj_vectors, on_progress) -> CaptureResult:
        """One loop command per group of prompts, so a long capture interleaves with serving: the
        requests running meanwhile get a step between any two groups."""
        dev, C, J = self.device, num_classes, len(labels[0])
        tap = CaptureTap(layers=layers, point=point, num_classes=C,
                         sums={l: torch.zeros(J * C, self.D, dtype=torch.float32, device=dev) for l in layers},
                         counts={l: torch.zeros(J * C, dtype=torch.int64, device=dev) for l in layers},
                         proj_vectors=None if proj_vectors is None else {
                             l: proj_vectors[j].to(dev, torch.float32) for j, l in enumerate(layers)})
        P = 0 if proj_vectors is None else proj_vectors.shape[1]
        projections = None if proj_vectors is None else torch.zeros(len(prompts), len(layers), P)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        done = 0
        while done < len(order):
            group = self._on_loop(lambda: self._capture_group(prompts, labels, order, done, tap, projections))
            done += group
            if on_progress is not None:
                on_progress(done)
        return CaptureResult(layers=layers,
                             sums=torch.stack([tap.sums[l].view(J, C, self.D) for l in layers]).cpu(),
                             counts=tap.counts[layers[0]].view(J, C).cpu(), projections=projections)

    def _capture_group(self, prompts, labels, order, position, tap: CaptureTap, projections) -> int:
        """Prefill the next length-sorted group of prompts in free slots (as many as fit the slots
        and max_prefill_tokens) with the capture tap; returns how many it took."""
        self._make_room_for_slots(1, keep=self._busy_sessions())
        slots = list(self._free_slots)
        if not slots:
            raise RequestRefused("capture: every cache slot is held by running requests or sessions")
        group = [order[position]]
        while (position + len(group) < len(order) and len(group) < len(slots)
               and len(prompts[order[position + len(group)]]) * (len(group) + 1) <= self.cfg.max_prefill_tokens):
            group.append(order[position + len(group)])
        rows = [PrefillRow(slot, 0, prompts[i], torch.zeros(len(prompts[i]), dtype=torch.bool),
                           labels=tuple(labels[i])) for slot, i in zip(slots, group)]
        with torch.inference_mode():
            _, readings = self.passes.prefill(rows, tap)
        if projections is not None:
            for j, layer in enumerate(tap.layers):
                projections[group, j] = readings[("capture", layer)].float().cpu()
        return len(group)

    # ------------------------------------------------------------------ the loop's own thread
    def start(self) -> None:
        """Run the loop in a thread of its own (idempotent); submit/stream/wait from any thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="welfare-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop's thread after its current step (requests stay queued or running)."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def _loop_running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and threading.current_thread() is not thread

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    if not (self._waiting or self._commands or self.num_running):
                        self._wakeup.wait(IDLE_WAIT_S)
                        continue
                self.step()
        except BaseException as error:  # noqa: BLE001 - every waiting client must learn of it
            self._failure = error
            for seq in [s for s in self._slots if s is not None] + list(self._waiting):
                self._finish(seq, "error", f"engine error: {error!r}")
            with self._lock:
                for _, future in self._commands:
                    future.set_exception(error)
                self._commands.clear()
            raise

    def _on_loop(self, fn: Callable):
        """Run fn on the loop's thread (now, when this thread is the loop's)."""
        if not self._loop_running():
            with torch.inference_mode():
                return fn()
        future: Future = Future()
        with self._lock:
            self._commands.append((fn, future))
            self._wakeup.notify_all()
        return future.result()

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, future in commands:
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                future.set_exception(error)

    # ------------------------------------------------------------------ admission
    def _admit(self) -> list[_Seq]:
        new = []
        # In arrival order, but a request whose vectors do not fit in the bank now does not hold
        # up the ones behind it: it waits for running requests (or the removal of persistent
        # vectors) to free slots, while later requests that fit are admitted.
        position = 0
        while position < len(self._waiting):
            with self._lock:
                seq = self._waiting[position]
            p = seq.prepared
            session = seq.session
            needs_slot = session is None or session.slot < 0
            if p.new_vectors > self.bank.num_free or p.monitor_vectors > self.monitor_bank.num_free:
                position += 1
                continue
            if needs_slot and not self._free_slots and not self._make_room_for_slots(1, keep=self._busy_sessions()):
                position += 1
                continue
            if session is not None and self.sessions.policy == "evict_lru":
                self._make_room_for_tokens(session, len(p.prompt_ids) + p.request.sampling.max_new_tokens)
            with self._lock:
                self._waiting.pop(position)
            seq.slot = self._free_slots.pop() if needs_slot else session.slot
            self._slots[seq.slot] = seq
            seq.admitted = True
            self._start(seq)
            new.append(seq)
        return new

    def _busy_sessions(self) -> tuple[str, ...]:
        return tuple(sid for sid, s in self.sessions.sessions.items() if s.busy is not None)

    def _make_room_for_tokens(self, session: Session, growth: int) -> None:
        limit = self.cfg.max_session_tokens
        while self.sessions.cached_tokens() + session.tokens + growth - session.length > limit:
            victims = [s for s in self.sessions.idle_lru(exclude=(session.session_id,))]
            if not victims:
                return  # only busy sessions left: they are evicted once idle, if still over
            self._evict(victims[0], f"evicted (least recently used) when max_session_tokens={limit} was reached")

    def _start(self, seq: _Seq) -> None:
        """Set an admitted request up in its slot: steering terms, monitors, allowed tokens, and the
        tokens its prefill writes (a session's pending token first)."""
        req, p = seq.request, seq.prepared
        seq.steering = resolve_spec(req.steering, self.L, self.cfg.max_terms_per_row, self.bank)
        self.passes.set_terms(seq.slot, seq.steering)
        if req.monitor is not None:
            seq.monitor_ids = [self.monitor_bank.place(v) for v in req.monitor.vectors]
            point = POINTS[req.monitor.point]
            seq.monitor_lp = [(l % self.L, point) for l in req.monitor.layers]
        if p.allowed_ids is not None:
            allowed = torch.zeros(self.vocab, dtype=torch.bool)
            allowed[p.allowed_ids] = True
            seq.allowed = allowed.to(self.device)
        roles = p.roles
        if roles is None and seq.session is not None:
            roles = ["user"] * len(p.prompt_ids)
        seq.feed, seq.feed_roles, seq.length = list(p.prompt_ids), roles, 0
        session = seq.session
        if session is not None:
            seq.length = session.length
            if session.pending is not None:
                seq.feed = [session.pending] + seq.feed
                seq.feed_roles = [session.pending_role] + roles

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        if seq.done.is_set():
            return
        out = seq.output
        out.finish_reason = reason
        out.error = error
        slot = seq.slot
        if slot >= 0:
            self.passes.clear_terms(slot)
            self._slots[slot] = None
            if seq.session is None:
                self._release_slot(slot)
            seq.slot = -1
        else:
            with self._lock:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        if seq.steering is not None:
            for idx in seq.steering.owned_ids:
                self.bank.release(idx)
            seq.steering.owned_ids = []
        for idx in seq.monitor_ids:
            self.monitor_bank.release(idx)
        seq.monitor_ids = []
        self._final_text(seq)
        with self._lock:
            self._live_ids.discard(out.request_id)
            if seq.session is not None:
                self._keep_turn(seq, slot)
        if seq.events is not None:
            delta = seq.text.finish(out.text) if seq.text is not None else ""
            seq.events.put(StreamEvent(out.request_id, text=delta, final=True, finish_reason=reason,
                                       prompt_tokens=len(out.prompt_ids), completion_tokens=len(out.token_ids),
                                       error=error))
        seq.done.set()

    def _keep_turn(self, seq: _Seq, slot: int) -> None:
        """A session's turn ended: the session keeps what this turn cached (nothing if it never
        ran) and its last token as pending. Called under the lock."""
        session = seq.session
        session.busy = None
        self.sessions.touch(session)
        if not seq.admitted:  # cancelled while waiting: the session is as it was
            return
        session.slot = slot
        if seq.prefill_only:
            session.length = seq.length
            session.pending, session.pending_role = seq.feed[-1], seq.feed_roles[-1]
        elif seq.output.token_ids:
            session.length = seq.length
            session.pending, session.pending_role = seq.output.token_ids[-1], GENERATED_ROLE
        session.history += seq.prepared.prompt_ids + seq.output.token_ids

    def _final_text(self, seq: _Seq) -> None:
        """The output's text: cut at the stop string that ended it, else the decode of every token."""
        out = seq.output
        if self.tokenizer is None or seq.stop_at is not None:
            return
        out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True) if out.token_ids else ""

    def _materialise(self, seq: _Seq) -> RequestOutput:
        out = seq.output
        if seq.monitor_rows and (out.monitor is None or out.monitor.shape[0] != len(seq.monitor_rows)):
            out.monitor = torch.stack(seq.monitor_rows)
        return out

    # ------------------------------------------------------------------ passes
    def _prefill(self, seqs: list[_Seq]) -> list[_Seq]:
        """Prefill newly admitted requests and sample their first token (prefill-only turns of a
        session write all but their last token, which the session keeps pending)."""
        work = []  # (seq, row) for every seq with tokens to write
        for s in seqs:
            ids = s.feed[:-1] if s.prefill_only else s.feed
            if ids:
                roles = s.feed_roles[:len(ids)] if s.feed_roles is not None else None
                mask = prompt_steer_mask(s.steering.scope, roles, len(ids))
                work.append((s, PrefillRow(s.slot, s.length, ids, mask, s.monitor_lp)))
        finished = []
        if work:
            last_h, last_mon = self.passes.prefill([row for _, row in work])
            for s, row in work:
                s.length += len(row.ids)
            keep = [i for i, (s, _) in enumerate(work) if not s.prefill_only]
            if keep:
                at = torch.tensor(keep, device=self.device)
                logits = self.adapter.logits(last_h[at])
                finished += self._sample_and_advance([work[i][0] for i in keep], logits,
                                                     {k: v[at] for k, v in last_mon.items()})
        for s in seqs:
            if s.prefill_only:
                self._finish(s, "length")
                finished.append(s)
        return finished

    def _decode(self, seqs: list[_Seq]) -> list[_Seq]:
        rows = [DecodeRow(s.slot, s.length, s.next_token, s.monitor_lp) for s in seqs]
        logits, mon_out = self.passes.decode(rows)
        for s in seqs:
            s.length += 1
        return self._sample_and_advance(seqs, logits, mon_out)

    def warmup(self, batch_sizes: Sequence[int] | None = None, ctx: int | None = None) -> float:
        """Capture decode graphs ahead of traffic for every context bucket up to `ctx` tokens
        (default: the first bucket), with and without block-input steering; returns seconds
        spent. No-op off CUDA. Refused while requests run (their rows would be written)."""
        passes = self.passes
        if not passes.use_graphs:
            return 0.0
        if self.num_running:
            raise RuntimeError("Engine.warmup: call it before traffic (requests are running)")
        t0 = time.perf_counter()
        passes.pos_buf.fill_(self.cfg.max_context_len - 1)  # idle rows: see passes._decode_static
        top = passes.ctx_bucket(ctx or self.cfg.graph_ctx_bucket)
        ctxs = sorted({passes.ctx_bucket(n) for n in range(1, top + 1, self.cfg.graph_ctx_bucket)} | {top})
        with torch.inference_mode():
            for b in batch_sizes or [b for b in self.cfg.graph_batch_buckets if b <= self.cfg.max_batch_slots]:
                for c in ctxs:
                    for steer_in in (False, True):
                        passes.graphs.run((passes.bucket(b), c, steer_in, False))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ sampling
    def _sampling_rows(self, seqs: list[_Seq], dev) -> SamplingRows:
        sps = [s.request.sampling for s in seqs]
        rows = SamplingRows(
            temperature=torch.tensor([float(sp.temperature) for sp in sps], device=dev),
            top_k=torch.tensor([sp.top_k for sp in sps], dtype=torch.int64, device=dev),
            top_p=torch.tensor([float(sp.top_p) for sp in sps], device=dev),
            seed=torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
            step=torch.tensor([len(s.output.token_ids) for s in seqs], dtype=torch.int64, device=dev),
            all_greedy=all(sp.temperature == 0 for sp in sps),
            any_filter=any(sp.top_k > 0 or sp.top_p < 1.0 for sp in sps),
            want_logprobs=any(sp.logprobs for sp in sps))
        if any(s.allowed is not None for s in seqs):
            everything = torch.ones(self.vocab, dtype=torch.bool, device=dev)
            rows.allowed = torch.stack([everything if s.allowed is None else s.allowed for s in seqs])
        return rows

    def _sample_and_advance(self, seqs: list[_Seq], logits: torch.Tensor, mon_out: dict) -> list[_Seq]:
        choice = choose(logits, self._sampling_rows(seqs, logits.device))
        tokens = choice.tokens.tolist()  # the step's one host sync
        lp = choice.logprob.tolist() if choice.logprob is not None else None
        masked_lp = choice.masked_logprob.tolist() if choice.masked_logprob is not None else None
        mon_host = {k: v.cpu() for k, v in mon_out.items()}
        scores = self._scores(seqs, logits)
        finished = []
        for b, (s, tok) in enumerate(zip(seqs, tokens)):
            out = s.output
            out.token_ids.append(tok)
            if out.scores is not None:
                out.scores.append(scores[b])
            if out.logprobs is not None:
                out.logprobs.append(lp[b])
            if out.masked_logprobs is not None:
                out.masked_logprobs.append(masked_lp[b])
            row = None
            if s.monitor_lp:
                row = torch.stack([mon_host[key][b, s.monitor_ids] for key in s.monitor_lp])
                s.monitor_rows.append(row)
            s.next_token = tok
            sp = s.request.sampling
            reason = None
            if s.text is not None:
                s.text.add(tok)
            if tok in s.prepared.stop_ids:
                reason = "stop"
            elif sp.stop_strings and s.text is not None:
                hit = self._stop_hit(s)
                if hit is not None:
                    out.text = s.text.text[:hit]
                    s.stop_at = hit
                    reason = "stop"
            if reason is None and len(out.token_ids) >= sp.max_new_tokens:
                reason = "length"
            if s.events is not None and reason is None:
                try:
                    s.events.put(StreamEvent(out.request_id, token_id=tok, text=s.text.delta(),
                                             logprob=None if lp is None else lp[b],
                                             masked_logprob=None if masked_lp is None else masked_lp[b],
                                             monitor=row, scores=scores[b] if scores else None))
                except StreamOverflow:
                    reason = "error"
            if s.events is not None and reason is not None and reason != "error":
                # The last token's event carries no text: the final event releases the rest.
                s.events.put(StreamEvent(out.request_id, token_id=tok, logprob=None if lp is None else lp[b],
                                         masked_logprob=None if masked_lp is None else masked_lp[b], monitor=row,
                                         scores=scores[b] if scores else None))
            if reason is not None:
                error = None
                if reason == "error":
                    error = (f"stream consumer fell behind: more than max_stream_events="
                             f"{self.cfg.max_stream_events} undelivered events")
                self._finish(s, reason, error)
                finished.append(s)
        return finished

    @staticmethod
    def _scores(seqs: list[_Seq], logits: torch.Tensor) -> list[list[float] | None] | None:
        """Per row, the raw log-probabilities of its score_token_ids (one log_softmax for the rows
        that ask)."""
        wanted = [b for b, s in enumerate(seqs) if s.prepared.score_ids is not None]
        if not wanted:
            return None
        log_probs = logits[torch.tensor(wanted, device=logits.device)].log_softmax(-1)
        scores: list[list[float] | None] = [None] * len(seqs)
        for j, b in enumerate(wanted):
            ids = torch.tensor(seqs[b].prepared.score_ids, device=logits.device)
            scores[b] = log_probs[j, ids].tolist()
        return scores

    @staticmethod
    def _stop_hit(s: _Seq) -> int | None:
        """Where the first stop string starts in the decoded text, looking only where a new one
        can be (the tail the last token added, plus the longest stop string's length)."""
        text = s.text.text
        longest = max(len(st) for st in s.request.sampling.stop_strings)
        begin = max(0, s.stop_scan - longest)
        hits = [text.find(st, begin) for st in s.request.sampling.stop_strings]
        s.stop_scan = len(text)
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None
