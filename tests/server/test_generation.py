"""The Generation and Info services on a real server on a loopback port: streams reassemble to the
unary result, 64 concurrent greedy streams each equal the same request run alone, cancellation and
deadlines free the slot, overload answers RESOURCE_EXHAUSTED and the server stays healthy, every
invalid field is INVALID_ARGUMENT naming it, auth and TLS, request ids, metrics, two replicas."""
import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.conftest import tiny_model
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams
from welfare_server.server import wire
from welfare_server.server.client import WelfareClient, generate_request
from welfare_server.server.errors import field_violations
from welfare_server.server.proto import common_pb2 as pb
from welfare_server.server.proto import generation_pb2 as gen

CHAT = [{"role": "user", "content": "How's it going?"}]


def _tokens(events):
    return [e.token_id for e in events if e.DESCRIPTOR.name == "TokenDelta"]


def test_stream_unary_info_abort_and_request_ids(running_server):
    server = running_server()
    with WelfareClient(server.address) as client:
        info = client.info()
        assert (info.num_layers, info.hidden_size, info.model) == (4, 64, "tiny-llama")
        assert info.limits["engine.max_batch_slots"] == 8 and len(info.action_token_ids) == 4
        events = list(client.generate(chat=CHAT, max_new_tokens=12, ignore_eos=True, logprobs=True))
        final = events[-1]
        assert final.DESCRIPTOR.name == "GenerateFinal" and final.completion_tokens == 12
        assert final.finish_reason == gen.FINISH_REASON_LENGTH
        unary = client.generate_unary(chat=CHAT, max_new_tokens=12, ignore_eos=True, logprobs=True)
        assert _tokens(events) == list(unary.token_ids)
        assert "".join(e.text for e in events) == unary.text
        assert [e.logprob for e in events[:-1]] == pytest.approx(list(unary.logprobs))
        # The request id: from the message, else the metadata, echoed in the initial metadata.
        call = client.generate_stream(generate_request(text="hi", max_new_tokens=2), metadata=(("x-request-id", "r-7"),))
        responses = list(call)
        assert dict(call.initial_metadata())["x-request-id"] == "r-7" and responses[0].request_id == "r-7"
        # Abort by id stops a running stream.
        call = client.generate_stream(generate_request(text="go on", max_new_tokens=400, ignore_eos=True,
                                                       request_id="long-one"))
        first = next(call)
        assert client.abort("long-one") and not client.abort("nobody")
        rest = list(call)
        assert first.token.token_id >= 0 and rest[-1].final.finish_reason == gen.FINISH_REASON_CANCELLED


