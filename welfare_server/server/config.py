"""ServerConfig: every limit and switch of the gRPC server (the engine's own limits are its
EngineConfig). The command line's `serve` options are built from these fields."""

from __future__ import annotations

import os
from dataclasses import dataclass

from welfare_server.model.fields import check_bool, check_int, check_number, check_str

MAX_PORT = 65535


@dataclass
class ServerConfig:
    """How the server listens, what it admits, and how it shuts down."""

    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; "0.0.0.0" or "[::]" for every interface)."""
    port: int = 50051
    """Port to listen on; 0 picks a free one (Server.port says which)."""
    max_concurrent_requests: int = 256
    """Generation, rollout and extraction calls in flight at once, and maze Sessions open (a Session
    holds its mazes for as long as it lasts); beyond it a call gets RESOURCE_EXHAUSTED at once
    instead of queueing without bound."""
    max_message_bytes: int = 64 << 20
    """Largest message received or sent (tensors travel inside messages)."""
    max_tensor_elements: int = 1 << 24
    """Elements of one tensor in a request (a steering vector is hidden_size; [L, D] a layer set)."""
    default_max_new_tokens: int = 256
    """max_new_tokens of a request that does not say."""
    keepalive_time_s: int = 30
    """Seconds between keepalive pings on an idle connection (long streams stay up behind proxies)."""
    keepalive_timeout_s: int = 10
    """Seconds to wait for a keepalive ping's answer before the connection is dropped."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: health turns NOT_SERVING, new calls are refused, and in-flight calls get this long
    to finish before they are cancelled."""
    auth_token: str | None = None
    """Bearer token every call must carry ("authorization: Bearer <token>"), compared in constant
    time; None = no authentication. The health service is exempt. Default: $WELFARE_SERVER_TOKEN."""
    tls_cert: str | None = None
    """PEM certificate chain file: serve TLS instead of plaintext (with tls_key)."""
    tls_key: str | None = None
    """PEM private key file of tls_cert."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics HTTP endpoint (on host); None = no endpoint (the metrics are
    still kept and readable in-process)."""
    registry_root: str | None = None
    """Directory of the vector registry; None = the cache's vectors/ directory."""
    extract_on_start: bool = True
    """When the registry holds no maze-class vectors of the served model, extract them in the
    background at start (generation is served meanwhile) and store them."""
    extract_per_class: int = 32
    """Trajectories per class of that background extraction (small: it runs on the serving device;
    `welfare-server vectors extract` makes larger sets)."""
    max_rollout_envs: int = 1024
    """Envs (mazes x group) one Rollout or maze Session may ask for."""
    max_maze_state_bytes: int = 1 << 28
    """Grid state one Rollout or Session may hold (256 MiB: 1024 envs at size 100 take 10 MB; the
    largest grids, size 1000, then allow 268 envs)."""
    max_extract_per_class: int = 10_000
    """Largest per_class an Extract may ask for: every trajectory's token ids are held in memory until
    the capture pass (twice the paper's 5000)."""
    max_extract_permutations: int = 256
    """Most label permutations an Extract may ask for: the capture keeps (1 + K) x classes x hidden
    sums per layer on the serving device (256 is 0.3 GB for a 36-layer, 2560-wide model)."""
    log_json: bool = True
    """One JSON line per call (method, request id, status, duration, tokens) on stderr."""

    def __post_init__(self) -> None:
        check_str(self.host, "ServerConfig.host", ValueError)
        check_int(self.port, "ServerConfig.port", ValueError, 0, MAX_PORT)
        for name in ("max_concurrent_requests", "max_message_bytes", "max_tensor_elements", "default_max_new_tokens",
                     "keepalive_time_s", "keepalive_timeout_s", "extract_per_class", "max_rollout_envs",
                     "max_maze_state_bytes", "max_extract_per_class"):
            check_int(getattr(self, name), f"ServerConfig.{name}", ValueError, 1)
        check_int(self.max_extract_permutations, "ServerConfig.max_extract_permutations", ValueError, 0)
        check_number(self.shutdown_grace_s, "ServerConfig.shutdown_grace_s", ValueError, 0.0)
        if self.metrics_port is not None:
            check_int(self.metrics_port, "ServerConfig.metrics_port", ValueError, 0, MAX_PORT)
        for name in ("extract_on_start", "log_json"):
            check_bool(getattr(self, name), f"ServerConfig.{name}", ValueError)
        if self.auth_token is None:
            self.auth_token = os.environ.get("WELFARE_SERVER_TOKEN") or None
        if self.auth_token is not None:
            check_str(self.auth_token, "ServerConfig.auth_token", ValueError)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ServerConfig.tls_cert / tls_key: give both (or neither)")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"ServerConfig.{name}: {path!r} is not a file")
