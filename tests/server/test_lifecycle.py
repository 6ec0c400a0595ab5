"""The server as a process: `welfare-server serve` starts on the tiny model, SIGTERM turns health
NOT_SERVING, lets an in-flight stream finish within the grace period, refuses new calls and exits
0. And a property-based fuzz: thousands of random and adversarial messages, each answered with OK
or a proper error code, the server healthy throughout."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from welfare_server.server.client import WelfareClient, generate_request
from welfare_server.server.proto import common_pb2 as pb
from welfare_server.server.proto import generation_pb2 as gen

START_TIMEOUT_S = 120


def _start_process(tmp_path, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "welfare_server.cli", "serve", "--model", "tiny-llama", "--port", "0",
         "--no-extract-on-start", "--registry-root", str(tmp_path / "vectors"), "--no-log-json",
         "--engine-max-batch-slots", "4", "--engine-max-context-len", "1024", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + START_TIMEOUT_S
    lines = []
    while time.time() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [lines.append(l) for l in process.stderr], daemon=True).start()
            return process, int(match.group(1)), lines
        if process.poll() is not None:
            break
    process.kill()
    pytest.fail("the server did not start:\n" + "".join(lines))


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path):
    process, port, lines = _start_process(tmp_path, "--shutdown-grace-s", "20")
    try:
        with WelfareClient(f"127.0.0.1:{port}") as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            call = client.generate_stream(generate_request(text="a long answer", max_new_tokens=120, ignore_eos=True))
            first = next(call)
            process.send_signal(signal.SIGTERM)
            rest = list(call)  # the stream in flight finishes within the grace period
            assert first.HasField("token") and rest[-1].final.finish_reason == gen.FINISH_REASON_LENGTH
            assert rest[-1].final.completion_tokens == 120
        assert process.wait(timeout=60) == 0
        with WelfareClient(f"127.0.0.1:{port}") as late:
            with pytest.raises(grpc.RpcError) as caught:
                late.info()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:
            process.kill()
    assert any("draining" in line for line in lines)


# ---------------------------------------------------------------- fuzz
def _tensor():
    return st.builds(pb.Tensor, dtype=st.integers(-1, 5), shape=st.lists(st.integers(-2, 80), max_size=3),
                     data=st.binary(max_size=300))


def _term():
    return st.builds(pb.SteeringTerm, layers=st.lists(st.integers(-6, 6), max_size=3),
                     coefficient=st.floats(allow_nan=True, allow_infinity=True, width=32),
                     mode=st.integers(-1, 6), point=st.integers(-1, 3), inline=_tensor())


def _message():
    def number(lo, hi):
        return st.one_of(st.floats(lo, hi, width=32), st.sampled_from([float("nan"), float("inf"), -float("inf")]))

    sampling = st.builds(gen.SamplingParams, temperature=number(-1, 3),
                         top_p=number(-0.5, 1.5), top_k=st.integers(-3, 60000),
                         seed=st.integers(-2**63, 2**63 - 1), max_new_tokens=st.integers(-2, 5),
                         stop=st.lists(st.text(max_size=5), max_size=3),
                         stop_token_ids=st.lists(st.integers(-5, 60000), max_size=3),
                         ignore_eos=st.booleans(), logprobs=st.booleans(),
                         allowed_token_ids=st.lists(st.integers(-5, 60000), max_size=4),
                         score_token_ids=st.lists(st.integers(-5, 60000), max_size=4))
    chat = st.builds(gen.ChatInput, messages=st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(
        ["user", "assistant", "system", "", "robot"]), content=st.text(max_size=40)), max_size=3))
    base = dict(sampling=sampling, request_id=st.text(max_size=8), output=st.integers(-1, 4),
                steering=st.builds(pb.Steering, terms=st.lists(_term(), max_size=2), scope=st.integers(-1, 5)),
                monitor=st.builds(pb.Monitor, vectors=_tensor(), layers=st.lists(st.integers(-6, 6), max_size=2),
                                  point=st.integers(-1, 3)))
    return st.one_of(
        st.builds(gen.GenerateRequest, chat=chat, **base),
        st.builds(gen.GenerateRequest, text=st.text(max_size=60), **base),
        st.builds(gen.GenerateRequest, tokens=st.builds(gen.TokenIds, ids=st.lists(st.integers(-5, 60000), max_size=12)),
                  **base),
        st.builds(gen.GenerateRequest, **base))


def _plausible():
    """Messages that are mostly valid, so the fuzz also exercises serving, not only refusals."""
    import numpy as np

    vector = st.integers(0, 2**31).map(lambda seed: pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[64],
        data=np.random.default_rng(seed).standard_normal(64).astype("<f4").tobytes()))
    term = st.builds(pb.SteeringTerm, layers=st.lists(st.integers(-4, 3), min_size=1, max_size=2),
                     coefficient=st.floats(-8, 8, width=32), mode=st.integers(0, 4), point=st.integers(0, 2),
                     inline=vector)
    sampling = st.builds(gen.SamplingParams, temperature=st.floats(0, 2, width=32), top_p=st.floats(0.0625, 1, width=32),
                         top_k=st.integers(0, 50), seed=st.integers(0, 2**40), max_new_tokens=st.integers(1, 6),
                         ignore_eos=st.booleans(), logprobs=st.booleans(),
                         allowed_token_ids=st.lists(st.integers(0, 49151), max_size=3))
    return st.builds(gen.GenerateRequest, tokens=st.builds(gen.TokenIds, ids=st.lists(st.integers(0, 49151), min_size=1,
                                                                                      max_size=20)),
                     sampling=sampling, steering=st.builds(pb.Steering, terms=st.lists(term, max_size=2),
                                                           scope=st.integers(0, 3)))


ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from tests.server.conftest import ServerThread, tiny_model
    from welfare_server.model.engine import EngineConfig
    from welfare_server.server.config import ServerConfig

    thread = ServerThread(tiny_model(), EngineConfig(max_batch_slots=4, max_context_len=256),
                          ServerConfig(port=0, extract_on_start=False, log_json=False,
                                       registry_root=str(tmp_path_factory.mktemp("vectors"))))
    client = WelfareClient(thread.address, timeout=30)
    yield thread, client
    client.close()
    thread.stop()


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=st.one_of(_message(), _plausible()))
def test_fuzz_every_message_gets_ok_or_a_proper_error(fuzz_server, message):
    thread, client = fuzz_server
    try:
        result = client.generation.GenerateUnary(message, timeout=30)
        code = grpc.StatusCode.OK
        assert result.finish_reason in (gen.FINISH_REASON_STOP, gen.FINISH_REASON_LENGTH)
    except grpc.RpcError as error:
        code = error.code()
        assert code in ANSWERS, (code, error.details(), message)
        assert error.details()
    event(code.name)
    assert code in ANSWERS


def test_after_the_fuzz_the_server_is_healthy_and_leaks_nothing(fuzz_server):
    thread, client = fuzz_server
    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    engine = thread.server.engine
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.bank.num_free == engine.cfg.max_bank_vectors
    assert client.generate_unary(text="alive", max_new_tokens=2).completion_tokens >= 1


def test_serve_demo_extracts_the_vectors_prints_the_table_and_keeps_serving(tmp_path):
    process, port, lines = _start_process(tmp_path, "--demo", "--extract-on-start", "--extract-per-class", "4")
    try:
        deadline, out = time.time() + 300, []
        while time.time() < deadline:
            line = process.stdout.readline()
            out.append(line)
            if "keeps serving" in line or "no welfare vectors" in line or process.poll() is not None:
                break
        table = "".join(out)
        assert "How's it going?" in table and "unsteered" in table, table
        assert table.count("gold ") == 4 and table.count("mold ") == 4  # four coefficients each
        ratings = [float(row.split()[2]) for row in out if row.startswith(("unsteered", "gold ", "mold "))]
        assert len(ratings) == 9 and all(1.0 <= r <= 9.0 for r in ratings)
        with WelfareClient(f"127.0.0.1:{port}") as client:  # still serving
            assert client.generate_unary(text="after the demo", max_new_tokens=2).completion_tokens >= 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
