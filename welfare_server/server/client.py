"""Python clients of a welfare_server: WelfareClient (blocking) and AsyncWelfareClient (asyncio),
over one channel to one address or, for replicas, gRPC's own client-side load balancing
(round_robin) over several addresses.

    with WelfareClient("127.0.0.1:50051") as client:
        for delta in client.generate(chat=[{"role": "user", "content": "How's it going?"}],
                                     max_new_tokens=32):
            print(delta.text, end="")
        result = client.generate_unary(text="Hello", steering=[client.term("abc123", layers=[20], coefficient=4)])

Errors surface as grpc.RpcError (code(), details(); field violations via
welfare_server.server.errors.field_violations).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import grpc
import torch

from welfare_server.server import wire
from welfare_server.server.proto import common_pb2 as pb
from welfare_server.server.proto import generation_pb2 as gen
from welfare_server.server.proto import generation_pb2_grpc as gen_grpc
from welfare_server.server.proto import info_pb2, info_pb2_grpc, maze_pb2_grpc, vectors_pb2_grpc

MODES = {"add": pb.STEER_MODE_ADD, "add_renorm": pb.STEER_MODE_ADD_RENORM, "ablate": pb.STEER_MODE_ABLATE,
         "clamp": pb.STEER_MODE_CLAMP}
SCOPES = {"generated": pb.SCOPE_GENERATED, "assistant_and_generated": pb.SCOPE_ASSISTANT_AND_GENERATED,
          "all": pb.SCOPE_ALL}


def channel_target(addresses: str | Sequence[str]) -> tuple[str, list]:
    """(target, options): one address as is; several through the ipv4:/ipv6: resolver with
    round_robin, so gRPC balances calls over the replicas itself."""
    if isinstance(addresses, str):
        return addresses, []
    addresses = list(addresses)
    if len(addresses) == 1:
        return addresses[0], []
    return "ipv4:" + ",".join(addresses), [("grpc.lb_policy_name", "round_robin")]


def _options(max_message_bytes: int) -> list:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


def term(vector, layers: Sequence[int], coefficient: float | None = None, mode: str = "add",
         point: str = "block_input") -> pb.SteeringTerm:
    """A steering term: vector is a registry id (str) or a tensor ([D] or [len(layers), D])."""
    message = pb.SteeringTerm(layers=list(layers), mode=MODES[mode], point=wire.POINT_ENUMS[point])
    if coefficient is not None:
        message.coefficient = float(coefficient)
    if isinstance(vector, str):
        message.vector_id = vector
    else:
        message.inline.CopyFrom(wire.from_torch(torch.as_tensor(vector)))
    return message


def generate_request(*, chat=None, text=None, tokens=None, steering: Iterable[pb.SteeringTerm] = (),
                     scope: str = "assistant_and_generated", monitor=None, monitor_layers=(),
                     request_id: str = "", tokens_only: bool = False, **sampling) -> gen.GenerateRequest:
    """A GenerateRequest: exactly one of chat (messages), text or tokens; sampling keywords are
    SamplingParams fields (temperature, top_p, top_k, seed, max_new_tokens, stop, stop_token_ids,
    ignore_eos, logprobs, allowed_token_ids, score_token_ids)."""
    request = gen.GenerateRequest(request_id=request_id, sampling=gen.SamplingParams(**sampling),
                                  output=gen.OUTPUT_MODE_TOKENS_ONLY if tokens_only else gen.OUTPUT_MODE_UNSPECIFIED)
    if chat is not None:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
    if text is not None:
        request.text = text
    if tokens is not None:
        request.tokens.ids.extend(tokens)
    steering = list(steering)
    if steering:
        request.steering.terms.extend(steering)
        request.steering.scope = SCOPES[scope]
    if monitor is not None:
        request.monitor.vectors.CopyFrom(wire.from_torch(torch.as_tensor(monitor)))
        request.monitor.layers.extend(monitor_layers)
    return request


class _Base:
    def __init__(self, token: str | None, timeout: float | None):
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    @staticmethod
    def _credentials(root_cert: str | bytes | None):
        if root_cert is None:
            return None
        data = root_cert if isinstance(root_cert, bytes) else open(root_cert, "rb").read()
        return grpc.ssl_channel_credentials(root_certificates=data)

    def _stubs(self, channel):
        self.generation = gen_grpc.GenerationStub(channel)
        self.info_stub = info_pb2_grpc.InfoStub(channel)
        self.vectors = vectors_pb2_grpc.VectorsStub(channel)
        self.maze = maze_pb2_grpc.MazeStub(channel)

    term = staticmethod(term)


class WelfareClient(_Base):
    """Blocking client (see the module docstring). addresses: "host:port" or a list of replicas."""

    def __init__(self, addresses: str | Sequence[str], *, token: str | None = None, root_cert=None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20):
        super().__init__(token, timeout)
        target, options = channel_target(addresses)
        credentials = self._credentials(root_cert)
        options = options + _options(max_message_bytes)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self._stubs(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, **kwargs):
        """Yield TokenDelta messages, then the GenerateFinal (see generate_request for kwargs)."""
        for response in self.generation.Generate(generate_request(**kwargs), metadata=self.metadata,
                                                 timeout=self.timeout):
            yield response.token if response.HasField("token") else response.final

    def generate_stream(self, request: gen.GenerateRequest, **call):
        """The raw response stream of a prepared request (cancel() on it stops the generation)."""
        return self.generation.Generate(request, metadata=self.metadata + tuple(call.pop("metadata", ())),
                                        timeout=call.pop("timeout", self.timeout), **call)

    def generate_unary(self, **kwargs) -> gen.GenerateResult:
        return self.generation.GenerateUnary(generate_request(**kwargs), metadata=self.metadata, timeout=self.timeout)

    def abort(self, request_id: str) -> bool:
        return self.generation.Abort(gen.AbortRequest(request_id=request_id), metadata=self.metadata,
                                     timeout=self.timeout).found

    def info(self) -> info_pb2.ServerInfo:
        return self.info_stub.GetInfo(info_pb2.GetInfoRequest(), metadata=self.metadata, timeout=self.timeout)


class AsyncWelfareClient(_Base):
    """asyncio client: the same calls, awaited (generate is an async iterator)."""

    def __init__(self, addresses: str | Sequence[str], *, token: str | None = None, root_cert=None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20):
        super().__init__(token, timeout)
        target, options = channel_target(addresses)
        credentials = self._credentials(root_cert)
        options = options + _options(max_message_bytes)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self._stubs(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def generate(self, **kwargs):
        call = self.generation.Generate(generate_request(**kwargs), metadata=self.metadata, timeout=self.timeout)
        async for response in call:
            yield response.token if response.HasField("token") else response.final

    async def generate_unary(self, **kwargs) -> gen.GenerateResult:
        return await self.generation.GenerateUnary(generate_request(**kwargs), metadata=self.metadata,
                                                   timeout=self.timeout)

    async def abort(self, request_id: str) -> bool:
        return (await self.generation.Abort(gen.AbortRequest(request_id=request_id), metadata=self.metadata,
                                            timeout=self.timeout)).found

    async def info(self) -> info_pb2.ServerInfo:
        return await self.info_stub.GetInfo(info_pb2.GetInfoRequest(), metadata=self.metadata, timeout=self.timeout)
