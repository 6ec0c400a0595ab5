"""Streaming a request's output: events, the bounded per-request buffer, and text deltas that never
split a character.

The loop thread appends one StreamEvent per generated token and one final event; a consumer on any
thread reads them with RequestHandle.stream() (blocking) or, from asyncio, RequestHandle.astream().
A buffer holds at most EngineConfig.max_stream_events undelivered token events: a consumer that
falls that far behind has its request cancelled with finish_reason "error" (the final event always
fits), so a slow consumer never stalls the loop or the other requests.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

import torch

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class StreamEvent:
    """One token of a streamed request, or (final=True) its end."""

    request_id: str
    token_id: int | None = None
    """The generated token (None in the final event)."""
    text: str = ""
    """Text this event adds: the deltas of a request concatenate to its final text exactly. A delta
    holds back bytes until they decode to whole characters (an office emoji is three tokens: the
    first two add no text) and, with stop strings, until no stop string can start in them."""
    logprob: float | None = None
    masked_logprob: float | None = None
    monitor: torch.Tensor | None = None
    """fp32 [len(layers), M]: the monitor projections of the pass that produced this token."""
    scores: list[float] | None = None
    """Log-probabilities of the request's score_token_ids at this position."""
    final: bool = False
    finish_reason: str | None = None
    """In the final event: "stop", "length", "cancelled" or "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """In a final event with finish_reason "error": what went wrong."""


class StreamOverflow(Exception):
    """Raised by EventBuffer.put when the consumer is more than the limit behind."""


class EventBuffer:
    """A bounded, thread-safe queue of StreamEvents from the loop thread to one consumer (a thread
    or an asyncio task)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._events: collections.deque[StreamEvent] = collections.deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._closed = False

    def put(self, event: StreamEvent) -> None:
        """Append (loop thread). Raises StreamOverflow when `limit` token events are undelivered."""
        with self._cond:
            if not event.final and len(self._events) >= self.limit:
                raise StreamOverflow
            self._events.append(event)
            if event.final:
                self._closed = True
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            loop, ready = waker
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                pass

    def get(self, timeout: float | None = None) -> StreamEvent:
        """The next event (blocking); raises TimeoutError after `timeout` seconds without one."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._events, timeout=timeout):
                raise TimeoutError(f"no stream event within {timeout} s")
            return self._events.popleft()

    async def aget(self) -> StreamEvent:
        """The next event, awaited on the running asyncio loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._events:
                    return self._events.popleft()
                if self._waker is None or self._waker[0] is not loop:
                    self._waker = (loop, asyncio.Event())
                ready = self._waker[1]
                ready.clear()
            await ready.wait()


class IncrementalText:
    """Text deltas of a growing token sequence, decoded in a sliding window (TGI's method: decode
    from a prefix offset, emit what extends the prefix's text) so each step costs O(1) tokens, not
    a decode of the whole output. Deltas never end inside a character (the decoder shows an
    incomplete UTF-8 sequence as U+FFFD), and with stop strings the last max(len) - 1 characters
    are held back until the stop decision is known."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        """Decoded text so far (whole characters only)."""
        self.emitted = 0
        """Characters of `text` already handed out as deltas."""
        self.hold = max((len(s) for s in stop_strings), default=1) - 1

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Append a token (the decoded text grows once its characters are whole)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def delta(self) -> str:
        """What can be released while the request runs: whole characters, minus the tail a stop
        string could still start in. Call after the stop check of the token just added."""
        return self._release(len(self.text) - self.hold)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (which may cut the decoded text at a stop string)."""
        if not final_text.startswith(self.text[:self.emitted]):
            # The decoder changed text it had already produced (not the case for byte-level BPE);
            # the final event's text is then the whole remainder as the full decode gives it.
            return final_text[self.emitted:]
        self.text = final_text
        return self._release(len(final_text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
