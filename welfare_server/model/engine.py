"""The generation engine: per-request steering, continuous batching, its own KV cache and loop.

Engine reuses the Hugging Face model's weights and submodules but runs its own decode loop
(embed -> per layer: the previous residual add, steering at block input and the input RMSNorm in
one pass -> attention over the engine's KV cache -> residual add and the MLP's norm in one pass ->
MLP -> steer at block output -> final norm -> lm_head -> sampling), so there are no forward hooks
on the hot path and the whole step can be captured in a CUDA graph.

Fast-path families (loading.FAST_PATH_FAMILIES): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and
Gemma3 (text): a pre-norm block `h + attn(norm1(h))`, `h + mlp(norm2(h))` with RoPE, GQA, optional
q/k norms (Qwen3, Gemma3), per-layer sliding windows (Mistral; Qwen2/Qwen3/Gemma2/Gemma3
layer_types), Gemma's sqrt(D)-scaled embedding and (1 + w) RMSNorm weights; Gemma2/3's "sandwich"
norms on the attention and MLP outputs, soft-capped attention scores and logits (Gemma2), and one
RoPE table per layer type (Gemma3: local base on sliding layers, global on full ones). Other
families (Phi, GPT-2, multimodal Gemma3, ...) are refused by Engine with a clear error; use
hf_reference.hf_generate_steered for them (slow, hook-based). Rotary types whose table depends
on the sequence length (dynamic NTK) are refused too.

Numerics: fp32 on CPU matches HF generate's greedy tokens (tests), with the linears on oneDNN
prepacked weights (cpu_linear.py; its accumulation order differs from MKL's in the last bits). Gemma's norm is applied as
bf16(xn) * bf16(1 + w) in half precision, where HF computes (xn * (1 + w)) in fp32: exact in fp32,
a last-bit difference in bf16.

Scheduling: step() (1) retires cancelled requests, (2) admits waiting requests into free slots
(in arrival order; one whose vectors do not fit in the bank yet waits without holding up later
requests that fit), prefills them in padded groups, chunk by chunk along the prompt
(EngineConfig.prefill_chunk_tokens), and samples their first token, (3) decodes one token for
every running request.
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from welfare_server.kernels import MAX_TERMS, add_rmsnorm, rmsnorm, steer, steer_rmsnorm
from welfare_server.model.cpu_linear import make_linear
from welfare_server.model.loading import FAST_PATH_FAMILIES, LoadedModel
from welfare_server.model.prompts import render_chat
from welfare_server.model.steering import (BLOCK_INPUT, BLOCK_OUTPUT, POINTS, ResolvedSteering,
                                           SteeringSpec, VectorBank, prompt_steer_mask,
                                           resolve_spec, token_term_tables, validate_spec)


class RequestRefused(ValueError):
    """A request can never run under the engine's limits (or the queue is full); the message
    names the limit."""


@dataclass
class EngineConfig:
    """Limits and switches of one Engine. All memory is allocated from these at construction."""

    max_batch_slots: int = 32
    """Requests running at once (rows of the KV cache and of the term tables)."""
    max_context_len: int = 2048
    """Prompt + generated tokens per request; longer requests are refused at submit."""
    max_bank_vectors: int = 256
    """Steering vectors resident on the device (persistent ones + those of running requests)."""
    max_terms_per_row: int = MAX_TERMS
    """Terms one request may apply at one (layer, point); width of the term tables."""
    max_monitor_vectors: int = 64
    """Monitor vectors resident at once (all running requests together)."""
    max_prefill_tokens: int = 8192
    """Padded prompt tokens (rows x longest prompt) per prefill group. A group runs in passes of
    prefill_chunk_tokens positions, each attending over every key its rows have so far, so one pass
    holds at most rows x chunk tokens of activations and heads x chunk x max_prefill_tokens attention
    scores. Counting the longest prompt (not the chunk) is what bounds those scores; a prompt
    longer than this is prefilled in a group of its own (scores: heads x chunk x its length)."""
    prefill_chunk_tokens: int = 512
    """Prompt positions per prefill pass: attention scores grow as chunk x prompt length instead of
    the prompt length squared. Smaller bounds memory tighter at the cost of more passes."""
    max_waiting: int = 4096
    """Queued (not yet admitted) requests; submit refuses beyond this."""
    use_cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (CUDA only; ignored on CPU)."""
    static_decode: bool | None = None
    """Decode all slots [0, bucket) with fixed buffers (the graph path). None: on iff CUDA graphs
    are used. True on CPU runs the same static code without graphs (tests exercise it)."""
    graph_batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    """Batch sizes a decode graph is captured for (the smallest bucket >= highest used slot + 1)."""
    graph_ctx_bucket: int = 256
    """Attention in a static step reads the cache up to the next multiple of this many tokens,
    so short contexts don't pay for max_context_len."""
    fuse_weights: bool = True
    """Concatenate q/k/v and gate/up weights into one matmul each; the HF modules' parameters
    become views into the fused tensors, so memory is not duplicated and HF's forward still works."""
    cpu_prepack: bool = True
    """On CPU (fp32/bf16), run every linear (q/k/v, o, gate/up, down, lm_head) through oneDNN on a
    weight prepacked at construction (cpu_linear.py: 2.3x faster than MKL F.linear for this model
    at batch 1 in fp32). Costs a second copy of those weights (+537 MB fp32 for SmolLM2-135M);
    False = F.linear on the HF weights, no copy. Ignored off CPU."""
    seed: int = 0
    """Seeds drawn for requests that give none come from this."""


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k."""
    seed: int | None = None
    """Same seed + same prompt + same params = same tokens, whatever else is in the batch."""
    max_new_tokens: int = 64
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    """Extra stop ids; the tokenizer's eos is a stop id too unless ignore_eos."""
    ignore_eos: bool = False
    logprobs: bool = False
    """Return the log-probability of each chosen token under the model's distribution
    (raw logits: before temperature, top-k and top-p)."""


