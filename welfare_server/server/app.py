"""The gRPC server: one model, one engine (continuous batching in its own thread), one vector
registry, served over grpc.aio with health, reflection, optional bearer-token auth and TLS,
Prometheus metrics, JSON call logs, admission control, and a graceful drain on SIGTERM.

    server = WelfareServer(loaded, EngineConfig(...), ServerConfig(port=0))
    await server.start()          # binds, starts the engine thread, health SERVING
    ... server.port ...
    await server.stop()           # NOT_SERVING, in-flight calls get shutdown_grace_s, engine stops
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import welfare_server
from welfare_server.model.engine import Engine, EngineConfig
from welfare_server.model.loading import LoadedModel
from welfare_server.server.config import ServerConfig
from welfare_server.server.generation import Admission, GenerationService, InfoService
from welfare_server.server.observe import AuthInterceptor, Metrics, json_logger
from welfare_server.server.proto import (generation_pb2, generation_pb2_grpc, info_pb2, info_pb2_grpc, maze_pb2,
                                         maze_pb2_grpc, vectors_pb2, vectors_pb2_grpc)
from welfare_server.vectors import VectorRegistry, model_identity

log = logging.getLogger("welfare_server.server")

SERVICES = {  # full name -> (module of messages, servicer adder)
    "welfare.v1.Generation": (generation_pb2, generation_pb2_grpc.add_GenerationServicer_to_server),
    "welfare.v1.Info": (info_pb2, info_pb2_grpc.add_InfoServicer_to_server),
    "welfare.v1.Vectors": (vectors_pb2, vectors_pb2_grpc.add_VectorsServicer_to_server),
    "welfare.v1.Maze": (maze_pb2, maze_pb2_grpc.add_MazeServicer_to_server),
}


@dataclass
class ServerState:
    """What the services share."""

    loaded: LoadedModel
    engine: Engine
    config: ServerConfig
    registry: VectorRegistry | None
    identity: object
    metrics: Metrics
    admission: Admission
    logger: logging.Logger
    action_token_ids: list[int]
    version: str = welfare_server.__version__
    background: dict | None = None
    """What the server does in the background (the start-up extraction): its state for the log and the demo."""


class WelfareServer:
    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig | None = None,
                 config: ServerConfig | None = None, registry: VectorRegistry | None = None):
        self.config = config = config or ServerConfig()
        engine = Engine(loaded, engine_config or EngineConfig())
        registry = registry if registry is not None else VectorRegistry(config.registry_root)
        tokenizer = engine.tokenizer
        actions = []
        if tokenizer is not None:
            actions = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "NESW"]
        self.state = ServerState(loaded=loaded, engine=engine, config=config, registry=registry,
                                 identity=model_identity(loaded), metrics=Metrics(), logger=json_logger(config.log_json),
                                 admission=Admission(config.max_concurrent_requests), action_token_ids=actions,
                                 background={"extraction": "not started"})
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._metrics_server = None

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def _services(self):
        from welfare_server.server.maze_service import MazeService
        from welfare_server.server.vectors_service import VectorsService

        s = self.state
        return {"welfare.v1.Generation": GenerationService(s), "welfare.v1.Info": InfoService(s),
                "welfare.v1.Vectors": VectorsService(s), "welfare.v1.Maze": MazeService(s)}

    async def start(self) -> int:
        """Bind, start the engine's thread and (when due) the background extraction; returns the port."""
        c = self.config
        options = [("grpc.max_send_message_length", c.max_message_bytes),
                   ("grpc.max_receive_message_length", c.max_message_bytes),
                   ("grpc.keepalive_time_ms", c.keepalive_time_s * 1000),
                   ("grpc.keepalive_timeout_ms", c.keepalive_timeout_s * 1000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                   ("grpc.so_reuseport", 0)]
        interceptors = [AuthInterceptor(c.auth_token)] if c.auth_token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        services = self._services()
        for name, servicer in services.items():
            SERVICES[name][1](servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [SERVICES[n][0].DESCRIPTOR.services_by_name[n.split(".")[-1]].full_name for n in services]
        reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                     reflection.SERVICE_NAME], server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            with open(c.tls_key, "rb") as key, open(c.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.engine.start()
        await server.start()
        self._server = server
        for name in list(services) + [""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server = start_http_server(c.metrics_port, addr=c.host, registry=self.state.metrics.registry)
        if c.extract_on_start:
            self._start_extraction()
        log.info("serving %s on %s:%d", self.state.identity.name, c.host, self.port)
        return self.port

    def _start_extraction(self) -> None:
        """Extract the served model's welfare vectors in the background when the registry has none."""
        from welfare_server.server.background import ensure_welfare_vectors

        thread = threading.Thread(target=ensure_welfare_vectors, args=(self.state,), name="welfare-extract",
                                  daemon=True)
        thread.start()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop accepting calls, give in-flight ones `grace` seconds (default
        shutdown_grace_s), then cancel them and stop the engine."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        self.engine.stop(timeout=30)
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        log.info("stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: WelfareServer, on_started=None) -> None:
    """Start, run on_started (a coroutine function of the server, e.g. the demo), and serve until
    SIGTERM or SIGINT, then drain."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started is not None:
        asyncio.ensure_future(on_started(server))
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", server.config.shutdown_grace_s)
    await server.stop()
