"""Load causal LMs: local Hugging Face directories, the bundled SmolLM2, tiny random presets.

`RuntimeConfig` is the ONE place where dtype and device are decided; everything downstream (the
engine, the vector bank, the KV cache) reads them from the loaded model.

Supported by the engine's fast path (see engine.py): Llama, Mistral, Qwen2, Qwen3, Gemma (v1),
i.e. every decoder whose block is `x + attn(norm(x))` then `x + mlp(norm(x))` with RoPE.
Any other `AutoModelForCausalLM` still loads here (and works with the hook reference), but
Engine refuses it with a message naming the family.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUNDLED_NAME = "smollm2-135m-instruct"
"""Name under which load_model finds the bundled SmolLM2-135M-Instruct."""

# Families whose block layout the engine implements natively (model_type from config.json).
FAST_PATH_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in what precision the model runs. Resolved once by `resolve()`."""

    device: str = "auto"
    """"auto" (CUDA when available, else CPU), or any torch device string ("cpu", "cuda:1")."""

    dtype: str = "auto"
    """"auto": bfloat16 on CUDA; on CPU bfloat16 only where the CPU computes bf16 dot products
    natively (AVX512_BF16 or AMX: cpu_linear.cpu_has_native_bf16), float32 elsewhere, where bf16
    is widened in software and runs slower than fp32 (measurements in cpu_linear.py). Or
    "float32" / "bfloat16" / "float16" (aliases fp32, bf16, fp16)."""

    seed: int = 0
    """Seed of the random initialisation of the tiny presets (ignored for real checkpoints)."""

    attn_implementation: str = "auto"
    """Attention implementation HF uses for its own forward (the reference path): "auto" is eager
    for models with soft-capped attention scores (Gemma2: SDPA cannot cap, and transformers 5.17
    still picks SDPA for it, silently dropping the cap) and transformers' own choice otherwise;
    or "sdpa" / "eager". The engine always runs its own attention."""

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if self.dtype == "auto":
            from welfare_server.model.cpu_linear import cpu_has_native_bf16

            fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
            dtype = torch.bfloat16 if fast_bf16 else torch.float32
        else:
            try:
                dtype = {"float32": torch.float32, "fp32": torch.float32,
                         "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                         "float16": torch.float16, "fp16": torch.float16}[self.dtype]
            except KeyError:
                raise ValueError(f"RuntimeConfig.dtype: unknown dtype {self.dtype!r} "
                                 "(use auto, float32, bfloat16 or float16)") from None
        return device, dtype


# Tiny random presets: small dims, but every architectural feature of the family switched on
# (GQA, q/k norms, sliding window, Gemma's scaled embedding) so the engine's handling of each is
# tested. Vocab is the SmolLM2 tokenizer's, so chat templates and stop strings work with them.
_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=49152, max_position_embeddings=1024, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", dict(_TINY_COMMON, tie_word_embeddings=True)),
    "tiny-mistral": ("MistralConfig", dict(_TINY_COMMON, sliding_window=24, tie_word_embeddings=False)),
    # Qwen2: layers >= max_window_layers use a sliding window (layer_types), the rest full attention.
    "tiny-qwen2": ("Qwen2Config", dict(_TINY_COMMON, attention_bias=True, tie_word_embeddings=True,
                                       use_sliding_window=True, sliding_window=24, max_window_layers=2)),
    "tiny-qwen3": ("Qwen3Config", dict(_TINY_COMMON, tie_word_embeddings=True)),
    "tiny-gemma": ("GemmaConfig", dict(_TINY_COMMON, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # Gemma2: sandwich norms around attention and MLP, sliding/full layers alternating, attention
    # scaled by query_pre_attn_scalar (not head_dim), and soft-capped attention and final logits.
    # The caps are far below the real 50/30, and the weights 7.5x the usual init scale, so that
    # scores and logits reach the caps: leaving one out changes the tokens or the logprobs.
    "tiny-gemma2": ("Gemma2Config", dict(_TINY_COMMON, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                         sliding_window=24, query_pre_attn_scalar=32, initializer_range=0.15,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # Gemma3 (text): Gemma2's layout without soft-capping, plus q/k norms and one RoPE per layer
    # type (local base on sliding layers; a linearly scaled global base on full ones).
    "tiny-gemma3": ("Gemma3TextConfig", dict(
        _TINY_COMMON, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=24,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})),
    # The SmolLM2-135M shape with random weights: what the benchmark measures.
    "smollm2-135m-random": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2)),
}


@dataclass
class LoadedModel:
    """A causal LM on its device, with its tokenizer (loaded lazily for presets)."""

    model: torch.nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    _tokenizer: Any = field(default=None, repr=False)
    _tokenizer_dir: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        """The HF tokenizer; random presets borrow the bundled SmolLM2 tokenizer (same vocab)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok_dir = self._tokenizer_dir
            if tok_dir is None:
                from welfare_server.model.bundled import default_tokenizer_dir

                tok_dir = str(default_tokenizer_dir())
            self._tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return self._tokenizer


def _build_config(preset: str, **overrides):
    import transformers

    cls_name, kwargs = PRESETS[preset]
    cls = getattr(transformers, cls_name)
    kwargs = dict(kwargs, **overrides)
    if "rope_theta" in kwargs:  # 5.x configs take rope_parameters; keep one spelling here
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    return cls(**kwargs)


def _attn_implementation(runtime: RuntimeConfig, config) -> str | None:
    """What to ask transformers for (None: its default). See RuntimeConfig.attn_implementation."""
    if runtime.attn_implementation != "auto":
        return runtime.attn_implementation
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def load_model(name_or_path: str | os.PathLike, runtime: RuntimeConfig | None = None, *,
               dtype: str | None = None, device: str | None = None, **config_overrides) -> LoadedModel:
    """Load a preset name, "smollm2-135m-instruct" or a local HF directory.

    dtype/device, when given, override the corresponding RuntimeConfig fields. config_overrides
    apply to presets only (e.g. num_hidden_layers=2).
    """
    from transformers import AutoModelForCausalLM

    runtime = runtime or RuntimeConfig()
    if dtype is not None or device is not None:
        runtime = dataclasses.replace(runtime, **{k: v for k, v in (("dtype", dtype), ("device", device))
                                                  if v is not None})
    dev, dt = runtime.resolve()
    name = str(name_or_path)
    tokenizer_dir = None
    if name in PRESETS:
        cfg = _build_config(name, **config_overrides)
        attn = _attn_implementation(runtime, cfg)
        # Seeded CPU init, then cast/move: the same preset+seed gives the same weights anywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(runtime.seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    else:
        if config_overrides:
            raise ValueError("config overrides apply to presets only")
        if name == BUNDLED_NAME:
            from welfare_server.model.bundled import default_model_dir

            path = Path(default_model_dir())
        else:
            path = Path(name).expanduser()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}, {BUNDLED_NAME}) "
                    "nor a local Hugging Face directory with a config.json")
        tokenizer_dir = str(path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))  # read once: it decides the attention too
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dt,
                                                     attn_implementation=_attn_implementation(runtime, config))
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, name=name, device=dev, dtype=dt, _tokenizer_dir=tokenizer_dir)