def test_sixty_four_concurrent_streams_equal_their_requests_alone(running_server):
    server = running_server(engine=dict(max_batch_slots=16, max_context_len=256))
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
    alone = Engine(tiny_model(), EngineConfig(max_batch_slots=1, max_context_len=256))
    expected = [alone.generate([Request(messages=p, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])[0]
                .token_ids for p in prompts]
    results, errors = [None] * 64, []

    def stream(i):
        try:
            with WelfareClient(server.address) as client:
                results[i] = _tokens(client.generate(chat=prompts[i % 8], max_new_tokens=10, ignore_eos=True))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert all(results[i] == expected[i % 8] for i in range(64))
    assert server.server.state.metrics.value("welfare_requests_total", method="Generate", code="OK") == 64


def test_cancel_and_deadline_free_the_slot_and_overload_is_refused(running_server):
    server = running_server(engine=dict(max_batch_slots=2, max_context_len=1024), max_concurrent_requests=2)
    engine = server.server.engine
    with WelfareClient(server.address) as client:
        call = client.generate_stream(generate_request(text="x", max_new_tokens=900, ignore_eos=True))
        next(call)
        blocker = client.generate_stream(generate_request(text="y", max_new_tokens=900, ignore_eos=True))
        next(blocker)
        with pytest.raises(grpc.RpcError) as refused:  # a third call while two run
            client.generate_unary(text="z", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_requests=2" in refused.value.details()
        call.cancel()
        blocker.cancel()
        deadline = time.time() + 10
        while engine.num_running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.num_running == 0  # both slots freed at the next steps
        with pytest.raises(grpc.RpcError) as late:
            list(client.generate_stream(generate_request(text="slow", max_new_tokens=900, ignore_eos=True),
                                        timeout=0.5))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.time() + 10
        while engine.num_running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.num_running == 0
        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert client.generate_unary(text="still here", max_new_tokens=2).completion_tokens >= 1


def _bytes_tensor(values, dtype=pb.DTYPE_FLOAT32, shape=None):
    message = wire.from_torch(torch.as_tensor(values, dtype=torch.float32))
    message.dtype = dtype
    if shape is not None:
        del message.shape[:]
        message.shape.extend(shape)
    return message


def _term(**kw):
    term = pb.SteeringTerm(layers=kw.pop("layers", [1]), mode=kw.pop("mode", pb.STEER_MODE_ADD))
    if "vector_id" in kw:
        term.vector_id = kw.pop("vector_id")
    else:
        term.inline.CopyFrom(kw.pop("inline", wire.from_torch(torch.ones(64))))
    for k, v in kw.items():
        setattr(term, k, v)
    return term


def _req(**kw):
    request = gen.GenerateRequest(text="hello", sampling=gen.SamplingParams(max_new_tokens=2))
    for name, value in kw.items():
        if name == "terms":
            request.steering.terms.extend(value)
        elif isinstance(value, (list, tuple)):
            getattr(request, name).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


NAN = float("nan")
INVALID = [
    (lambda: gen.GenerateRequest(sampling=gen.SamplingParams(max_new_tokens=2)), "input"),
    (lambda: _req(text=""), "text"),
    (lambda: gen.GenerateRequest(tokens=gen.TokenIds(ids=[]), sampling=gen.SamplingParams(max_new_tokens=2)),
     "tokens.ids"),
    (lambda: gen.GenerateRequest(tokens=gen.TokenIds(ids=[5, 49152])), "tokens.ids[1]"),
    (lambda: gen.GenerateRequest(chat=gen.ChatInput()), "chat.messages"),
    (lambda: gen.GenerateRequest(chat=gen.ChatInput(messages=[pb.ChatMessage(role="robot", content="x")])),
     "chat.messages[0].role"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=100000)), "sampling.max_new_tokens"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=2, temperature=NAN)), "sampling.temperature"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=2, top_p=0)), "sampling.top_p"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=2, top_k=-1)), "sampling.top_k"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=2, stop=[""])), "sampling.stop[0]"),
    (lambda: _req(sampling=gen.SamplingParams(max_new_tokens=2, allowed_token_ids=[-1])),
     "sampling.allowed_token_ids[0]"),
    (lambda: _req(terms=[_term(vector_id="0123456789abcdef")]), "steering.terms[0].vector_id"),
    (lambda: _req(terms=[_term(inline=wire.from_torch(torch.ones(63)))]), "steering.terms[0].vector"),
    (lambda: _req(terms=[_term(inline=_bytes_tensor([NAN] * 64))]), "steering.terms[0].vector"),
    (lambda: _req(terms=[_term(inline=_bytes_tensor([1.0] * 64, shape=[65]))]), "steering.terms[0].inline.data"),
    (lambda: _req(terms=[_term(inline=_bytes_tensor([1.0] * 64, dtype=0))]), "steering.terms[0].inline.dtype"),
    (lambda: _req(terms=[_term(inline=_bytes_tensor([1.0] * 64, dtype=9))]), "steering.terms[0].inline.dtype"),
    (lambda: _req(terms=[_term(inline=_bytes_tensor([1.0], shape=[1 << 30]))]), "steering.terms[0].inline.shape"),
    (lambda: _req(terms=[_term(layers=[4])]), "steering.terms[0].layers"),
    (lambda: _req(terms=[_term(layers=[])]), "steering.terms[0].layers"),
    (lambda: _req(terms=[_term(mode=17)]), "steering.terms[0].mode"),
    (lambda: _req(terms=[_term(point=5)]), "steering.terms[0].point"),
    (lambda: _req(terms=[_term(coefficient=float("inf"))]), "steering.terms[0].coefficient"),
    (lambda: _req(steering=pb.Steering(terms=[_term()], scope=9)), "steering.scope"),
    (lambda: _req(monitor=pb.Monitor(vectors=wire.from_torch(torch.ones(2, 64)), layers=[7])), "monitor.layers[0]"),
    (lambda: _req(monitor=pb.Monitor(vectors=wire.from_torch(torch.ones(2, 63)), layers=[1])), "monitor.vectors"),
    (lambda: _req(output=3), "output"),
    (lambda: _req(request_id="x" * 300), "request_id"),
]


def test_every_invalid_field_is_invalid_argument_naming_it(running_server):
    server = running_server()
    with WelfareClient(server.address) as client:
        for build, field in INVALID:
            request = build()
            if request.steering.terms and not request.steering.scope:
                request.steering.scope = pb.SCOPE_ALL
            with pytest.raises(grpc.RpcError) as caught:
                client.generation.GenerateUnary(request)
            error = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
            violations = field_violations(error)
            assert violations and violations[0][0] == field, (field, violations)
            assert error.details().startswith(field)
        assert client.generate_unary(text="fine", max_new_tokens=2).completion_tokens >= 1
        assert server.server.engine.num_running == 0 and server.server.engine.num_waiting == 0


def test_bearer_token_is_required_except_for_health(running_server):
    server = running_server(auth_token="s3cret")
    with WelfareClient(server.address) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(anonymous.generate(text="hi", max_new_tokens=2))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(anonymous.channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with WelfareClient(server.address, token="wrong") as wrong:
        with pytest.raises(grpc.RpcError) as caught:
            wrong.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with WelfareClient(server.address, token="s3cret") as client:
        assert client.info().num_layers == 4


def test_tls(running_server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no way to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = running_server(tls_cert=str(cert), tls_key=str(key))
    with WelfareClient(f"localhost:{server.port}", root_cert=str(cert)) as client:
        assert client.generate_unary(text="over tls", max_new_tokens=2).completion_tokens >= 1
    with WelfareClient(f"localhost:{server.port}") as plaintext:
        with pytest.raises(grpc.RpcError) as caught:
            plaintext.info()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint_and_two_replicas(running_server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    first = running_server(metrics_port=metrics_port)
    second = running_server()
    with WelfareClient([first.address, second.address]) as client:
        for _ in range(12):
            client.generate_unary(text="balanced", max_new_tokens=2)
    served = [s.server.state.metrics.value("welfare_requests_total", method="GenerateUnary", code="OK")
              for s in (first, second)]
    assert sum(served) == 12 and min(served) >= 3  # round_robin spread the calls over both replicas
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "welfare_requests_total" in text and "welfare_time_to_first_token_seconds_bucket" in text
