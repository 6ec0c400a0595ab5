"""Engine: the scheduler, the KV cache and the decode loop (docs/engine.md describes one step).

The engine reuses the Hugging Face model's weights through the ModelAdapter (adapter.py) and runs
its own loop: embed -> per layer: the previous residual add, steering at block input and the input
RMSNorm in one pass -> attention over the engine's KV cache -> residual add and the MLP's norm in
one pass -> MLP -> steer at block output -> final norm -> lm_head -> sampling. There are no
forward hooks on the hot path: steering and readings are Taps (taps.py), and the decode step can
be captured in a CUDA graph (graphs.py).

Scheduling: step() (1) retires cancelled requests, (2) admits waiting requests into free slots (in
arrival order; one whose vectors do not fit in the bank yet waits without holding up later requests
that fit), prefills them in padded groups, chunk by chunk along the prompt
(EngineConfig.prefill_chunk_tokens), and samples their first token, (3) decodes one token for
every running request.

Concurrency: one thread owns the loop (calls step / run_until_done / generate); any thread may
submit and cancel. submit() validates on the caller's thread (requests.prepare reads engine state,
never writes it) and then appends to the waiting queue under a lock; cancel() only sets a flag that
the next step acts on.

Weights: the engine reads the HF model's parameters in place (fused q/k/v and gate/up tensors,
whose HF parameters become views of them) and keeps packed copies on CPU (cpu_linear.py). A trainer
that updates the model's weights in place calls refresh_weights() before the next step; the
engine never changes the weights itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from welfare_server.model.engine.adapter import ModelAdapter
from welfare_server.model.engine.attention import additive_mask, attends, gqa_attention, slot_rows
from welfare_server.model.engine.config import EngineConfig
from welfare_server.model.engine.graphs import GraphCache
from welfare_server.model.engine.requests import (PreparedRequest, Request, RequestContext, RequestOutput,
                                                  RequestRefused, prepare)
from welfare_server.model.engine.sampling import SamplingRows, choose
from welfare_server.model.engine.taps import Taps, projection_observer
from welfare_server.model.fields import InvalidRequest
from welfare_server.model.loading import LoadedModel
from welfare_server.model.steering import (BLOCK_INPUT, BLOCK_OUTPUT, POINTS, ResolvedSteering, VectorBank,
                                           prompt_steer_mask, resolve_spec, token_term_tables)


class RequestHandle:
    """A submitted request: its id, whether it is done, its output (complete once done)."""

    def __init__(self, engine: "Engine", seq: "_Seq"):
        self._engine = engine
        self._seq = seq

    @property
    def request_id(self) -> str:
        return self._seq.output.request_id

    @property
    def done(self) -> bool:
        return self._seq.output.finish_reason is not None

    @property
    def output(self) -> RequestOutput:
        return self._engine._materialise(self._seq)

    def cancel(self) -> None:
        self._engine.cancel(self)


@dataclass
class _Seq:
    prepared: PreparedRequest
    output: RequestOutput
    seed: int
    steering: ResolvedSteering | None = None
    slot: int = -1
    length: int = 0  # tokens in the cache
    next_token: int = -1
    allowed: torch.Tensor | None = None  # bool [V] on the device, or None
    monitor_ids: list[int] = field(default_factory=list)
    monitor_lp: list[tuple[int, int]] = field(default_factory=list)
    monitor_rows: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False

    @property
    def request(self) -> Request:
        return self.prepared.request

    @property
    def prompt_ids(self) -> list[int]:
        return self.prepared.prompt_ids


class Engine:
    """Continuous-batching generation with per-request steering. See the module docstring."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.cfg = cfg = config or EngineConfig()
        if not isinstance(cfg, EngineConfig):
            raise ValueError(f"Engine: config is a {type(cfg).__name__}, expected an EngineConfig")
        self.loaded = loaded
        self.device, self.dtype = loaded.device, loaded.dtype
        self.adapter = ModelAdapter(loaded.model, max_positions=cfg.max_context_len, dtype=self.dtype,
                                    device=self.device, fuse_weights=cfg.fuse_weights, cpu_prepack=cfg.cpu_prepack)
        ad = self.adapter
        l0 = ad.layers[0]
        S, T = cfg.max_batch_slots, cfg.max_context_len
        dev = self.device
        # KV cache [L, S, kv_heads, T, head_dim]: all memory the engine will ever use for it.
        self.k_cache = torch.zeros(ad.L, S, l0.n_kv, T, l0.head_dim, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        # Vector banks and per-slot term tables (fixed buffers: graphs read their addresses).
        self.bank = VectorBank(cfg.max_bank_vectors, ad.D, dev)
        self.monitor_bank = VectorBank(cfg.max_monitor_vectors, ad.D, dev, limit_name="max_monitor_vectors")
        NT = cfg.max_terms_per_row
        self.tv = torch.full((ad.L, 2, S, NT), -1, dtype=torch.int32, device=dev)
        self.tc = torch.zeros((ad.L, 2, S, NT), dtype=torch.float32, device=dev)
        self.tm = torch.zeros((ad.L, 2, S, NT), dtype=torch.int32, device=dev)
        self._slot_width = torch.zeros((S, ad.L, 2), dtype=torch.int64)  # host copy: terms per slot
        # Static-step input buffers.
        self.ids_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.use_graphs = cfg.use_cuda_graphs and dev.type == "cuda"
        self._graphs = GraphCache(self._static_step)
        self.static = self.use_graphs if cfg.static_decode is None else cfg.static_decode
        self._free_slots = list(range(S - 1, -1, -1))
        self._slots: list[_Seq | None] = [None] * S
        self._waiting: list[_Seq] = []
        self._queue_lock = threading.Lock()  # guards _waiting and _live_ids against submitting threads
        self._live_ids: set[str] = set()
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(cfg.seed)
        self._tables_cache = None
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
        self._context = RequestContext(config=cfg, num_layers=ad.L, vocab=ad.vocab, bank=self.bank,
                                       monitor_bank=self.monitor_bank, tokenizer=tok, eos_ids=self.eos_ids,
                                       live_request_ids=self._live_ids)

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
        return self._enqueue([prepare(request, self._context)])[0]

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
        return bool(self._waiting) or self.num_running > 0

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the outputs of requests finished during it."""
        finished: list[_Seq] = []
        with self._queue_lock:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._live_ids.discard(seq.output.request_id)
                seq.output.finish_reason = "cancelled"
                finished.append(seq)
        for seq in self._slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, "cancelled")
                finished.append(seq)
        new = self._admit()
        if new:
            budget = self.cfg.max_prefill_tokens
            group: list[_Seq] = []
            for seq in sorted(new, key=lambda s: len(s.prompt_ids)):
                longest = max([len(s.prompt_ids) for s in group] + [len(seq.prompt_ids)])
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
        prepared = []
        ids = [r.request_id for r in requests if isinstance(r, Request) and r.request_id is not None]
        if len(ids) != len(set(ids)):
            raise RequestRefused("request.request_id: the same id is given to two requests of this call")
        for i, request in enumerate(requests):
            try:
                prepared.append(prepare(request, self._context))
            except InvalidRequest as error:
                raise type(error)(f"requests[{i}].{error}") from None
        handles = self._enqueue(prepared)
        self.run_until_done()
        return [h.output for h in handles]

    def _enqueue(self, prepared: list[PreparedRequest]) -> list[RequestHandle]:
        with self._queue_lock:
            if len(self._waiting) + len(prepared) > self.cfg.max_waiting:
                raise RequestRefused(f"queue full: max_waiting={self.cfg.max_waiting} requests already waiting")
            handles = []
            for p in prepared:
                sp = p.request.sampling
                rid = p.request.request_id or f"req-{next(self._ids)}"
                seed = sp.seed if sp.seed is not None else int(
                    torch.randint(0, 2**62, (1,), generator=self._seed_rng))
                output = RequestOutput(rid, list(p.prompt_ids), logprobs=[] if sp.logprobs else None,
                                       masked_logprobs=[] if sp.logprobs and p.allowed_ids is not None else None)
                seq = _Seq(prepared=p, output=output, seed=seed)
                self._waiting.append(seq)
                self._live_ids.add(rid)
                handles.append(RequestHandle(self, seq))
            return handles

    # ------------------------------------------------------------------ admission
    def _admit(self) -> list[_Seq]:
        new = []
        # In arrival order, but a request whose vectors do not fit in the bank now does not hold
        # up the ones behind it: it waits for running requests (or the removal of persistent
        # vectors) to free slots, while later requests that fit are admitted.
        position = 0
        with self._queue_lock:
            while position < len(self._waiting) and self._free_slots:
                seq = self._waiting[position]
                p = seq.prepared
                if p.new_vectors > self.bank.num_free or p.monitor_vectors > self.monitor_bank.num_free:
                    position += 1
                    continue
                self._waiting.pop(position)
                new.append(seq)
                seq.slot = self._free_slots.pop()
                self._slots[seq.slot] = seq
        for seq in new:
            req = seq.request
            seq.steering = resolve_spec(req.steering, self.L, self.cfg.max_terms_per_row, self.bank)
            s = seq.slot
            self.tv[:, :, s].copy_(seq.steering.vector)
            self.tc[:, :, s].copy_(seq.steering.coef)
            self.tm[:, :, s].copy_(seq.steering.mode)
            self._slot_width[s] = seq.steering.width
            if req.monitor is not None:
                seq.monitor_ids = [self.monitor_bank.place(v) for v in req.monitor.vectors]
                p = POINTS[req.monitor.point]
                seq.monitor_lp = [(l % self.L, p) for l in req.monitor.layers]
            if seq.prepared.allowed_ids is not None:
                allowed = torch.zeros(self.vocab, dtype=torch.bool)
                allowed[seq.prepared.allowed_ids] = True
                seq.allowed = allowed.to(self.device)
        if new:
            self._tables_cache = None
        return new

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.output.finish_reason = reason
        if seq.slot >= 0:
            s = seq.slot
            self.tv[:, :, s].fill_(-1)
            self._slot_width[s].zero_()
            self._slots[s] = None
            self._free_slots.append(s)
            self._free_slots.sort(reverse=True)  # lowest slot first keeps the batch dense
            seq.slot = -1
            self._tables_cache = None
        if seq.steering is not None:
            for idx in seq.steering.owned_ids:
                self.bank.release(idx)
            seq.steering.owned_ids = []
        for idx in seq.monitor_ids:
            self.monitor_bank.release(idx)
        seq.monitor_ids = []
        with self._queue_lock:
            self._live_ids.discard(seq.output.request_id)

    def _materialise(self, seq: _Seq) -> RequestOutput:
        out = seq.output
        if seq.monitor_rows:
            out.monitor = torch.stack(seq.monitor_rows)
        if self.tokenizer is not None and out.token_ids and not seq.request.sampling.stop_strings:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return out

    # ------------------------------------------------------------------ taps
    def _monitor_taps(self, taps: Taps, seqs: list[_Seq], into: dict) -> None:
        """One projection observer per monitored (layer, point) of these rows, onto the whole
        monitor bank (each row keeps its own columns)."""
        for key in sorted({lp for s in seqs for lp in s.monitor_lp}):
            taps.add_observer(*key, projection_observer(self.monitor_bank.tensor, into, key))

    # ------------------------------------------------------------------ prefill
    def _prefill(self, seqs: list[_Seq]) -> list[_Seq]:
        """Prefill newly admitted requests, prefill_chunk_tokens positions per pass (the K/V of
        earlier chunks are read back from the cache); samples their first token."""
        if not seqs:
            return []
        dev = self.device
        N = len(seqs)
        lens = [len(s.prompt_ids) for s in seqs]
        Tm = max(lens)
        ids = torch.zeros((N, Tm), dtype=torch.long)
        steer_mask = torch.zeros((N, Tm), dtype=torch.bool)
        for r, s in enumerate(seqs):
            n = lens[r]
            ids[r, :n] = torch.tensor(s.prompt_ids)
            steer_mask[r, :n] = prompt_steer_mask(s.steering.scope, s.prepared.roles, n)
        ids, steer_mask = ids.to(dev), steer_mask.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        # Each row's hidden state (and monitor projections) at its last prompt token, taken from
        # the chunk that token lies in; logits are computed once, for these rows only.
        last_h = torch.empty((N, self.D), dtype=self.dtype, device=dev)
        last_mon: dict = {}
        C = self.cfg.prefill_chunk_tokens
        for c0 in range(0, Tm, C):
            c1 = min(c0 + C, Tm)
            # Rows whose prompt ended in an earlier chunk have nothing left to prefill.
            rows = [r for r in range(N) if lens[r] > c0]
            rows_t = torch.tensor(rows, device=dev)
            h, mon_out = self._prefill_chunk([seqs[r] for r in rows], ids[rows_t, c0:c1],
                                             steer_mask[rows_t, c0:c1], lens_t[rows_t], c0)
            ending = [j for j, r in enumerate(rows) if lens[r] <= c1]
            if ending:
                at = torch.tensor([j * (c1 - c0) + lens[rows[j]] - 1 - c0 for j in ending], device=dev)
                dest = rows_t[ending]
                last_h[dest] = h[at]
                for key, proj in mon_out.items():
                    if key not in last_mon:
                        last_mon[key] = proj.new_empty((N, proj.shape[1]))
                    last_mon[key][dest] = proj[at]
        logits = self.adapter.logits(last_h)
        for s, n in zip(seqs, lens):
            s.length = n
        return self._sample_and_advance(seqs, logits, last_mon)

    def _prefill_chunk(self, seqs, ids, steer_mask, lens, c0):
        """One prefill pass over positions [c0, c0 + T) of rows `seqs` (ids, steer_mask [A, T],
        padded past each row's length `lens` [A]): writes their K/V to the cache and attends over
        cache positions [0, c0 + T). Returns the hidden states [A*T, D] and monitor projections."""
        dev = self.device
        A, T = ids.shape
        c1 = c0 + T
        slot_list = [s.slot for s in seqs]
        slots = torch.tensor(slot_list, device=dev)
        qpos = torch.arange(c0, c1, device=dev)
        # Only real tokens are written: a padded position must never overwrite a cache entry.
        real_row, real_tok = (qpos[None, :] < lens[:, None]).nonzero(as_tuple=True)
        w_slot, w_pos = slots[real_row], qpos[real_tok]
        # A padded query is masked as its row's last token: it never attends a position the row
        # has not written, and never has every key masked (a NaN row) under a sliding window.
        mask_pos = torch.minimum(qpos[None, :], lens[:, None] - 1)  # [A, T]
        kpos = torch.arange(c1, device=dev)
        cache_rows = slot_rows(slot_list, slots)
        masks = {}

        def mask_for(window, g):
            if (window, g) not in masks:
                m = attends(mask_pos, kpos, window)  # [A, T, c1]
                # One row per (token, query head of a kv head), matching gqa_attention's layout.
                masks[window, g] = additive_mask(m[:, None].repeat_interleave(g, dim=2), self.dtype)
            return masks[window, g]

        cs = self.adapter.rope_tables(qpos.repeat(A))

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[w_slot, :, w_pos] = k.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            vc[w_slot, :, w_pos] = v.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            return gqa_attention(lay, q, kc[cache_rows, :, :c1], vc[cache_rows, :, :c1],
                                 mask_for(lay.window, lay.n_heads // lay.n_kv), A, T)

        # Per-token term tables: each row's terms on the chunk's tokens its scope covers, -1 elsewhere.
        taps = Taps(self.bank.tensor)
        width = torch.stack([s.steering.width for s in seqs]).amax(0)  # [L, 2]
        for l, p in (width > 0).nonzero().tolist():
            w = int(width[l, p])
            taps.steer_tables[(l, p)] = token_term_tables(self.tv[l, p, slots, :w], self.tc[l, p, slots, :w],
                                                          self.tm[l, p, slots, :w], steer_mask)
        mon_out = {}
        self._monitor_taps(taps, seqs, mon_out)
        h = self.adapter.embed(ids.reshape(-1))
        h = self.adapter.forward(h, attend, taps, cs)
        return h, mon_out

    # ------------------------------------------------------------------ decode
    def _decode_taps(self, slots_t, rows_key) -> Taps:
        """Term tables of the running rows (rebuilt only when the batch composition changes)."""
        if self._tables_cache is not None and self._tables_cache[0] == rows_key:
            return self._tables_cache[1]
        widths = self._slot_width[list(rows_key)].amax(0)  # [L, 2]
        taps = Taps(self.bank.tensor)
        for l, p in (widths > 0).nonzero().tolist():
            w = int(widths[l, p])
            # Gathered copies (the kernels want contiguous tables), made once per composition.
            taps.steer_tables[(l, p)] = tuple(t[l, p, slots_t, :w] for t in (self.tv, self.tc, self.tm))
        self._tables_cache = (rows_key, taps)
        return taps

    def _decode(self, seqs: list[_Seq]) -> list[_Seq]:
        monitored = any(s.monitor_lp for s in seqs)
        # Monitoring reads per-layer projections on the host; it runs the eager path.
        if self.static and not monitored:
            return self._decode_static(seqs)
        dev = self.device
        B = len(seqs)
        slot_list = tuple(s.slot for s in seqs)
        slots = torch.tensor(slot_list, device=dev)
        pos = torch.tensor([s.length for s in seqs], device=dev)
        ids = torch.tensor([s.next_token for s in seqs], device=dev)
        ctx = max(s.length for s in seqs) + 1
        cache_rows = slot_rows(slot_list, slots)
        kpos = torch.arange(ctx, device=dev)
        masks = {}

        def mask_for(window):
            if window not in masks:
                masks[window] = additive_mask(attends(pos, kpos, window)[:, None, None, :], self.dtype)  # [B, 1, 1, ctx]
            return masks[window]

        cs = self.adapter.rope_tables(pos)

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slots, :, pos] = k
            vc[slots, :, pos] = v
            return gqa_attention(lay, q, kc[cache_rows, :, :ctx], vc[cache_rows, :, :ctx],
                                 mask_for(lay.window), B, 1)

        taps = self._decode_taps(slots, slot_list)
        mon_out = {}
        if monitored:
            steer_only, taps = taps, Taps(self.bank.tensor)
            taps.steer_tables = steer_only.steer_tables
            self._monitor_taps(taps, seqs, mon_out)
        h = self.adapter.embed(ids)
        h = self.adapter.forward(h, attend, taps, cs)
        logits = self.adapter.logits(h)
        for s in seqs:
            s.length += 1
        return self._sample_and_advance(seqs, logits, mon_out)

    # --- static (CUDA-graph) decode: all slots [0, bucket), fixed buffers, no host syncs inside.
    def _bucket(self, n: int) -> int:
        for b in self.cfg.graph_batch_buckets:
            if b >= n and b <= self.cfg.max_batch_slots:
                return b
        return self.cfg.max_batch_slots

    def _ctx_bucket(self, n: int) -> int:
        """Cache length a static step attends over for contexts of n tokens (a graph-key field)."""
        cb = self.cfg.graph_ctx_bucket
        return min(self.cfg.max_context_len, -(-n // cb) * cb)

    def _static_step(self, B: int, ctx: int, steer_in: bool, steer_out: bool):
        """Logits [B, V] for slots [0, B) from ids_buf/pos_buf; every shape depends only on
        (B, ctx), every tensor read is a fixed buffer, so the call can be graph-captured."""
        pos = self.pos_buf[:B]
        kpos = torch.arange(ctx, device=self.device)
        masks = {}
        rows = torch.arange(B, device=self.device)

        cs = self.adapter.rope_tables(pos)

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            if lay.window not in masks:
                masks[lay.window] = additive_mask(attends(pos, kpos, lay.window)[:, None, None, :], self.dtype)
            return gqa_attention(lay, q, kc[:B, :, :ctx], vc[:B, :, :ctx], masks[lay.window], B, 1)

        taps = Taps(self.bank.tensor)
        for l in range(self.L):
            for p, on in ((BLOCK_INPUT, steer_in), (BLOCK_OUTPUT, steer_out)):
                if on:
                    taps.steer_tables[(l, p)] = (self.tv[l, p, :B], self.tc[l, p, :B], self.tm[l, p, :B])
        h = self.adapter.embed(self.ids_buf[:B])
        h = self.adapter.forward(h, attend, taps, cs)
        return self.adapter.logits(h)

    def _decode_static(self, seqs: list[_Seq]) -> list[_Seq]:
        B = self._bucket(max(s.slot for s in seqs) + 1)
        ctx = self._ctx_bucket(max(s.length for s in seqs) + 1)
        widths = self._slot_width[[s.slot for s in seqs]].amax(0)
        steer_in, steer_out = bool(widths[:, BLOCK_INPUT].any()), bool(widths[:, BLOCK_OUTPUT].any())
        # Inactive slots in [0, B) run on token 0 at position 0: harmless, their cache rows are
        # rewritten by the next prefill that claims the slot.
        ids = torch.zeros(self.cfg.max_batch_slots, dtype=torch.long)
        pos = torch.zeros(self.cfg.max_batch_slots, dtype=torch.long)
        for s in seqs:
            ids[s.slot] = s.next_token
            pos[s.slot] = s.length
        self.ids_buf.copy_(ids, non_blocking=True)
        self.pos_buf.copy_(pos, non_blocking=True)
        key = (B, ctx, steer_in, steer_out)
        if self.use_graphs:
            logits_all = self._graph_run(key)
        else:
            logits_all = self._static_step(*key)
        logits = logits_all[torch.tensor([s.slot for s in seqs], device=self.device)]
        for s in seqs:
            s.length += 1
        return self._sample_and_advance(seqs, logits, {})

    def _graph_run(self, key):
        return self._graphs.run(key)

    def warmup(self, batch_sizes: Sequence[int] | None = None, ctx: int | None = None) -> float:
        """Capture decode graphs ahead of traffic for every context bucket up to `ctx` tokens
        (default: the first bucket), with and without block-input steering; returns seconds
        spent. No-op off CUDA. Refused while requests run: the capture's warm-up steps rewrite
        the cache at each slot's last position (without that row's steering)."""
        if not self.use_graphs:
            return 0.0
        if self.num_running:
            raise RuntimeError("Engine.warmup: call it before traffic (requests are running)")
        t0 = time.perf_counter()
        top = self._ctx_bucket(ctx or self.cfg.graph_ctx_bucket)
        ctxs = sorted({self._ctx_bucket(n) for n in range(1, top + 1, self.cfg.graph_ctx_bucket)} | {top})
        with torch.inference_mode():
            for b in batch_sizes or [b for b in self.cfg.graph_batch_buckets if b <= self.cfg.max_batch_slots]:
                for c in ctxs:
                    for steer_in in (False, True):
                        self._graph_run((self._bucket(b), c, steer_in, False))
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
        finished = []
        for b, (s, tok) in enumerate(zip(seqs, tokens)):
            out = s.output
            out.token_ids.append(tok)
            if out.logprobs is not None:
                out.logprobs.append(lp[b])
            if out.masked_logprobs is not None:
                out.masked_logprobs.append(masked_lp[b])
            if s.monitor_lp:
                s.monitor_rows.append(torch.stack([mon_host[lp_][b, s.monitor_ids] for lp_ in s.monitor_lp]))
            s.next_token = tok
            sp = s.request.sampling
            reason = None
            if tok in s.prepared.stop_ids:
                reason = "stop"
            elif sp.stop_strings and self.tokenizer is not None:
                text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                hits = [text.find(st) for st in sp.stop_strings if st and st in text]
                if hits:
                    out.text = text[:min(hits)]
                    reason = "stop"
                else:
                    out.text = text
            if reason is None and len(out.token_ids) >= sp.max_new_tokens:
                reason = "length"
            if reason is not None:
                self._finish(s, reason)
                finished.append(s)
        return finished
