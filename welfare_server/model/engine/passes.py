"""The forward passes of the engine over its fixed buffers: the KV cache, the per-slot steering term
tables and the static-step inputs. The scheduler (loop.py) decides which slots run; this module
runs them: a chunked prefill of new tokens at any cache offset, an eager decode step, and the
static decode step that CUDA graphs capture.

Buffers (all allocated once, from EngineConfig; CUDA graphs read their addresses):
  k_cache, v_cache   [L, S, kv_heads, max_context_len, head_dim]
  tv / tc / tm       [L, 2, S, max_terms_per_row]  bank index / coefficient / mode per (layer,
                     point, slot, term); -1 = no term
  ids_buf, pos_buf   [S]  the static step's token and position per slot
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from welfare_server import kernels
from welfare_server.kernels import cpu_native
from welfare_server.model.engine.adapter import ModelAdapter
from welfare_server.model.engine.attention import additive_mask, attends, gqa_attention, slot_rows
from welfare_server.model.engine.config import EngineConfig
from welfare_server.model.engine.graphs import GraphCache
from welfare_server.model.engine.taps import Taps, projection_observer
from welfare_server.model.steering import BLOCK_INPUT, BLOCK_OUTPUT, ResolvedSteering, VectorBank, token_term_tables


@dataclass
class PrefillRow:
    """New tokens of one slot, written to the cache at positions start, start + 1, ..."""

    slot: int
    start: int
    ids: list[int]
    steer_mask: torch.Tensor
    """bool [len(ids)]: which of the tokens the slot's terms steer."""
    monitor_points: list[tuple[int, int]] = field(default_factory=list)
    labels: tuple[int, ...] = ()
    """The row's class in each labelling of a CaptureTap (-1: not counted)."""


@dataclass
class CaptureTap:
    """Class sums of the residual at each row's last new token, at (layer, point) for `layers`:
    what extraction accumulates through a prefill, with no activation kept (kernels.capture).
    A row may carry several labellings (PrefillRow.labels: one class per labelling, -1 = not
    counted): labelling j's classes are sums rows [j * C, (j + 1) * C), so a permutation null is
    accumulated over the same examples in the same pass."""

    layers: list[int]
    point: int
    num_classes: int
    sums: dict[int, torch.Tensor]
    """layer -> fp32 [J * C, D], accumulated in place."""
    counts: dict[int, torch.Tensor]
    """layer -> int64 [J * C], accumulated in place."""
    proj_vectors: dict[int, torch.Tensor] | None = None
    """layer -> [P, D]: also return every captured row's projections onto these."""


@dataclass
class DecodeRow:
    slot: int
    position: int
    token: int
    monitor_points: list[tuple[int, int]] = field(default_factory=list)


