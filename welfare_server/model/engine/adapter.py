"""The model adapter: what the engine's loop needs from a Hugging Face causal LM, per family.

It reuses the HF model's weights and submodules (no copy, except the CPU's prepacked linears and
the fused q/k/v and gate/up weights, whose HF parameters become views of the fused tensors) and
knows each family's quirks: Gemma's (1 + w) norms and sqrt(D)-scaled embedding, Gemma2/3's
sandwich norms and soft caps, q/k norms (Qwen3, Gemma3), sliding windows, one RoPE table per layer
type (Gemma3). `forward` runs the layer stack on [T, D] rows given an attention callback (the
loop's KV cache) and the pass's Taps (steering, monitors, captures).

Fast-path families (loading.FAST_PATH_FAMILIES): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and
Gemma3 (text); others are refused with NotImplementedError naming the family (use
model.hf_reference for hook-based steering of those), as are RoPE types whose table depends on
the sequence length (dynamic NTK, longrope) and bidirectional attention.

Numerics: fp32 on CPU matches HF generate's greedy tokens (tests), with the linears on oneDNN
prepacked weights (cpu_linear.py; its accumulation order differs from MKL's in the last bits).
Gemma's norm is applied as bf16(xn) * bf16(1 + w) in half precision, where HF computes
(xn * (1 + w)) in fp32: exact in fp32, a last-bit difference in bf16.
"""

from __future__ import annotations

import inspect

import torch

from welfare_server.kernels import add_rmsnorm, cpu_native, rmsnorm, steer_rmsnorm
from welfare_server.model.cpu_linear import make_linear
from welfare_server.model.engine.taps import Taps
from welfare_server.model.loading import FAST_PATH_FAMILIES
from welfare_server.model.steering import BLOCK_INPUT, BLOCK_OUTPUT


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


GEMMA_NORM_FAMILIES = ("gemma", "gemma2", "gemma3_text")


def _norm_weight(module, family: str, dtype):
    """The RMSNorm's weight as kernels.rmsnorm and steer_rmsnorm apply it: Gemma's norms scale by
    (1 + w), precomputed here once."""
    if family in GEMMA_NORM_FAMILIES:
        return (1.0 + module.weight.float()).to(dtype)
    return module.weight