@dataclass
class MonitorSpec:
    """Per-token projections of the residual at `layers`/`point` onto `vectors`."""

    vectors: torch.Tensor
    """[M, D]."""
    layers: Sequence[int]
    point: str = "block_input"
    """Post-steering residual entering the block, or the block's (steered) output."""


@dataclass
class Request:
    prompt: Sequence[int] | None = None
    """Token ids (no roles: under ASSISTANT_AND_GENERATED scope none of them is steered unless
    prompt_roles says so). Exactly one of prompt / messages."""
    messages: Sequence[dict] | None = None
    """Chat messages; the tokenizer's template is applied with a generation prompt."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec | None = None
    monitor: MonitorSpec | None = None
    prompt_roles: Sequence[str] | None = None
    """Role of each prompt token (only with `prompt`)."""
    request_id: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """"stop" (stop id or string), "length" (max_new_tokens), "cancelled"; None while running."""
    logprobs: list[float] | None = None
    monitor: torch.Tensor | None = None
    """fp32 [n_tokens, len(layers), M]: row i is the residual of the forward pass that produced
    token i (for token 0 the last prompt position)."""


class RequestHandle:
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
    request: Request
    output: RequestOutput
    prompt_ids: list[int]
    roles: list[str] | None
    steering: ResolvedSteering | None = None
    slot: int = -1
    length: int = 0  # tokens in the cache
    next_token: int = -1
    seed: int = 0
    stop_ids: frozenset = frozenset()
    monitor_ids: list[int] = field(default_factory=list)
    monitor_lp: list[tuple[int, int]] = field(default_factory=list)
    monitor_rows: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False
    new_vectors: int = 0


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _attention(q, k, v, mask, scale: float, softcap: float | None):
    """scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), or, for soft-capped
    scores (Gemma2), HF's eager order: (q k^T * scale) -> cap * tanh(. / cap) -> + mask -> softmax
    in fp32 -> p v. mask: additive float or boolean (True = attend), broadcastable to the scores."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _attends(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [*query_pos.shape, ctx]: causal (key position <= query position) and, with a sliding
    window, key position > query position - window."""
    q = query_pos[..., None]
    m = key_pos <= q
    return m if window is None else m & (key_pos > q - window)


def _slot_rows(slot_list, slots: torch.Tensor):
    """Index of the cache rows of these slots: a slice (a view, no copy) when they are consecutive."""
    s0 = slot_list[0]
    return slice(s0, s0 + len(slot_list)) if list(slot_list) == list(range(s0, s0 + len(slot_list))) else slots


def _gqa_attention(lay, q, K, V, mask, A: int, T: int):
    """Attention of q [A*T, H, hd] over cached K/V [A, n_kv, ctx, hd] without repeating K/V: the
    g query heads of a kv head become g query rows per token (mask rows follow that layout).
    Returns [A*T, H*hd]."""
    g, hd = lay.n_heads // lay.n_kv, lay.head_dim
    if T == 1:  # decode: the same layout as plain views (no transposes on the per-token path)
        return _attention(q.view(A, lay.n_kv, g, hd), K, V, mask, lay.scaling, lay.softcap).reshape(A, -1)
    qg = q.view(A, T, lay.n_kv, g, hd).transpose(1, 2).reshape(A, lay.n_kv, T * g, hd)
    o = _attention(qg, K, V, mask, lay.scaling, lay.softcap)
    return o.view(A, lay.n_kv, T, g, hd).transpose(1, 2).reshape(A * T, lay.n_heads * hd)


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding 32-bit values (products wrap; low bits exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counter-based Gumbel noise [B, V] from (seed, step, token id): no generator state, so a
    row's draws do not depend on the batch around it, and it runs inside a CUDA graph."""
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    key = _hash32((seed[:, None] & _M32) ^ _hash32((step[:, None] * 0x9E3779B1) & _M32))
    key = _hash32(key ^ ((seed[:, None] >> 32) & _M32))
    h = _hash32((idx * 0x27D4EB2F + key) & _M32)
    h = _hash32(h ^ key)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exactly representable
    return -torch.log(-torch.log(u))


GEMMA_NORM_FAMILIES = ("gemma", "gemma2", "gemma3_text")


