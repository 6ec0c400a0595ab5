"""EngineConfig: every limit and switch of one Engine, checked when the config is made.

All memory (KV cache, vector banks, term tables) is allocated from these at construction, so a
config that could never serve a request (no slots, no context, no queue) is refused here, naming
the field, instead of at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass

from welfare_server.kernels import MAX_TERMS
from welfare_server.model.fields import check_bool, check_int, check_str, is_int

MAX_SLOTS = 65536
"""Upper bound of max_batch_slots (rows of every per-slot table)."""
MAX_CONTEXT = 1 << 20
"""Upper bound of max_context_len (RoPE tables and the KV cache are sized by it)."""


@dataclass
class EngineConfig:
    """Limits and switches of one Engine (see the module docstring). Every field is checked when
    the config is made: ints must be ints (not bools or floats), bools bools."""

    max_batch_slots: int = 32
    """Requests running at once (rows of the KV cache and of the term tables)."""
    max_context_len: int = 2048
    """Prompt + generated tokens per request; longer requests are refused at submit."""
    max_bank_vectors: int = 256
    """Steering vectors resident on the device (persistent ones + those of running requests);
    0 turns steering off (a steered request is refused naming this field)."""
    max_terms_per_row: int = MAX_TERMS
    """Terms one request may apply at one (layer, point); width of the term tables."""
    max_monitor_vectors: int = 64
    """Monitor vectors resident at once (all running requests together); 0 turns monitoring off."""
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
    max_stop_sequences: int = 16
    """Stop strings, and separately stop token ids, one request may give."""
    max_stop_string_chars: int = 256
    """Characters of one stop string."""
    max_messages: int = 1024
    """Chat messages in one request."""
    max_message_chars: int = 1 << 20
    """Characters of one chat message's content (checked before tokenising it)."""
    max_request_id_chars: int = 256
    """Characters of a request id (or session id) given by the caller."""
    max_score_tokens: int = 64
    """Token ids one request may ask log-probabilities of at every step (score_token_ids)."""
    max_stream_events: int = 1024
    """Undelivered token events one streamed request may hold (stream.py); a consumer that falls
    further behind has its request cancelled with finish_reason "error"."""
    max_sessions: int | None = None
    """Sessions open at once (each holds a KV-cache slot between its turns); None = max_batch_slots.
    At most max_batch_slots."""
    max_session_tokens: int | None = None
    """Tokens cached by all open sessions together; None = max_sessions x max_context_len (no
    limit beyond the slots themselves)."""
    session_policy: str = "evict_lru"
    """What happens when a session limit (or a slot) is needed and none is free: "evict_lru" closes
    the least recently used idle session (its next use is refused, saying so), "refuse" refuses the
    request or the new session with RequestRefused naming the limit."""
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

    def __post_init__(self) -> None:
        def positive(name, lo=1, hi=None):
            check_int(getattr(self, name), f"EngineConfig.{name}", ValueError, lo, hi)

        positive("max_batch_slots", 1, MAX_SLOTS)
        positive("max_context_len", 2, MAX_CONTEXT)  # a prompt token and a generated one
        positive("max_bank_vectors", 0)
        positive("max_terms_per_row", 1, MAX_TERMS)  # the kernels' compile-time limit
        positive("max_monitor_vectors", 0)
        positive("max_prefill_tokens", 1)
        positive("prefill_chunk_tokens", 1)
        positive("max_waiting", 1)
        for name in ("max_stop_sequences", "max_stop_string_chars", "max_messages", "max_message_chars",
                     "max_request_id_chars", "max_stream_events", "max_score_tokens"):
            positive(name, 0 if name == "max_stop_sequences" else 1)
        if self.max_sessions is None:
            self.max_sessions = self.max_batch_slots
        positive("max_sessions", 0, self.max_batch_slots)
        if self.max_session_tokens is None:
            self.max_session_tokens = self.max_sessions * self.max_context_len
        positive("max_session_tokens", 0)
        check_str(self.session_policy, "EngineConfig.session_policy", ValueError, choices=("refuse", "evict_lru"))
        positive("graph_ctx_bucket", 1)
        positive("seed", 0, 2**63 - 1)
        for name in ("use_cuda_graphs", "fuse_weights", "cpu_prepack"):
            check_bool(getattr(self, name), f"EngineConfig.{name}", ValueError)
        if self.static_decode is not None:
            check_bool(self.static_decode, "EngineConfig.static_decode", ValueError)
        buckets = self.graph_batch_buckets
        if (not isinstance(buckets, (tuple, list)) or not buckets
                or not all(is_int(b) and b >= 1 for b in buckets)):
            raise ValueError(f"EngineConfig.graph_batch_buckets: {buckets!r} must be a non-empty tuple of ints >= 1")
        self.graph_batch_buckets = tuple(sorted(int(b) for b in buckets))
