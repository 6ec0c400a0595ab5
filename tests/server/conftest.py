"""A real server on a loopback port, in a thread with its own event loop, for blocking clients in
tests: `running_server(**options)` starts one and stops it at the end of the test."""
import asyncio
import contextlib
import functools
import threading

import pytest

from welfare_server.model.engine import EngineConfig
from welfare_server.model.loading import load_model
from welfare_server.server.app import WelfareServer
from welfare_server.server.config import ServerConfig

DEFAULT_ENGINE = dict(max_batch_slots=8, max_context_len=512)


@functools.lru_cache(maxsize=None)
def tiny_model(name: str = "tiny-llama"):
    return load_model(name, dtype="float32", device="cpu")


class ServerThread:
    """A WelfareServer serving from a background thread's event loop."""

    def __init__(self, loaded, engine_config: EngineConfig, server_config: ServerConfig):
        self.server = WelfareServer(loaded, engine_config, server_config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.port = self.run(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coroutine, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 2.0) -> None:
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def running_server(tmp_path):
    started = []

    def start(model: str = "tiny-llama", engine=None, **server):
        server.setdefault("port", 0)
        server.setdefault("extract_on_start", False)
        server.setdefault("registry_root", str(tmp_path / "vectors"))
        server.setdefault("log_json", False)
        thread = ServerThread(tiny_model(model), EngineConfig(**(engine or DEFAULT_ENGINE)), ServerConfig(**server))
        started.append(thread)
        return thread

    yield start
    for thread in started:
        with contextlib.suppress(Exception):
            thread.stop()


def module_server(tmp_path_factory, **server):
    """A generator for a module-scoped `server` fixture: one ServerThread on the tiny model with
    its own registry, stopped after the module; server options override the test defaults."""
    options = dict(port=0, extract_on_start=False, log_json=False,
                   registry_root=str(tmp_path_factory.mktemp("vectors")))
    options.update(server)
    thread = ServerThread(tiny_model(), EngineConfig(**DEFAULT_ENGINE), ServerConfig(**options))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    """A blocking client of the module's `server` fixture."""
    from welfare_server.server.client import WelfareClient

    with WelfareClient(server.address, timeout=120) as c:
        yield c
