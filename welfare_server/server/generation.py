"""The Generation service and the Info service: steered generation over the engine's continuous
batching. Each call is one engine request (submitted from the asyncio loop; the engine runs in its
own thread), its events streamed back as they come. A client that cancels, disconnects or runs
past its deadline has its request cancelled at the engine's next step, freeing the slot."""

from __future__ import annotations

import asyncio
import itertools
import time

from welfare_server.server import wire
from welfare_server.server.errors import exhausted, to_status, translate
from welfare_server.server.observe import log_call
from welfare_server.server.proto import generation_pb2 as gen
from welfare_server.server.proto import generation_pb2_grpc as gen_grpc
from welfare_server.server.proto import info_pb2, info_pb2_grpc

FINISH = {"stop": gen.FINISH_REASON_STOP, "length": gen.FINISH_REASON_LENGTH,
          "cancelled": gen.FINISH_REASON_CANCELLED, "error": gen.FINISH_REASON_ERROR}
REQUEST_ID_KEY = "x-request-id"


def field_map(message: gen.GenerateRequest) -> dict[str, str]:
    """The engine's field names in this message's terms."""
    prompt = "tokens.ids" if message.WhichOneof("input") == "tokens" else "text"
    return {"request.messages": "chat.messages", "request.prompt": prompt, "request.request_id": "request_id",
            "sampling.stop_strings": "sampling.stop", "request": "input"}


class Admission:
    """At most `limit` calls at once; the next one is refused at once (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def enter(self, what: str) -> None:
        if self.active >= self.limit:
            raise exhausted(f"{what}: max_concurrent_requests={self.limit} calls are already being served")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, state):
        self.state = state
        self.live: dict[str, object] = {}  # request id -> engine handle, for Abort
        self._ids = itertools.count()

    def _request_id(self, request, context) -> str:
        if request.request_id:
            return request.request_id
        metadata = dict(context.invocation_metadata() or ())
        return metadata.get(REQUEST_ID_KEY) or f"srv-{next(self._ids)}"

    def _submit(self, request, rid):
        s = self.state
        engine_request = wire.generate_request(request, rid, tokenizer=s.engine.tokenizer, num_layers=s.engine.L,
                                               registry=s.registry, identity=s.identity, config=s.config)
        return s.engine.submit(engine_request)

    async def Generate(self, request, context):
        async for response in self._serve(request, context, "Generate", stream=True):
            yield response

    async def GenerateUnary(self, request, context):
        result = None
        async for result in self._serve(request, context, "GenerateUnary", stream=False):
            pass
        return result

    async def _serve(self, request, context, method: str, stream: bool):
        s = self.state
        started = time.perf_counter()
        rid, code, handle, first, tokens = self._request_id(request, context), "OK", None, None, 0
        entered = False
        try:
            s.admission.enter(method)
            entered = True
            s.metrics.in_flight.labels(method).inc()
            handle = self._submit(request, rid)
            self.live[rid] = handle
            await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            events = handle.astream()
            async for event in events:
                if event.final:
                    break
                tokens += 1
                if first is None:
                    first = time.perf_counter()
                    s.metrics.ttft.observe(first - started)
                if stream:
                    yield gen.GenerateResponse(request_id=rid, token=self._delta(event, request.output))
            out = handle.output
            if tokens > 1:
                s.metrics.tpot.observe((time.perf_counter() - first) / (tokens - 1))
            s.metrics.tokens.labels("prompt").inc(len(out.prompt_ids))
            s.metrics.tokens.labels("completion").inc(len(out.token_ids))
            if stream:
                yield gen.GenerateResponse(request_id=rid, final=gen.GenerateFinal(
                    finish_reason=FINISH[out.finish_reason], prompt_tokens=len(out.prompt_ids),
                    completion_tokens=len(out.token_ids), error=out.error or "",
                    text="" if request.output == gen.OUTPUT_MODE_TOKENS_ONLY else event.text))
            else:
                yield self._result(rid, out, request.output)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as error:  # noqa: BLE001 - every refusal goes back as a status
            refusal = translate(error, field_map=field_map(request))
            code = refusal.code.name
            await context.abort_with_status(to_status(refusal))
        finally:
            if handle is not None:
                if not handle.done:
                    handle.cancel()  # cancelled, disconnected or past its deadline: free the slot
                self.live.pop(rid, None)
            if entered:
                s.admission.leave()
                s.metrics.in_flight.labels(method).dec()
            s.metrics.requests.labels(method, code).inc()
            s.metrics.duration.labels(method).observe(time.perf_counter() - started)
            log_call(s.logger, method=method, request_id=rid, code=code, tokens=tokens,
                     ms=round(1000 * (time.perf_counter() - started), 1))

    @staticmethod
    def _delta(event, output_mode) -> gen.TokenDelta:
        delta = gen.TokenDelta(token_id=event.token_id,
                               text="" if output_mode == gen.OUTPUT_MODE_TOKENS_ONLY else event.text)
        if event.logprob is not None:
            delta.logprob = event.logprob
        if event.masked_logprob is not None:
            delta.masked_logprob = event.masked_logprob
        if event.monitor is not None:
            delta.monitor.CopyFrom(wire.from_torch(event.monitor))
        if event.scores is not None:
            delta.scores.extend(event.scores)
        return delta

    @staticmethod
    def _result(rid, out, output_mode) -> gen.GenerateResult:
        result = gen.GenerateResult(
            request_id=rid, token_ids=out.token_ids,
            text="" if output_mode == gen.OUTPUT_MODE_TOKENS_ONLY else out.text,
            logprobs=out.logprobs or [], masked_logprobs=out.masked_logprobs or [],
            finish_reason=FINISH[out.finish_reason], prompt_tokens=len(out.prompt_ids),
            completion_tokens=len(out.token_ids), error=out.error or "")
        if out.monitor is not None:
            result.monitor.CopyFrom(wire.from_torch(out.monitor))
        return result

    async def Abort(self, request, context):
        handle = self.live.get(request.request_id)
        if handle is not None and not handle.done:
            handle.cancel()
            return gen.AbortResponse(found=True)
        return gen.AbortResponse(found=False)


class InfoService(info_pb2_grpc.InfoServicer):
    def __init__(self, state):
        self.state = state

    async def GetInfo(self, request, context):
        s = self.state
        engine, identity = s.engine, s.identity
        limits = {f"engine.{k}": int(v) for k, v in vars(engine.cfg).items()
                  if isinstance(v, int) and not isinstance(v, bool)}
        limits.update({f"server.{k}": int(v) for k, v in vars(s.config).items()
                       if isinstance(v, int) and not isinstance(v, bool)})
        return info_pb2.ServerInfo(
            model=identity.name, family=identity.family, num_layers=engine.L, hidden_size=engine.D,
            vocab_size=engine.vocab, dtype=str(engine.dtype).replace("torch.", ""), device=str(engine.device),
            version=s.version, model_fingerprint=identity.weights_sha256, limits=limits,
            action_token_ids=s.action_token_ids)