def _norm_weight(module, family: str, dtype):
    """The RMSNorm's weight as kernels.rmsnorm and steer_rmsnorm apply it: Gemma's norms scale by
    (1 + w), precomputed here once."""
    if family in GEMMA_NORM_FAMILIES:
        return (1.0 + module.weight.float()).to(dtype)
    return module.weight


def _norm_eps(module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


class _Layer:
    """What the loop needs from one HF decoder layer (views of its weights, its submodules)."""

    def __init__(self, block, config, family: str, fuse: bool, dtype, prepack: bool, rope_key):
        attn, mlp = block.self_attn, block.mlp
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.rope_key = rope_key  # which of Engine.rope's tables this layer rotates with

        def norm(module):
            return _norm_weight(module, family, dtype), _norm_eps(module)

        self.norm1_w, self.eps1 = norm(block.input_layernorm)
        if hasattr(block, "pre_feedforward_layernorm"):
            # Gemma2/3: post_attention_layernorm normalises the attention output (before the
            # residual add); the MLP's input norm is pre_feedforward_layernorm.
            self.post_attn = norm(block.post_attention_layernorm)
            self.norm2_w, self.eps2 = norm(block.pre_feedforward_layernorm)
            self.post_mlp = norm(block.post_feedforward_layernorm)
        else:
            self.post_attn = self.post_mlp = None
            self.norm2_w, self.eps2 = norm(block.post_attention_layernorm)
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        window = getattr(attn, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None and layer_types is not None and not hasattr(attn, "sliding_window"):
            # Releases whose attention module does not carry its window: read it from the config.
            if layer_types[attn.layer_idx] == "sliding_attention":
                window = getattr(config, "sliding_window", None)
        if window is None and family == "mistral":
            window = getattr(config, "sliding_window", None)
        self.window = int(window) if window else None
        self.act = mlp.act_fn
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.inter = mlp.gate_proj.weight.shape[0]

        def lin(w, b):  # cpu_linear decides the path (oneDNN-packed on CPU, F.linear elsewhere)
            return make_linear(w, b, prepack=prepack)

        self.o = lin(attn.o_proj.weight, attn.o_proj.bias)
        self.down = lin(mlp.down_proj.weight, mlp.down_proj.bias)
        if fuse:
            self.qkv_lin = lin(self._fuse([attn.q_proj, attn.k_proj, attn.v_proj], "weight"),
                               self._fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias"))
            self.gu_lin = lin(self._fuse([mlp.gate_proj, mlp.up_proj], "weight"),
                              self._fuse([mlp.gate_proj, mlp.up_proj], "bias"))
            self.fused = True
        else:
            self.lins = tuple(lin(m.weight, m.bias) for m in
                              (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
            self.fused = False

    def linears(self):
        return (self.o, self.down) + ((self.qkv_lin, self.gu_lin) if self.fused else self.lins)

    @staticmethod
    def _fuse(mods, name):
        """Concatenate, then make each module's parameter a view of the fused tensor."""
        parts = [getattr(m, name) for m in mods]
        if parts[0] is None:
            return None
        base = parts[0]._base
        if base is not None and all(p._base is base for p in parts):
            return base  # already fused by an earlier Engine on this model
        fused = torch.cat([p.detach() for p in parts], dim=0)
        off = 0
        for m, p in zip(mods, parts):
            n = p.shape[0]
            setattr(m, name, torch.nn.Parameter(fused[off:off + n], requires_grad=False))
            off += n
        return fused

    def qkv(self, x):
        if self.fused:
            return self.qkv_lin(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return tuple(f(x) for f in self.lins[:3])

    def mlp(self, x):
        if self.fused:
            g, u = self.gu_lin(x).split((self.inter, self.inter), dim=-1)
        else:
            g, u = self.lins[3](x), self.lins[4](x)
        return self.down(self.act(g) * u)


class Engine:
    """Continuous-batching generation with per-request steering. See the module docstring."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.cfg = cfg = config or EngineConfig()
        self.loaded = loaded
        model = loaded.model
        hf_cfg = model.config
        family = getattr(hf_cfg, "model_type", "?")
        if family not in FAST_PATH_FAMILIES:
            raise NotImplementedError(
                f"Engine: model family {family!r} is not on the fast path ({', '.join(FAST_PATH_FAMILIES)}); "
                "use welfare_server.model.hf_reference for hook-based steering of other families")
        rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
        # One parameter dict, or (Gemma3) one per layer type.
        rope_dicts = [rope] if "rope_type" in rope or "type" in rope or not all(
            isinstance(v, dict) for v in rope.values()) else list(rope.values())
        for params in rope_dicts:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type in ("dynamic", "longrope"):
                raise NotImplementedError(f"Engine: rope_type {rope_type!r} depends on the "
                                          "sequence length; not supported on the fast path")
        if getattr(hf_cfg, "use_bidirectional_attention", False):
            raise NotImplementedError("Engine: use_bidirectional_attention (an encoder variant) is not "
                                      "a causal LM; not supported on the fast path")
        if cfg.max_terms_per_row < 1 or cfg.max_terms_per_row > MAX_TERMS:
            raise ValueError(f"EngineConfig.max_terms_per_row must be in [1, {MAX_TERMS}] (kernel limit)")
        if not isinstance(cfg.prefill_chunk_tokens, int) or cfg.prefill_chunk_tokens < 1:
            raise ValueError(f"EngineConfig.prefill_chunk_tokens must be an integer >= 1 "
                             f"(got {cfg.prefill_chunk_tokens!r})")
        self.family = family
        self.device, self.dtype = loaded.device, loaded.dtype
        self.lm = model
        inner = model.model
        self.embed = inner.embed_tokens
        # Gemma scales embeddings by sqrt(D) (in the model's dtype); newer transformers fold that
        # into a scaled embedding module (with an embed_scale buffer), older ones do it in forward.
        self.embed_scale = None
        if family == "gemma" and not hasattr(self.embed, "embed_scale"):
            # On the device: a host->device copy per step would sync inside CUDA-graph capture.
            self.embed_scale = torch.tensor(hf_cfg.hidden_size ** 0.5, dtype=self.dtype, device=self.device)
        # Gemma3's rotary module keeps one table per layer type (forward(x, pos, layer_type)).
        rope_per_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        rope_keys = [hf_cfg.layer_types[i] if rope_per_type else None for i in range(len(inner.layers))]
        self.layers = [_Layer(b, hf_cfg, family, cfg.fuse_weights, self.dtype, cfg.cpu_prepack, key)
                       for b, key in zip(inner.layers, rope_keys)]
        self.L = len(self.layers)
        self.D = hf_cfg.hidden_size
        self.final_w = _norm_weight(inner.norm, family, self.dtype)
        self.final_eps = _norm_eps(inner.norm)
        self.final_softcap = getattr(hf_cfg, "final_logit_softcapping", None)
        self.lm_head = make_linear(model.lm_head.weight, getattr(model.lm_head, "bias", None),
                                   prepack=cfg.cpu_prepack)
        self.vocab = self.lm_head.out_features
        l0 = self.layers[0]
        S, T = cfg.max_batch_slots, cfg.max_context_len
        dev = self.device
        # RoPE tables for every position, computed once by the model's own rotary module
        # (identical elementwise maths to calling it per step): key -> (cos, sin, signed sin)
        # [T, head_dim], one key per layer type where the model has several (Gemma3), else None.
        self.rope = {}
        with torch.inference_mode():
            pos = torch.arange(T, device=dev)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=dev)
            for key in dict.fromkeys(rope_keys):
                cos, sin = inner.rotary_emb(probe, pos) if key is None else inner.rotary_emb(probe, pos, key)
                cos, sin = cos[0].clone(), sin[0].clone()
                h2 = sin.shape[-1] // 2
                self.rope[key] = (cos, sin, torch.cat((-sin[:, :h2], sin[:, h2:]), dim=-1))
        # KV cache [L, S, kv_heads, T, head_dim]: all memory the engine will ever use for it.
        self.k_cache = torch.zeros(self.L, S, l0.n_kv, T, l0.head_dim, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        # Vector bank and per-slot term tables (fixed buffers: graphs read their addresses).
        self.bank = VectorBank(cfg.max_bank_vectors, self.D, dev)
        self.monitor_bank = VectorBank(cfg.max_monitor_vectors, self.D, dev)
        NT = cfg.max_terms_per_row
        self.tv = torch.full((self.L, 2, S, NT), -1, dtype=torch.int32, device=dev)
        self.tc = torch.zeros((self.L, 2, S, NT), dtype=torch.float32, device=dev)
        self.tm = torch.zeros((self.L, 2, S, NT), dtype=torch.int32, device=dev)
        self._slot_width = torch.zeros((S, self.L, 2), dtype=torch.int64)  # host copy: terms per slot
        # Static-step input buffers.
        self.ids_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(S, dtype=torch.long, device=dev)
        self._graphs: dict = {}
        self._graph_pool = None
        use_graphs = cfg.use_cuda_graphs and dev.type == "cuda"
        self.use_graphs = use_graphs
        self.static = use_graphs if cfg.static_decode is None else bool(cfg.static_decode)
        self._free_slots = list(range(S - 1, -1, -1))
        self._slots: list[_Seq | None] = [None] * S
        self._waiting: list[_Seq] = []
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(cfg.seed)
        self._tables_cache = None
        tok = None
        try:
            tok = loaded.tokenizer
        except Exception:  # noqa: BLE001 - a model without tokenizer still generates token ids
            tok = None
        self.tokenizer = tok
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(hf_cfg, "eos_token_id", None)
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ------------------------------------------------------------------ public API
    def refresh_weights(self) -> None:
        """Re-read the model's weights into the engine's packed CPU copies (cpu_linear.py); call
        it after changing the model's weights in place (the packed copies are snapshots)."""
        for lay in self.layers:
            for lin in lay.linears():
                lin.repack()
        self.lm_head.repack()

    def register_vector(self, vector: torch.Tensor) -> int:
        """Put a persistent vector in the bank; returns the id SteeringTerm.vector may use."""
        return self.bank.add(vector)

    def remove_vector(self, idx: int) -> None:
        self.bank.release(idx)

    def submit(self, request: Request) -> RequestHandle:
        """Validate and queue a request. Raises RequestRefused / SteeringError when it can never
        run under the configured limits."""
        cfg = self.cfg
        if len(self._waiting) >= cfg.max_waiting:
            raise RequestRefused(f"queue full: max_waiting={cfg.max_waiting} requests already waiting")
        roles = None
        if (request.prompt is None) == (request.messages is None):
            raise RequestRefused("request: give exactly one of prompt (token ids) or messages")
        if request.messages is not None:
            if self.tokenizer is None:
                raise RequestRefused("request.messages: this model has no tokenizer")
            ids, roles = render_chat(self.tokenizer, request.messages)
        else:
            ids = [int(t) for t in request.prompt]
            roles = list(request.prompt_roles) if request.prompt_roles is not None else None
            if roles is not None and len(roles) != len(ids):
                raise RequestRefused(f"request.prompt_roles: {len(roles)} roles for {len(ids)} tokens")
        sp = request.sampling
        if not ids:
            raise RequestRefused("request.prompt: empty")
        if any(t < 0 or t >= self.vocab for t in ids):
            raise RequestRefused(f"request.prompt: token id out of range [0, {self.vocab})")
        if sp.max_new_tokens < 1:
            raise RequestRefused("sampling.max_new_tokens must be >= 1")
        if len(ids) + sp.max_new_tokens > cfg.max_context_len:
            raise RequestRefused(
                f"request: prompt ({len(ids)} tokens) + sampling.max_new_tokens ({sp.max_new_tokens}) "
                f"exceeds max_context_len={cfg.max_context_len}")
        if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
            raise RequestRefused(f"sampling.temperature: {sp.temperature} must be finite and >= 0")
        if not 0 < sp.top_p <= 1:
            raise RequestRefused(f"sampling.top_p: {sp.top_p} must be in (0, 1]")
        if sp.top_k < 0:
            raise RequestRefused(f"sampling.top_k: {sp.top_k} must be >= 0 (0 = off)")
        if sp.seed is not None and not -2**63 <= sp.seed < 2**63:
            raise RequestRefused(f"sampling.seed: {sp.seed} does not fit in int64")
        new_vectors = validate_spec(request.steering, self.L, cfg.max_terms_per_row, self.bank)
        if new_vectors > self.bank.capacity:
            raise RequestRefused(f"steering: {new_vectors} new vectors exceed max_bank_vectors={self.bank.capacity}")
        if request.monitor is not None:
            m = request.monitor
            if m.vectors.dim() != 2 or m.vectors.shape[1] != self.D:
                raise RequestRefused(f"monitor.vectors: shape {tuple(m.vectors.shape)}, expected (M, {self.D})")
            if m.vectors.shape[0] > cfg.max_monitor_vectors:
                raise RequestRefused(f"monitor.vectors: {m.vectors.shape[0]} exceed max_monitor_vectors={cfg.max_monitor_vectors}")
            # Checked here, not at admission: a bad vector found there would fail mid-step.
            if not torch.isfinite(m.vectors).all():
                raise RequestRefused("monitor.vectors: contains NaN or inf")
            if m.point not in POINTS:
                raise RequestRefused(f"monitor.point: {m.point!r} is not one of {list(POINTS)}")
            for layer in m.layers:
                if not isinstance(layer, int) or not -self.L <= layer < self.L:
                    raise RequestRefused(f"monitor.layers: {layer!r} out of range [-{self.L}, {self.L})")
        rid = request.request_id or f"req-{next(self._ids)}"
        seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        stop = set(int(t) for t in sp.stop_token_ids)
        if not sp.ignore_eos:
            stop |= self.eos_ids
        seq = _Seq(request=request, output=RequestOutput(rid, list(ids), logprobs=[] if sp.logprobs else None),
                   prompt_ids=list(ids), roles=roles, seed=seed, stop_ids=frozenset(stop),
                   new_vectors=new_vectors)
        self._waiting.append(seq)
        return RequestHandle(self, seq)

    def cancel(self, handle: RequestHandle) -> None:
        """Mark a request cancelled; its slot is freed at the start of the next step."""
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
        for seq in list(self._waiting):
            if seq.cancelled:
                self._waiting.remove(seq)
                seq.output.finish_reason = "cancelled"
                finished.append(seq)
        for seq in self._slots:
            if seq is not None and seq.cancelled:
                self._finish(seq, "cancelled")
                finished.append(seq)
        new = self._admit()
        if new:
            budget = max(1, self.cfg.max_prefill_tokens)
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
        handles = [self.submit(r) for r in requests]
        self.run_until_done()
        return [h.output for h in handles]

    # ------------------------------------------------------------------ admission
    def _admit(self) -> list[_Seq]:
        new = []
        # In arrival order, but a request whose vectors do not fit in the bank now does not hold
        # up the ones behind it: it waits for running requests (or the removal of persistent
        # vectors) to free slots, while later requests that fit are admitted.
        position = 0
        while position < len(self._waiting) and self._free_slots:
            seq = self._waiting[position]
            req = seq.request
            n_mon = 0 if req.monitor is None else req.monitor.vectors.shape[0]
            if seq.new_vectors > self.bank.num_free or n_mon > self.monitor_bank.num_free:
                position += 1
                continue
            self._waiting.pop(position)
            seq.slot = self._free_slots.pop()
            self._slots[seq.slot] = seq
            seq.steering = resolve_spec(req.steering, self.L, self.cfg.max_terms_per_row, self.bank)
            s = seq.slot
            self.tv[:, :, s].copy_(seq.steering.vector)
            self.tc[:, :, s].copy_(seq.steering.coef)
            self.tm[:, :, s].copy_(seq.steering.mode)
            self._slot_width[s] = seq.steering.width
            if req.monitor is not None:
                seq.monitor_ids = [self.monitor_bank.add(v) for v in req.monitor.vectors]
                p = POINTS[req.monitor.point]
                seq.monitor_lp = [(l % self.L, p) for l in req.monitor.layers]
            new.append(seq)
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

    def _materialise(self, seq: _Seq) -> RequestOutput:
        out = seq.output
        if seq.monitor_rows:
            out.monitor = torch.stack(seq.monitor_rows)
        if self.tokenizer is not None and out.token_ids and not seq.request.sampling.stop_strings:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return out

    # ------------------------------------------------------------------ model pieces
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(rmsnorm(h, self.final_w, self.final_eps))
        if self.final_softcap is not None:  # Gemma2, in the model's dtype as HF does it
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _steer_point(self, h, tables, layer, point, mon, mon_out):
        """Apply (layer, point) terms to h [T, D]; returns h. tables: dict or None."""
        t = tables.get((layer, point)) if tables else None
        if t is not None:
            h, _ = steer(h, self.bank.tensor, *t, check_values=False)
        if mon is not None and (layer, point) in mon:
            mon_out[(layer, point)] = h.float() @ self.monitor_bank.tensor.t()
        return h

    def _layer_input(self, i, h, pending, tables):
        """Layer i's input in one pass: h (+ pending, the previous layer's MLP output not yet added),
        its block-input terms, and its input norm. Returns (h, normed input)."""
        lay = self.layers[i]
        t_in = tables.get((i, BLOCK_INPUT)) if tables else None
        if t_in is not None:
            h, x, _ = steer_rmsnorm(h, self.bank.tensor, *t_in, lay.norm1_w, lay.eps1, residual=pending,
                                    check_values=False)
        elif pending is not None:
            h, x = add_rmsnorm(h, pending, lay.norm1_w, lay.eps1)
        else:
            x = rmsnorm(h, lay.norm1_w, lay.eps1)
        return h, x

    def _forward(self, h, attend, tables, rope, mon=None, mon_out=None):
        """The layer stack on h [T, D]. rope: _rope_tables of the T positions.
        attend(layer_idx, layer, q, k, v) -> [T, H*hd], q/k already rotated.
        Each residual add is folded into the norm that reads its result (one kernel on CUDA),
        except where the block's output is steered or monitored, which needs h itself."""
        pending = None
        for i, lay in enumerate(self.layers):
            cs = rope[lay.rope_key]
            h, x = self._layer_input(i, h, pending, tables)
            if mon is not None and (i, BLOCK_INPUT) in mon:
                mon_out[(i, BLOCK_INPUT)] = h.float() @ self.monitor_bank.tensor.t()
            T = h.shape[0]
            if lay.fused and lay.q_norm is None:
                # q and k are adjacent columns of the fused output: rotate both in one pass
                # (4 ops instead of 14 per layer; ~12 us/layer at batch 1 on the dev CPU).
                y = lay.qkv_lin(x)
                qk = self._rope_qk(y[:, :lay.q_size + lay.kv_size].view(T, lay.n_heads + lay.n_kv, lay.head_dim), cs)
                q, k = qk[:, :lay.n_heads], qk[:, lay.n_heads:]
                v = y[:, lay.q_size + lay.kv_size:].view(T, lay.n_kv, lay.head_dim)
            else:
                q, k, v = lay.qkv(x)
                q = q.reshape(T, lay.n_heads, lay.head_dim)
                k = k.reshape(T, lay.n_kv, lay.head_dim)
                v = v.reshape(T, lay.n_kv, lay.head_dim)
                if lay.q_norm is not None:
                    q = lay.q_norm(q)
                    k = lay.k_norm(k)
                q, k = self._rope(q, k, cs)
            a = lay.o(attend(i, lay, q, k, v))
            if lay.post_attn is not None:
                a = rmsnorm(a, *lay.post_attn)
            h, x = add_rmsnorm(h, a, lay.norm2_w, lay.eps2)
            m = lay.mlp(x)
            if lay.post_mlp is not None:
                m = rmsnorm(m, *lay.post_mlp)
            output_used = (tables and (i, BLOCK_OUTPUT) in tables) or (mon is not None and (i, BLOCK_OUTPUT) in mon)
            if i + 1 < self.L and not output_used:
                pending = m
            else:
                pending = None
                h = self._steer_point(h + m, tables, i, BLOCK_OUTPUT, mon, mon_out)
        return h

    def _additive_mask(self, m):
        """0 where attended, -inf elsewhere (what SDPA turns a bool mask into, once per step)."""
        return torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, float("-inf"))

    def _rope_tables(self, pos):
        """Per rope key, cos/sin/signed sin [T, 1, hd] for positions pos, gathered once per step
        (not per layer)."""
        return {key: tuple(t[pos][:, None, :] for t in tables) for key, tables in self.rope.items()}

    @staticmethod
    def _rope(q, k, cs):
        cos, sin, _ = cs
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def _rope_qk(x, cs):
        """HF's x*cos + rotate_half(x)*sin on x [T, heads, hd], bit for bit: rotate_half(x)*sin
        = swap_halves(x) * [-sin_lo, sin_hi] (negation commutes exactly with the product)."""
        cos, _, sin_signed = cs
        T, H, hd = x.shape
        out = x * cos
        out += x.view(T, H, 2, hd // 2).flip(-2).view(T, H, hd) * sin_signed
        return out

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
            steer_mask[r, :n] = prompt_steer_mask(s.steering.scope, s.roles, n)
        ids, steer_mask = ids.to(dev), steer_mask.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        mon = self._monitor_set(seqs)
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
                                             steer_mask[rows_t, c0:c1], lens_t[rows_t], c0, mon)
            ending = [j for j, r in enumerate(rows) if lens[r] <= c1]
            if ending:
                at = torch.tensor([j * (c1 - c0) + lens[rows[j]] - 1 - c0 for j in ending], device=dev)
                dest = rows_t[ending]
                last_h[dest] = h[at]
                for key, proj in mon_out.items():
                    if key not in last_mon:
                        last_mon[key] = proj.new_empty((N, proj.shape[1]))
                    last_mon[key][dest] = proj[at]
        logits = self._logits(last_h)
        for s, n in zip(seqs, lens):
            s.length = n
        return self._sample_and_advance(seqs, logits, last_mon)

    def _prefill_chunk(self, seqs, ids, steer_mask, lens, c0, mon):
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
        cache_rows = _slot_rows(slot_list, slots)
        masks = {}

        def mask_for(window, g):
            if (window, g) not in masks:
                m = _attends(mask_pos, kpos, window)  # [A, T, c1]
                # One row per (token, query head of a kv head), matching _gqa_attention's layout.
                masks[window, g] = self._additive_mask(m[:, None].repeat_interleave(g, dim=2))
            return masks[window, g]

        cs = self._rope_tables(qpos.repeat(A))

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[w_slot, :, w_pos] = k.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            vc[w_slot, :, w_pos] = v.view(A, T, lay.n_kv, lay.head_dim)[real_row, real_tok]
            return _gqa_attention(lay, q, kc[cache_rows, :, :c1], vc[cache_rows, :, :c1],
                                  mask_for(lay.window, lay.n_heads // lay.n_kv), A, T)

        # Per-token term tables: each row's terms on the chunk's tokens its scope covers, -1 elsewhere.
        tables = {}
        width = torch.stack([s.steering.width for s in seqs]).amax(0)  # [L, 2]
        for l, p in (width > 0).nonzero().tolist():
            w = int(width[l, p])
            tables[(l, p)] = token_term_tables(self.tv[l, p, slots, :w], self.tc[l, p, slots, :w],
                                               self.tm[l, p, slots, :w], steer_mask)
        mon_out = {}
        h = self._embed(ids.reshape(-1))
        h = self._forward(h, attend, tables, cs, mon, mon_out)
        return h, mon_out

    def _monitor_set(self, seqs):
        lp = set()
        for s in seqs:
            lp.update(s.monitor_lp)
        return lp or None

    # ------------------------------------------------------------------ decode
    def _decode_tables(self, slots_t, rows_key):
        """Term tables of the running rows (rebuilt only when the batch composition changes)."""
        if self._tables_cache is not None and self._tables_cache[0] == rows_key:
            return self._tables_cache[1]
        widths = self._slot_width[list(rows_key)].amax(0)  # [L, 2]
        tables = {}
        for l, p in (widths > 0).nonzero().tolist():
            w = int(widths[l, p])
            # Gathered copies (the kernels want contiguous tables), made once per composition.
            tables[(l, p)] = tuple(t[l, p, slots_t, :w] for t in (self.tv, self.tc, self.tm))
        self._tables_cache = (rows_key, tables)
        return tables

    def _decode(self, seqs: list[_Seq]) -> list[_Seq]:
        if self.static:
            return self._decode_static(seqs)
        dev = self.device
        B = len(seqs)
        slot_list = tuple(s.slot for s in seqs)
        slots = torch.tensor(slot_list, device=dev)
        pos = torch.tensor([s.length for s in seqs], device=dev)
        ids = torch.tensor([s.next_token for s in seqs], device=dev)
        ctx = max(s.length for s in seqs) + 1
        cache_rows = _slot_rows(slot_list, slots)
        kpos = torch.arange(ctx, device=dev)
        masks = {}

        def mask_for(window):
            if window not in masks:
                # Additive float mask: a bool mask costs SDPA a where() per layer.
                masks[window] = self._additive_mask(_attends(pos, kpos, window)[:, None, None, :])  # [B, 1, 1, ctx]
            return masks[window]

        cs = self._rope_tables(pos)

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slots, :, pos] = k
            vc[slots, :, pos] = v
            return _gqa_attention(lay, q, kc[cache_rows, :, :ctx], vc[cache_rows, :, :ctx],
                                  mask_for(lay.window), B, 1)

        tables = self._decode_tables(slots, slot_list)
        mon = self._monitor_set(seqs)
        mon_out = {}
        h = self._embed(ids)
        h = self._forward(h, attend, tables, cs, mon, mon_out)
        logits = self._logits(h)
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

        cs = self._rope_tables(pos)

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            if lay.window not in masks:
                masks[lay.window] = self._additive_mask(_attends(pos, kpos, lay.window)[:, None, None, :])
            return _gqa_attention(lay, q, kc[:B, :, :ctx], vc[:B, :, :ctx], masks[lay.window], B, 1)

        tables = {}
        for l in range(self.L):
            for p, on in ((BLOCK_INPUT, steer_in), (BLOCK_OUTPUT, steer_out)):
                if on:
                    tables[(l, p)] = (self.tv[l, p, :B], self.tc[l, p, :B], self.tm[l, p, :B])
        h = self._embed(self.ids_buf[:B])
        h = self._forward(h, attend, tables, cs)
        return self._logits(h)

    def _decode_static(self, seqs: list[_Seq]) -> list[_Seq]:
        if any(s.monitor_lp for s in seqs):
            # Monitoring reads per-layer projections on the host; it runs the eager path.
            saved, self.static = self.static, False
            try:
                return self._decode(seqs)
            finally:
                self.static = saved
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
        entry = self._graphs.get(key)
        if entry is None:
            # Warm up on a side stream (Triton JIT, cuBLAS handles), then capture. Capture per
            # (bucket, ctx bucket, steering on/off) takes milliseconds, not a compilation.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._static_step(*key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._static_step(*key)
            entry = self._graphs[key] = (graph, out)
        graph, out = entry
        graph.replay()
        return out

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
    def _sample(self, seqs: list[_Seq], logits: torch.Tensor):
        """tokens [B] (device) and chosen-token logprobs [B] or None."""
        B, V = logits.shape
        dev = logits.device
        sps = [s.request.sampling for s in seqs]
        greedy = all(sp.temperature == 0 for sp in sps)
        if greedy:
            tokens = logits.argmax(-1)
        else:
            temp = torch.tensor([sp.temperature if sp.temperature > 0 else 1.0 for sp in sps], device=dev)
            scaled = logits / temp[:, None]
            if any(sp.top_k > 0 or sp.top_p < 1.0 for sp in sps):
                srt, idx = scaled.sort(-1, descending=True)
                rank = torch.arange(V, device=dev)[None, :]
                k = torch.tensor([sp.top_k if sp.top_k > 0 else V for sp in sps], device=dev)
                srt = srt.masked_fill(rank >= k[:, None], float("-inf"))
                probs = srt.softmax(-1)
                top_p = torch.tensor([sp.top_p for sp in sps], device=dev)
                drop = (probs.cumsum(-1) - probs) > top_p[:, None]  # keeps at least the top token
                srt = srt.masked_fill(drop, float("-inf"))
                scaled = torch.full_like(scaled, float("-inf")).scatter(1, idx, srt)
            seed = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev)
            step = torch.tensor([len(s.output.token_ids) for s in seqs], dtype=torch.int64, device=dev)
            sampled = (scaled + gumbel_noise(seed, step, V)).argmax(-1)
            is_greedy = torch.tensor([sp.temperature == 0 for sp in sps], device=dev)
            tokens = torch.where(is_greedy, logits.argmax(-1), sampled)
        lp = None
        if any(sp.logprobs for sp in sps):
            lp = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        return tokens, lp

    def _sample_and_advance(self, seqs: list[_Seq], logits: torch.Tensor, mon_out: dict) -> list[_Seq]:
        tokens, lp = self._sample(seqs, logits)
        tokens = tokens.tolist()  # the step's one host sync
        lp = lp.tolist() if lp is not None else None
        mon_host = {k: v.cpu() for k, v in mon_out.items()}
        finished = []
        for b, (s, tok) in enumerate(zip(seqs, tokens)):
            out = s.output
            out.token_ids.append(tok)
            if out.logprobs is not None:
                out.logprobs.append(lp[b])
            if s.monitor_lp:
                s.monitor_rows.append(torch.stack([mon_host[lp_][b, s.monitor_ids] for lp_ in s.monitor_lp]))
            s.next_token = tok
            sp = s.request.sampling
            reason = None
            if tok in s.stop_ids:
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
