"""Request types of the engine and ALL validation of a request: the first layer every caller goes
through (the gRPC server maps its refusals to INVALID_ARGUMENT with the field).

`prepare(request, context)` checks every field strictly (fields.py: a bool is not an int, a float
is not an int, a string is not a number, nothing is coerced), tokenises chat messages, and returns
a PreparedRequest; it reads the engine's state (bank liveness, live request ids) but never changes
it, so a refused request leaves the engine exactly as it was. Steering specs and monitors are
checked by model.steering (validate_spec, validate_monitor), which raise SteeringError; everything
else raises RequestRefused. Both are InvalidRequest with a `.field`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from welfare_server.model.engine.config import EngineConfig
from welfare_server.model.fields import (InvalidRequest, check_bool, check_int, check_int_list, check_number,
                                         check_sequence, check_str)
from welfare_server.model.prompts import render_chat
from welfare_server.model.steering import (MonitorSpec, SteeringSpec, VectorBank, validate_monitor,
                                           validate_spec)

CHAT_ROLES = ("system", "user", "assistant")
"""Roles a chat message (and a prompt token's role) may have."""
MESSAGE_KEYS = ("role", "content")
"""Keys of a chat message; any other key is refused rather than silently dropped."""
SEED_RANGE = (-2**63, 2**63 - 1)
"""Seeds are int64."""


class RequestRefused(InvalidRequest):
    """A request is invalid, or can never run under the engine's limits (or the queue is full);
    the message names the field, the value and the rule or limit."""


class QueueFull(RequestRefused):
    """The request is valid but the waiting queue is at max_waiting: try again later (the server
    answers RESOURCE_EXHAUSTED, not INVALID_ARGUMENT)."""


@dataclass
class SamplingParams:
    """Per-request sampling. Accepted values (anything else is refused at submit, never coerced):"""

    temperature: float = 0.0
    """A finite number >= 0 (int or float, not bool); 0 = greedy."""
    top_p: float = 1.0
    """A number in (0, 1]; 1 = off. Keeps the smallest set of tokens whose probability reaches it."""
    top_k: int = 0
    """An int >= 0; 0 = off."""
    seed: int | None = None
    """None (the engine draws one) or an int64. Same seed + same prompt + same params = same
    tokens, whatever else is in the batch."""
    max_new_tokens: int = 64
    """An int >= 1; prompt + max_new_tokens must fit in EngineConfig.max_context_len. 0 only in a
    session: prefill-only, the turn caches its prompt and generates nothing (fork the session
    then, and let each fork generate)."""
    stop_strings: Sequence[str] = ()
    """A list of non-empty strings (at most EngineConfig.max_stop_sequences, each at most
    max_stop_string_chars); generation stops when the text contains one (the text is cut there)."""
    stop_token_ids: Sequence[int] = ()
    """A list of token ids in [0, vocab) (at most max_stop_sequences); the tokenizer's eos is a
    stop id too unless ignore_eos."""
    ignore_eos: bool = False
    """A bool: keep generating past eos."""
    logprobs: bool = False
    """A bool: return the log-probability of each chosen token under the model's distribution
    (raw logits: before temperature, top-k, top-p and allowed_token_ids) and, with
    allowed_token_ids, also under the allowed tokens alone (RequestOutput.masked_logprobs)."""
    allowed_token_ids: Sequence[int] | None = None
    """None, or a non-empty list of token ids in [0, vocab): every generated token is chosen among
    these (greedy: the most likely of them; sampling: from the distribution restricted to them).
    The maze's valid moves are the allowed ids of a rollout turn."""
    score_token_ids: Sequence[int] | None = None
    """None, or a non-empty list (at most EngineConfig.max_score_tokens) of token ids in [0, vocab)
    whose log-probabilities under the raw distribution are returned at every generated position
    (RequestOutput.scores): e.g. a judge's distribution over the rating tokens "1".."9"."""


@dataclass
class Request:
    """One generation request. Accepted values (anything else is refused at submit):"""

    prompt: Sequence[int] | None = None
    """A non-empty list (or 1-D int tensor) of token ids in [0, vocab), no roles: under
    ASSISTANT_AND_GENERATED scope none of them is steered unless prompt_roles says so. Exactly one
    of prompt / messages."""
    messages: Sequence[Mapping] | None = None
    """A non-empty list (at most EngineConfig.max_messages) of {"role": one of CHAT_ROLES,
    "content": a string of at most max_message_chars}; the tokenizer's chat template is applied
    with a generation prompt."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """A SamplingParams."""
    steering: SteeringSpec | None = None
    """None or a SteeringSpec (model.steering documents its fields)."""
    monitor: MonitorSpec | None = None
    """None or a MonitorSpec (model.steering documents its fields)."""
    prompt_roles: Sequence[str] | None = None
    """Only with `prompt`: None or one role (a CHAT_ROLES string) per prompt token."""
    request_id: str | None = None
    """None (the engine names it) or a non-empty string of at most max_request_id_chars that no
    live request of this engine uses."""
    session_id: str | None = None
    """None, or the id of an open session (Engine.open_session) with no turn running: the prompt is
    appended to the session's history (after its last token) and the cache of every earlier
    token is reused; in a session that has a history the prompt may be empty, and messages are
    refused (they render a whole conversation). After the request the session keeps its cache."""
    stream: bool = False
    """A bool: keep StreamEvents (one per token, then a final one) for RequestHandle.stream() /
    astream()."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """"stop" (stop id or string), "length" (max_new_tokens), "cancelled", "error" (error says
    what); None while running."""
    error: str | None = None
    logprobs: list[float] | None = None
    masked_logprobs: list[float] | None = None
    """With allowed_token_ids and logprobs: each chosen token's log-probability under the
    distribution restricted to the allowed tokens (what a policy gradient over them needs)."""
    monitor: torch.Tensor | None = None
    """fp32 [n_tokens, len(layers), M]: row i is the residual of the forward pass that produced
    token i (for token 0 the last prompt position)."""
    scores: list[list[float]] | None = None
    """With score_token_ids: per generated token, the log-probability of each of those ids."""


@dataclass
class RequestContext:
    """What validation reads from the engine (never writes)."""

    config: EngineConfig
    num_layers: int
    vocab: int
    bank: VectorBank
    monitor_bank: VectorBank
    tokenizer: Any
    eos_ids: frozenset
    live_request_ids: Any
    """A container of the request ids of queued and running requests."""
    sessions: Any = None
    """The engine's SessionTable (sessions.py)."""


@dataclass
class PreparedRequest:
    """A request that passed every check, with what the loop needs precomputed."""

    request: Request
    prompt_ids: list[int]
    roles: list[str] | None
    stop_ids: frozenset
    new_vectors: int
    monitor_vectors: int
    allowed_ids: list[int] | None
    score_ids: list[int] | None = None
    session: Any = None
    """The Session this request continues, or None."""


def _refuse(message: str) -> RequestRefused:
    return RequestRefused(message)


def _check_messages(messages, cfg: EngineConfig, tokenizer) -> tuple[list[int], list[str]]:
    items = check_sequence(messages, "request.messages", RequestRefused, what="messages",
                           max_len=cfg.max_messages, limit_name="max_messages", nonempty=True)
    clean = []
    for i, message in enumerate(items):
        where = f"request.messages[{i}]"
        if not isinstance(message, Mapping):
            raise _refuse(f"{where}: a {type(message).__name__}, expected a dict with keys {list(MESSAGE_KEYS)}")
        unknown = [k for k in message if k not in MESSAGE_KEYS]
        if unknown:
            raise _refuse(f"{where}: unknown key {unknown[0]!r} (allowed: {list(MESSAGE_KEYS)})")
        for key in MESSAGE_KEYS:
            if key not in message:
                raise _refuse(f"{where}.{key}: missing (every message needs {list(MESSAGE_KEYS)})")
        check_str(message["role"], f"{where}.role", RequestRefused, choices=CHAT_ROLES)
        check_str(message["content"], f"{where}.content", RequestRefused, nonempty=False,
                  max_len=cfg.max_message_chars)
        clean.append({"role": message["role"], "content": message["content"]})
    if tokenizer is None:
        raise _refuse("request.messages: this model has no tokenizer; give token ids in request.prompt")
    try:
        return render_chat(tokenizer, clean)
    except Exception as error:  # noqa: BLE001 - a template's own error (jinja) becomes a named refusal
        raise _refuse(f"request.messages: the chat template cannot render them ({error})") from None


def _check_sampling(sp, n_prompt: int, ctx: RequestContext, in_session: bool):
    cfg, vocab = ctx.config, ctx.vocab
    if not isinstance(sp, SamplingParams):
        raise _refuse(f"request.sampling: a {type(sp).__name__}, expected a SamplingParams")
    check_number(sp.temperature, "sampling.temperature", RequestRefused, 0.0)
    check_number(sp.top_p, "sampling.top_p", RequestRefused, 0.0, 1.0, lo_open=True)
    check_int(sp.top_k, "sampling.top_k", RequestRefused, 0, rule="an int >= 0; 0 = off")
    if sp.seed is not None:
        check_int(sp.seed, "sampling.seed", RequestRefused, *SEED_RANGE, rule="None or an int64")
    room = cfg.max_context_len - n_prompt
    max_new = check_int(sp.max_new_tokens, "sampling.max_new_tokens", RequestRefused, 0 if in_session else 1,
                        rule="an int >= 0 in a session (0: prefill only)" if in_session else "")
    if max_new > room:
        raise _refuse(f"sampling.max_new_tokens: {max_new} with a context of {n_prompt} tokens exceeds "
                      f"max_context_len={cfg.max_context_len} (at most {max(room, 0)} here)")
    stops = check_sequence(sp.stop_strings, "sampling.stop_strings", RequestRefused, what="strings",
                           max_len=cfg.max_stop_sequences, limit_name="max_stop_sequences")
    for i, text in enumerate(stops):
        check_str(text, f"sampling.stop_strings[{i}]", RequestRefused, max_len=cfg.max_stop_string_chars)
    if stops and ctx.tokenizer is None:
        raise _refuse("sampling.stop_strings: this model has no tokenizer to decode text; use stop_token_ids")
    stop_ids = check_int_list(sp.stop_token_ids, "sampling.stop_token_ids", RequestRefused, lo=0, hi=vocab - 1,
                              what="token ids", max_len=cfg.max_stop_sequences, limit_name="max_stop_sequences",
                              rule=f"token ids are in [0, {vocab})")
    check_bool(sp.ignore_eos, "sampling.ignore_eos", RequestRefused)
    check_bool(sp.logprobs, "sampling.logprobs", RequestRefused)
    allowed = None
    if sp.allowed_token_ids is not None:
        allowed = check_int_list(sp.allowed_token_ids, "sampling.allowed_token_ids", RequestRefused, lo=0,
                                 hi=vocab - 1, what="token ids", max_len=vocab, limit_name="the vocabulary size",
                                 nonempty=True, rule=f"token ids are in [0, {vocab})")
        allowed = sorted(set(allowed))
    scored = None
    if sp.score_token_ids is not None:
        scored = check_int_list(sp.score_token_ids, "sampling.score_token_ids", RequestRefused, lo=0, hi=vocab - 1,
                                what="token ids", max_len=cfg.max_score_tokens, limit_name="max_score_tokens",
                                nonempty=True, rule=f"token ids are in [0, {vocab})")
    stop = set(stop_ids) if sp.ignore_eos else set(stop_ids) | set(ctx.eos_ids)
    return frozenset(stop), allowed, scored


def prepare(request: Request, ctx: RequestContext) -> PreparedRequest:
    """Check every field of `request` (see the module docstring); raises RequestRefused or
    SteeringError naming the field, and changes nothing."""
    cfg = ctx.config
    if not isinstance(request, Request):
        raise _refuse(f"request: a {type(request).__name__}, expected a Request")
    if (request.prompt is None) == (request.messages is None):
        raise _refuse("request: give exactly one of prompt (token ids) or messages")
    if request.request_id is not None:
        check_str(request.request_id, "request.request_id", RequestRefused, max_len=cfg.max_request_id_chars)
        if request.request_id in ctx.live_request_ids:
            raise _refuse(f"request.request_id: {request.request_id!r} is already used by a live request")
    check_bool(request.stream, "request.stream", RequestRefused)
    session = None
    if request.session_id is not None:
        check_str(request.session_id, "request.session_id", RequestRefused, max_len=cfg.max_request_id_chars)
        session = ctx.sessions.lookup(request.session_id)
        if session.busy is not None:
            raise _refuse(f"request.session_id: session {request.session_id!r} is busy with request "
                          f"{session.busy!r} (one turn at a time)")
    history = session.tokens if session is not None else 0
    roles = None
    if request.messages is not None:
        if request.prompt_roles is not None:
            raise _refuse("request.prompt_roles: only with prompt (messages carry their roles)")
        if history:
            raise _refuse("request.messages: a session's later turns give token ids in request.prompt "
                          "(the chat template renders whole conversations)")
        ids, roles = _check_messages(request.messages, cfg, ctx.tokenizer)
    else:
        ids = check_int_list(request.prompt, "request.prompt", RequestRefused, lo=0, hi=ctx.vocab - 1,
                             what="token ids", max_len=cfg.max_context_len, limit_name="max_context_len",
                             nonempty=not history, rule=f"token ids are in [0, {ctx.vocab})")
        if request.prompt_roles is not None:
            roles = check_sequence(request.prompt_roles, "request.prompt_roles", RequestRefused, what="roles")
            if len(roles) != len(ids):
                raise _refuse(f"request.prompt_roles: {len(roles)} roles for {len(ids)} prompt tokens")
            for i, role in enumerate(roles):
                check_str(role, f"request.prompt_roles[{i}]", RequestRefused, choices=CHAT_ROLES)
    context = history + len(ids)
    if context >= cfg.max_context_len and not (session is not None and context == cfg.max_context_len):
        raise _refuse(f"request.prompt: {len(ids)} tokens" + (f" after a session history of {history}" if history
                                                              else "") +
                      f" leave no room to generate under max_context_len={cfg.max_context_len}")
    stop_ids, allowed, scored = _check_sampling(request.sampling, context, ctx, session is not None)
    if session is not None:
        grown = context + request.sampling.max_new_tokens
        others = ctx.sessions.cached_tokens() - session.length
        if grown > cfg.max_session_tokens or (cfg.session_policy == "refuse" and others + grown > cfg.max_session_tokens):
            raise _refuse(f"request.session_id: the session would cache up to {grown} tokens"
                          + (f" beside {others} cached by the other sessions" if others else "")
                          + f", more than max_session_tokens={cfg.max_session_tokens}")
    new_vectors = validate_spec(request.steering, ctx.num_layers, cfg.max_terms_per_row, ctx.bank)
    monitor_vectors = validate_monitor(request.monitor, ctx.num_layers, ctx.monitor_bank)
    return PreparedRequest(request=request, prompt_ids=list(ids), roles=roles, stop_ids=stop_ids,
                           new_vectors=new_vectors, monitor_vectors=monitor_vectors, allowed_ids=allowed,
                           score_ids=scored, session=session)