def _norm_eps(module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def _is_silu(act) -> bool:
    """Whether the MLP's activation is SiLU (torch's module or transformers' SiLUActivation)."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


class DecoderLayer:
    """What the loop needs from one HF decoder layer (views of its weights, its submodules)."""

    def __init__(self, block, config, family: str, fuse: bool, dtype, prepack: bool, rope_key):
        attn, mlp = block.self_attn, block.mlp
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.rope_key = rope_key  # which of the adapter's RoPE tables this layer rotates with

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
        self.act_is_silu = _is_silu(mlp.act_fn)
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
            gu = self.gu_lin(x)
            if self.act_is_silu:
                a = cpu_native.silu_mul(gu, self.inter)
                if a is not None:
                    return self.down(a)
            g, u = gu.split((self.inter, self.inter), dim=-1)
        else:
            g, u = self.lins[3](x), self.lins[4](x)
        return self.down(self.act(g) * u)


class ModelAdapter:
    """One HF causal LM on the engine's fast path: its layers, norms, RoPE tables, embedding and
    head, and the layer stack as a function of rows (see the module docstring)."""

    def __init__(self, model, *, max_positions: int, dtype, device, fuse_weights: bool, cpu_prepack: bool):
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
        self.family = family
        self.dtype, self.device = dtype, device
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        # Gemma scales embeddings by sqrt(D) (in the model's dtype); newer transformers fold that
        # into a scaled embedding module (with an embed_scale buffer), older ones do it in forward.
        self.embed_scale = None
        if family == "gemma" and not hasattr(self.embed_tokens, "embed_scale"):
            # On the device: a host->device copy per step would sync inside CUDA-graph capture.
            self.embed_scale = torch.tensor(hf_cfg.hidden_size ** 0.5, dtype=dtype, device=device)
        # Gemma3's rotary module keeps one table per layer type (forward(x, pos, layer_type)).
        rope_per_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        rope_keys = [hf_cfg.layer_types[i] if rope_per_type else None for i in range(len(inner.layers))]
        self.layers = [DecoderLayer(b, hf_cfg, family, fuse_weights, dtype, cpu_prepack, key)
                       for b, key in zip(inner.layers, rope_keys)]
        self.L = len(self.layers)
        self.D = hf_cfg.hidden_size
        self.final_w = _norm_weight(inner.norm, family, dtype)
        self.final_eps = _norm_eps(inner.norm)
        self.final_softcap = getattr(hf_cfg, "final_logit_softcapping", None)
        self.lm_head = make_linear(model.lm_head.weight, getattr(model.lm_head, "bias", None), prepack=cpu_prepack)
        self.vocab = self.lm_head.out_features
        # RoPE tables for every position, computed once by the model's own rotary module
        # (identical elementwise maths to calling it per step): key -> (cos, sin, signed sin)
        # [T, head_dim], one key per layer type where the model has several (Gemma3), else None.
        self.rope = {}
        with torch.inference_mode():
            pos = torch.arange(max_positions, device=device)[None]
            probe = torch.zeros(1, dtype=dtype, device=device)
            for key in dict.fromkeys(rope_keys):
                cos, sin = inner.rotary_emb(probe, pos) if key is None else inner.rotary_emb(probe, pos, key)
                cos, sin = cos[0].clone(), sin[0].clone()
                h2 = sin.shape[-1] // 2
                self.rope[key] = (cos, sin, torch.cat((-sin[:, :h2], sin[:, h2:]), dim=-1))

    def refresh_weights(self) -> None:
        """Re-read the model's weights into the packed CPU copies (cpu_linear.py; they are snapshots)."""
        for lay in self.layers:
            for lin in lay.linears():
                lin.repack()
        self.lm_head.repack()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, V] of final hidden states [T, D]."""
        logits = self.lm_head(rmsnorm(h, self.final_w, self.final_eps))
        if self.final_softcap is not None:  # Gemma2, in the model's dtype as HF does it
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def rope_tables(self, pos):
        """Per rope key, cos/sin/signed sin [T, 1, hd] for positions pos [T], gathered once per
        forward (not per layer)."""
        return {key: tuple(t[pos][:, None, :] for t in tables) for key, tables in self.rope.items()}

    def _layer_input(self, i, h, pending, taps: Taps):
        """Layer i's input in one pass: h (+ pending, the previous layer's MLP output not yet added),
        its block-input terms, and its input norm. Returns (h, normed input)."""
        lay = self.layers[i]
        t_in = taps.terms(i, BLOCK_INPUT)
        if t_in is not None:
            h, x, _ = steer_rmsnorm(h, taps.bank, *t_in, lay.norm1_w, lay.eps1, residual=pending,
                                    check_values=False)
        elif pending is not None:
            h, x = add_rmsnorm(h, pending, lay.norm1_w, lay.eps1)
        else:
            x = rmsnorm(h, lay.norm1_w, lay.eps1)
        return h, x

    def forward(self, h, attend, taps: Taps, rope):
        """The layer stack on h [T, D]. rope: rope_tables of the T positions.
        attend(layer_idx, layer, q, k, v) -> [T, H*hd], q/k already rotated.
        Each residual add is folded into the norm that reads its result (one kernel on CUDA),
        except where a tap steers or reads the block's output, which needs h itself."""
        pending = None
        for i, lay in enumerate(self.layers):
            cs = rope[lay.rope_key]
            h, x = self._layer_input(i, h, pending, taps)
            taps.observe(i, BLOCK_INPUT, h)
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
            if i + 1 < self.L and not taps.touches(i, BLOCK_OUTPUT):
                pending = m
            else:
                pending = None
                h = taps.apply(i, BLOCK_OUTPUT, h + m)
        return h

    @staticmethod
    def _rope(q, k, cs):
        cos, sin, _ = cs
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def _rope_qk(x, cs):
        """HF's x*cos + rotate_half(x)*sin on x [T, heads, hd], bit for bit: rotate_half(x)*sin
        = swap_halves(x) * [-sin_lo, sin_hi] (negation commutes exactly with the product). On CPU
        the C++ op rotates x in place (the same roundings); elsewhere a new tensor."""
        cos, _, sin_signed = cs
        if cpu_native.rope_qk_(x, cos, sin_signed):
            return x
        T, H, hd = x.shape
        out = x * cos
        out += x.view(T, H, 2, hd // 2).flip(-2).view(T, H, hd) * sin_signed
        return out
