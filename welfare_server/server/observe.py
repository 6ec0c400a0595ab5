"""What the server tells its operators: Prometheus metrics (requests and errors by method and
code, requests in flight, the engine's queue, time to first token, time per output token,
tokens), a JSON log line per call, and the interceptors that feed both and check the bearer token.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Methods exempt from authentication (a load balancer probes health without a token)."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """One server's metrics, in a registry of its own (several servers may share a process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("welfare_requests", "Calls by method and status code", ["method", "code"], registry=r)
        self.in_flight = Gauge("welfare_requests_in_flight", "Calls being served", ["method"], registry=r)
        self.queue = Gauge("welfare_engine_queue", "Requests waiting for an engine slot", registry=r)
        self.running = Gauge("welfare_engine_running", "Requests holding an engine slot", registry=r)
        self.ttft = Histogram("welfare_time_to_first_token_seconds", "Call start to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("welfare_time_per_output_token_seconds", "Mean gap between a stream's tokens",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.tokens = Counter("welfare_tokens", "Tokens by kind (prompt, completion)", ["kind"], registry=r)
        self.duration = Histogram("welfare_request_seconds", "Call duration by method", ["method"],
                                  buckets=LATENCY_BUCKETS, registry=r)

    def value(self, name: str, **labels) -> float:
        """A sample's current value (tests and the demo read them in-process)."""
        return self.registry.get_sample_value(name, labels) or 0.0


def json_logger(enabled: bool) -> logging.Logger:
    logger = logging.getLogger("welfare_server.calls")
    if enabled and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log_call(logger: logging.Logger, **fields) -> None:
    if logger.handlers:
        logger.info(json.dumps(dict(ts=round(time.time(), 3), **fields), default=str))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks must carry "authorization: Bearer <token>" (constant-time
    comparison)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        return _denying(handler)


def _denying(handler):
    """A handler of the same shape as `handler` that refuses the call."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def refuse_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover - an async generator, as the stream handler it replaces

    if handler is None:
        return None
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
