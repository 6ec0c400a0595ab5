"""Multi-turn sessions: the KV cache of a conversation kept between requests.

A session holds one slot of the engine's KV cache. Its history is every token of its turns so far
(prompts and generated tokens); all but the last are in the cache, and the last one, `pending`
(the last generated token, or the last prompt token of a prefill-only turn), is fed at the start
of the next turn, whose request appends only its new tokens. Nothing of a kept prefix is ever
recomputed. A session can be forked: its cache rows are copied into new sessions (a GRPO group
plays G rollouts of one maze from one prefilled first turn).

Limits (EngineConfig): max_sessions open at once; max_session_tokens cached by all sessions
together. When a limit is reached, session_policy decides: "refuse" (RequestRefused naming the
limit) or "evict_lru" (the least recently used idle session is closed, and the next use of its id
is refused with a message saying it was evicted). Idle sessions hold their slots; under
"evict_lru" a request waiting for a slot also evicts the least recently used idle session.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from welfare_server.model.engine.requests import RequestRefused

SESSION_POLICIES = ("refuse", "evict_lru")


@dataclass
class Session:
    session_id: str
    slot: int = -1
    """The KV-cache slot holding its cache; -1 before its first turn."""
    length: int = 0
    """Tokens in the cache."""
    pending: int | None = None
    """The last token of the history, not yet in the cache (fed first by the next turn)."""
    pending_role: str = "user"
    history: list[int] = field(default_factory=list)
    """Every token so far: the cache's `length` tokens, then `pending` when there is one."""
    busy: str | None = None
    """The request id of the turn running (or queued) in it."""
    pinned: bool = False
    """Never evicted: a client that plays several turns in a row (a rollout between two maze steps)
    must not lose its cache to another request; it still counts against the limits."""
    last_used: int = 0

    @property
    def tokens(self) -> int:
        """Context the next turn starts from (cached plus pending)."""
        return self.length + (self.pending is not None)


class SessionTable:
    """Open sessions, their LRU order and the tombstones of evicted ones (the loop owns the slots
    and the cache; this table only keeps the books)."""

    def __init__(self, max_sessions: int, max_tokens: int, policy: str, tombstones: int):
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.policy = policy
        self.sessions: dict[str, Session] = {}
        self._evicted: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._tombstones = tombstones
        self._clock = itertools.count(1)
        self._ids = itertools.count()

    def cached_tokens(self) -> int:
        return sum(s.length for s in self.sessions.values())

    def new_id(self) -> str:
        while True:
            sid = f"session-{next(self._ids)}"
            if sid not in self.sessions and sid not in self._evicted:
                return sid

    def lookup(self, session_id: str, field_name: str = "request.session_id") -> Session:
        """The open session, or a refusal saying why there is none."""
        session = self.sessions.get(session_id)
        if session is not None:
            return session
        if session_id in self._evicted:
            raise RequestRefused(f"{field_name}: session {session_id!r} was closed by the engine: "
                                 f"{self._evicted[session_id]}; open a new session")
        raise RequestRefused(f"{field_name}: no open session {session_id!r} (Engine.open_session makes one)")

    def touch(self, session: Session) -> None:
        session.last_used = next(self._clock)

    def add(self, session_id: str, pinned: bool = False) -> Session:
        session = Session(session_id, pinned=pinned)
        self._evicted.pop(session_id, None)
        self.touch(session)
        self.sessions[session_id] = session
        return session

    def remove(self, session_id: str) -> Session:
        return self.sessions.pop(session_id)

    def mark_evicted(self, session_id: str, why: str) -> Session:
        session = self.sessions.pop(session_id)
        self._evicted[session_id] = why
        while len(self._evicted) > self._tombstones:
            self._evicted.popitem(last=False)
        return session

    def forget_tombstone(self, session_id: str) -> bool:
        return self._evicted.pop(session_id, None) is not None

    def idle_lru(self, exclude=()) -> list[Session]:
        """Idle sessions that may be evicted (no turn running or queued, not pinned), least recently
        used first."""
        idle = [s for s in self.sessions.values()
                if s.busy is None and not s.pinned and s.session_id not in exclude]
        return sorted(idle, key=lambda s: s.last_used)