class ForwardPasses:
    """Runs prefill and decode passes for slots of the KV cache (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter, cfg: EngineConfig, bank: VectorBank, monitor_bank: VectorBank):
        self.adapter, self.cfg, self.bank, self.monitor_bank = adapter, cfg, bank, monitor_bank
        self.device, self.dtype = adapter.device, adapter.dtype
        ad, dev = adapter, adapter.device
        l0 = ad.layers[0]
        S, T = cfg.max_batch_slots, cfg.max_context_len
        self.k_cache = torch.zeros(ad.L, S, l0.n_kv, T, l0.head_dim, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        NT = cfg.max_terms_per_row
        self.tv = torch.full((ad.L, 2, S, NT), -1, dtype=torch.int32, device=dev)
        self.tc = torch.zeros((ad.L, 2, S, NT), dtype=torch.float32, device=dev)
        self.tm = torch.zeros((ad.L, 2, S, NT), dtype=torch.int32, device=dev)
        self.slot_width = torch.zeros((S, ad.L, 2), dtype=torch.int64)  # host copy: terms per slot
        self.ids_buf = torch.zeros(S, dtype=torch.long, device=dev)
        # Idle slots point at the last cache position (see _decode_static), warm-up captures too.
        self.pos_buf = torch.full((S,), T - 1, dtype=torch.long, device=dev)
        self.use_graphs = cfg.use_cuda_graphs and dev.type == "cuda"
        self.static = self.use_graphs if cfg.static_decode is None else cfg.static_decode
        self.graphs = GraphCache(self.static_step)
        self._decode_taps_cache = None

    # ------------------------------------------------------------------ slots
    def set_terms(self, slot: int, steering: ResolvedSteering) -> None:
        self.tv[:, :, slot].copy_(steering.vector)
        self.tc[:, :, slot].copy_(steering.coef)
        self.tm[:, :, slot].copy_(steering.mode)
        self.slot_width[slot] = steering.width
        self._decode_taps_cache = None

    def clear_terms(self, slot: int) -> None:
        self.tv[:, :, slot].fill_(-1)
        self.slot_width[slot].zero_()
        self._decode_taps_cache = None

    def copy_cache(self, src: int, dst: int, length: int) -> None:
        """Slot dst's first `length` cache positions become slot src's (a session fork)."""
        self.k_cache[:, dst, :, :length].copy_(self.k_cache[:, src, :, :length])
        self.v_cache[:, dst, :, :length].copy_(self.v_cache[:, src, :, :length])

    def _monitor_taps(self, taps: Taps, points, into: dict) -> None:
        """One projection observer per monitored (layer, point), onto the whole monitor bank (each
        row keeps its own columns)."""
        for key in sorted(set(points)):
            taps.add_observer(*key, projection_observer(self.monitor_bank.tensor, into, key))

    # ------------------------------------------------------------------ prefill
    def prefill(self, rows: list[PrefillRow], capture: CaptureTap | None = None) -> tuple[torch.Tensor, dict]:
        """Write the rows' new tokens to the cache, prefill_chunk_tokens positions per pass (each
        pass attends over everything its rows have cached, earlier turns of a session included).
        Returns the hidden state [N, D] at each row's last new token and the monitor projections
        there ({(layer, point): [N, M]}); with a capture tap, its class sums grow by each row's last
        token, and the result also holds {("capture", layer): [N, P]} projections."""
        dev = self.device
        N = len(rows)
        lens = [len(r.ids) for r in rows]
        Tm = max(lens)
        ids = torch.zeros((N, Tm), dtype=torch.long)
        steer_mask = torch.zeros((N, Tm), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :lens[i]] = torch.tensor(r.ids)
            steer_mask[i, :lens[i]] = r.steer_mask
        ids, steer_mask = ids.to(dev), steer_mask.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        starts_t = torch.tensor([r.start for r in rows], device=dev)
        # Each row's hidden state (and monitor projections) at its last new token, taken from the
        # chunk that token lies in; logits are computed once, for these rows only.
        last_h = torch.empty((N, self.adapter.D), dtype=self.dtype, device=dev)
        last_mon: dict = {}
        C = self.cfg.prefill_chunk_tokens
        for c0 in range(0, Tm, C):
            c1 = min(c0 + C, Tm)
            # Rows whose new tokens ended in an earlier chunk have nothing left to prefill.
            live = [i for i in range(N) if lens[i] > c0]
            live_t = torch.tensor(live, device=dev)
            h, mon_out = self._prefill_chunk([rows[i] for i in live], ids[live_t, c0:c1], steer_mask[live_t, c0:c1],
                                             lens_t[live_t], starts_t[live_t], c0, capture)
            ending = [j for j, i in enumerate(live) if lens[i] <= c1]
            if ending:
                at = torch.tensor([j * (c1 - c0) + lens[live[j]] - 1 - c0 for j in ending], device=dev)
                dest = live_t[ending]
                last_h[dest] = h[at]
                for key, proj in mon_out.items():
                    if key not in last_mon:
                        last_mon[key] = proj.new_empty((N, proj.shape[1]))
                    last_mon[key][dest] = proj[at]
        return last_h, last_mon

    def _prefill_chunk(self, rows, ids, steer_mask, lens, starts, c0, capture=None):
        """One pass over new-token indices [c0, c0 + T) of `rows` (ids, steer_mask [A, T], padded
        past each row's count `lens` [A]; row a's token t sits at cache position starts[a] + t):
        writes their K/V and attends over every position each row has. Returns the hidden states
        [A*T, D] and monitor projections."""
        dev = self.device
        A, T = ids.shape
        slot_list = [r.slot for r in rows]
        slots = torch.tensor(slot_list, device=dev)
        t_idx = torch.arange(c0, c0 + T, device=dev)
        qpos = starts[:, None] + t_idx[None, :]  # [A, T] cache positions
        # Only real tokens are written: a padded position must never overwrite a cache entry.
        real_row, real_tok = (t_idx[None, :] < lens[:, None]).nonzero(as_tuple=True)
        w_slot, w_pos = slots[real_row], qpos[real_row, real_tok]
        # A padded query is masked as its row's last token: it never attends a position the row
        # has not written, and never has every key masked (a NaN row) under a sliding window.
        mask_pos = starts[:, None] + torch.minimum(t_idx[None, :], lens[:, None] - 1)  # [A, T]
        kmax = int((starts + torch.clamp(lens, max=c0 + T)).max())
        kpos = torch.arange(kmax, device=dev)
        cache_rows = slot_rows(slot_list, slots)
        masks = {}

        def mask_for(window, g):
            if (window, g) not in masks:
                m = attends(mask_pos, kpos, window)  # [A, T, kmax]
                # One row per (token, query head of a kv head), matching gqa_attention's layout.
                masks[window, g] = additive_mask(m[:, None].repeat_interleave(g, dim=2), self.dtype)
            return masks[window, g]

        cs = self.adapter.rope_tables(qpos.reshape(-1))

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[w_slot, :, w_pos] = k.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            vc[w_slot, :, w_pos] = v.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            return gqa_attention(lay, q, kc[cache_rows, :, :kmax], vc[cache_rows, :, :kmax],
                                 mask_for(lay.window, lay.n_heads // lay.n_kv), A, T)

        # Per-token term tables: each row's terms on the chunk's tokens its scope covers, -1 elsewhere.
        taps = Taps(self.bank.tensor)
        width = self.slot_width[slot_list].amax(0)  # [L, 2]
        for l, p in (width > 0).nonzero().tolist():
            w = int(width[l, p])
            taps.steer_tables[(l, p)] = token_term_tables(self.tv[l, p, slots, :w], self.tc[l, p, slots, :w],
                                                          self.tm[l, p, slots, :w], steer_mask)
        mon_out = {}
        self._monitor_taps(taps, [lp for r in rows for lp in r.monitor_points], mon_out)
        if capture is not None:
            self._capture_taps(taps, capture, rows, lens, t_idx, mon_out)
        h = self.adapter.embed(ids.reshape(-1))
        h = self.adapter.forward(h, attend, taps, cs)
        return h, mon_out

    def _capture_taps(self, taps: Taps, capture: CaptureTap, rows, lens, t_idx, into: dict) -> None:
        """Observers adding each row's last new token (when it lies in this chunk) to its classes'
        sums at every captured layer. The rows are gathered first (indices known on the host: no
        sync), then repeated once per labelling, so one kernels.capture call does every labelling."""
        T, c0, C = t_idx.numel(), int(t_idx[0]), capture.num_classes
        ending = [(a, int(lens[a]) - 1 - c0) for a in range(len(rows)) if c0 <= int(lens[a]) - 1 < c0 + T]
        if not ending:
            return
        index = torch.tensor([a * T + t for a, t in ending], device=self.device)
        J = len(rows[0].labels)
        labels = torch.tensor([[lab + j * C if lab >= 0 else -1 for j, lab in enumerate(rows[a].labels)]
                               for a, _ in ending], device=self.device).t().reshape(-1)  # labelling-major
        # prefill() reads readings at each row's last token: projections go to those flat rows.
        for layer in capture.layers:
            def observe(h, layer=layer):
                x = h.index_select(0, index)
                kernels.capture(x.repeat(J, 1), labels, capture.sums[layer], capture.counts[layer],
                                check_values=False)
                if capture.proj_vectors is not None:
                    proj = torch.zeros(h.shape[0], capture.proj_vectors[layer].shape[0], device=h.device)
                    proj[index] = x.float() @ capture.proj_vectors[layer].t()
                    into[("capture", layer)] = proj
            taps.add_observer(layer, capture.point, observe)

    # ------------------------------------------------------------------ decode
    def _decode_taps(self, slots_t, rows_key) -> Taps:
        """Term tables of the running rows (rebuilt only when the batch composition changes)."""
        if self._decode_taps_cache is not None and self._decode_taps_cache[0] == rows_key:
            return self._decode_taps_cache[1]
        widths = self.slot_width[list(rows_key)].amax(0)  # [L, 2]
        taps = Taps(self.bank.tensor)
        for l, p in (widths > 0).nonzero().tolist():
            w = int(widths[l, p])
            # Gathered copies (the kernels want contiguous tables), made once per composition.
            taps.steer_tables[(l, p)] = tuple(t[l, p, slots_t, :w] for t in (self.tv, self.tc, self.tm))
        self._decode_taps_cache = (rows_key, taps)
        return taps

    def decode(self, rows: list[DecodeRow]) -> tuple[torch.Tensor, dict]:
        """One token for each row: logits [B, V] and monitor projections {(layer, point): [B, M]}.
        Runs the static (graph) step when it is on and no row is monitored (monitors read
        per-layer projections on the host; they run the eager step)."""
        monitored = any(r.monitor_points for r in rows)
        if self.static and not monitored:
            return self._decode_static(rows), {}
        dev = self.device
        B = len(rows)
        slot_list = tuple(r.slot for r in rows)
        slots = torch.tensor(slot_list, device=dev)
        pos = torch.tensor([r.position for r in rows], device=dev)
        ids = torch.tensor([r.token for r in rows], device=dev)
        ctx = max(r.position for r in rows) + 1
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
            if lay.softcap is None:
                native = cpu_native.attend_decode(q, k, v, kc, vc, slots, pos, lay.window, lay.scaling)
                if native is not None:
                    return native
            kc[slots, :, pos] = k
            vc[slots, :, pos] = v
            return gqa_attention(lay, q, kc[cache_rows, :, :ctx], vc[cache_rows, :, :ctx],
                                 mask_for(lay.window), B, 1)

        taps = self._decode_taps(slots, slot_list)
        mon_out = {}
        if monitored:
            steer_only, taps = taps, Taps(self.bank.tensor)
            taps.steer_tables = steer_only.steer_tables
            self._monitor_taps(taps, [lp for r in rows for lp in r.monitor_points], mon_out)
        h = self.adapter.embed(ids)
        h = self.adapter.forward(h, attend, taps, cs)
        return self.adapter.logits(h), mon_out

    # --- static (CUDA-graph) decode: all slots [0, bucket), fixed buffers, no host syncs inside.
    def bucket(self, n: int) -> int:
        for b in self.cfg.graph_batch_buckets:
            if b >= n and b <= self.cfg.max_batch_slots:
                return b
        return self.cfg.max_batch_slots

    def ctx_bucket(self, n: int) -> int:
        """Cache length a static step attends over for contexts of n tokens (a graph-key field)."""
        cb = self.cfg.graph_ctx_bucket
        return min(self.cfg.max_context_len, -(-n // cb) * cb)

    def static_step(self, B: int, ctx: int, steer_in: bool, steer_out: bool):
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
        for l in range(self.adapter.L):
            for p, on in ((BLOCK_INPUT, steer_in), (BLOCK_OUTPUT, steer_out)):
                if on:
                    taps.steer_tables[(l, p)] = (self.tv[l, p, :B], self.tc[l, p, :B], self.tm[l, p, :B])
        h = self.adapter.embed(self.ids_buf[:B])
        h = self.adapter.forward(h, attend, taps, cs)
        return self.adapter.logits(h)

    def _decode_static(self, rows: list[DecodeRow]) -> torch.Tensor:
        B = self.bucket(max(r.slot for r in rows) + 1)
        ctx = self.ctx_bucket(max(r.position for r in rows) + 1)
        widths = self.slot_width[[r.slot for r in rows]].amax(0)
        steer_in, steer_out = bool(widths[:, BLOCK_INPUT].any()), bool(widths[:, BLOCK_OUTPUT].any())
        # Slots in [0, B) that are not decoding run on token 0 at the last cache position, which
        # holds nothing a live row or a kept session reads: a session's cache never reaches it
        # before the session is full, and a request writes a position before attending to it.
        ids = torch.zeros(self.cfg.max_batch_slots, dtype=torch.long)
        pos = torch.full((self.cfg.max_batch_slots,), self.cfg.max_context_len - 1, dtype=torch.long)
        for r in rows:
            ids[r.slot] = r.token
            pos[r.slot] = r.position
        self.ids_buf.copy_(ids, non_blocking=True)
        self.pos_buf.copy_(pos, non_blocking=True)
        key = (B, ctx, steer_in, steer_out)
        logits_all = self.graphs.run(key) if self.use_graphs else self.static_step(*key)
        return logits_all[torch.tensor([r.slot for r in rows], device=self.device)]
