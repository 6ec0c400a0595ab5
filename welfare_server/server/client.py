"""Python clients of a welfare_server: WelfareClient (blocking) and AsyncWelfareClient (asyncio),
over one channel to one address or, for replicas, gRPC's own client-side load balancing
(round_robin) over several addresses. Generation (generate, generate_unary, abort), info, vectors
(extract, list_vectors, get_vector, put_vector, delete_vector, export_vector, import_vector) and
the maze (rollout, maze_session).

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
from welfare_server.server.proto import maze_pb2
from welfare_server.server.proto import vectors_pb2 as vec

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
    _channels = grpc  # grpc (blocking) or grpc.aio: where secure_channel / insecure_channel come from

    def __init__(self, addresses: str | Sequence[str], *, token: str | None = None, root_cert=None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20):
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        target, options = channel_target(addresses)
        credentials = self._credentials(root_cert)
        options = options + _options(max_message_bytes)
        self.channel = (self._channels.secure_channel(target, credentials, options) if credentials
                        else self._channels.insecure_channel(target, options))
        self._stubs(self.channel)

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

    # ------------------------------------------------------------------ vectors
    def extract(self, **kwargs):
        """Yield ExtractProgress messages; the last (stage "done") carries vector_ids, selection and
        counts. kwargs: see extract_request."""
        yield from self.vectors.Extract(extract_request(**kwargs), metadata=self.metadata, timeout=self.timeout)

    def list_vectors(self, name: str = "", method: str = "", this_model_only: bool = False) -> list:
        """VectorMeta of every record matching the filters (exact name, exact method, this model's)."""
        return list(self.vectors.List(vec.ListVectorsRequest(name=name, method=method,
                                                             this_model_only=this_model_only),
                                      metadata=self.metadata, timeout=self.timeout).vectors)

    def get_vector(self, vector_id: str) -> vec.VectorRecord:
        """A record's meta and fp32 tensor (wire.to_torch(record.tensor, "tensor", n) reads it)."""
        return self.vectors.Get(vec.GetVectorRequest(id=vector_id), metadata=self.metadata, timeout=self.timeout)

    def put_vector(self, tensor, layers: Sequence[int], **kwargs) -> str:
        """Store a vector for the served model; returns its id. kwargs: name, point, method."""
        return self.vectors.Put(put_request(tensor, layers, **kwargs), metadata=self.metadata,
                                timeout=self.timeout).id

    def delete_vector(self, vector_id: str) -> bool:
        return self.vectors.Delete(vec.DeleteVectorRequest(id=vector_id), metadata=self.metadata,
                                   timeout=self.timeout).deleted

    def export_vector(self, vector_id: str, scale: float = 1.0, layers: Sequence[int] = ()) -> bytes:
        """The record (its rows at `layers`, or every row llama.cpp can steer) as a llama.cpp
        control-vector file."""
        return self.vectors.Export(vec.ExportVectorRequest(id=vector_id, scale=scale, layers=list(layers)),
                                   metadata=self.metadata, timeout=self.timeout).gguf

    def import_vector(self, gguf: bytes, name: str = "") -> str:
        """Store a llama.cpp control-vector file as a record for the served model; returns its id."""
        return self.vectors.Import(vec.ImportVectorRequest(gguf=gguf, name=name), metadata=self.metadata,
                                   timeout=self.timeout).id

    # ------------------------------------------------------------------ maze
    def rollout(self, **kwargs):
        """Yield Episode messages, maze-major (every member of maze 0 first). kwargs: see rollout_request."""
        yield from self.maze.Rollout(rollout_request(**kwargs), metadata=self.metadata, timeout=self.timeout)

    def maze_session(self) -> "MazeSession":
        """A maze Session stream: `with client.maze_session() as s: s.reset(...); s.step(...)`."""
        return MazeSession(self.maze, self.metadata, self.timeout)


class AsyncWelfareClient(_Base):
    """asyncio client: the same calls, awaited (generate is an async iterator)."""

    _channels = grpc.aio

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

    # ------------------------------------------------------------------ vectors
    async def extract(self, **kwargs):
        async for progress in self.vectors.Extract(extract_request(**kwargs), metadata=self.metadata,
                                                   timeout=self.timeout):
            yield progress

    async def list_vectors(self, name: str = "", method: str = "", this_model_only: bool = False) -> list:
        return list((await self.vectors.List(vec.ListVectorsRequest(name=name, method=method,
                                                                    this_model_only=this_model_only),
                                             metadata=self.metadata, timeout=self.timeout)).vectors)

    async def get_vector(self, vector_id: str) -> vec.VectorRecord:
        return await self.vectors.Get(vec.GetVectorRequest(id=vector_id), metadata=self.metadata,
                                      timeout=self.timeout)

    async def put_vector(self, tensor, layers: Sequence[int], **kwargs) -> str:
        return (await self.vectors.Put(put_request(tensor, layers, **kwargs), metadata=self.metadata,
                                       timeout=self.timeout)).id

    async def delete_vector(self, vector_id: str) -> bool:
        return (await self.vectors.Delete(vec.DeleteVectorRequest(id=vector_id), metadata=self.metadata,
                                          timeout=self.timeout)).deleted

    async def export_vector(self, vector_id: str, scale: float = 1.0, layers: Sequence[int] = ()) -> bytes:
        return (await self.vectors.Export(vec.ExportVectorRequest(id=vector_id, scale=scale, layers=list(layers)),
                                          metadata=self.metadata, timeout=self.timeout)).gguf

    async def import_vector(self, gguf: bytes, name: str = "") -> str:
        return (await self.vectors.Import(vec.ImportVectorRequest(gguf=gguf, name=name), metadata=self.metadata,
                                          timeout=self.timeout)).id

    # ------------------------------------------------------------------ maze
    async def rollout(self, **kwargs):
        async for episode in self.maze.Rollout(rollout_request(**kwargs), metadata=self.metadata,
                                               timeout=self.timeout):
            yield episode

    def maze_session(self) -> "AsyncMazeSession":
        """A maze Session stream: `async with client.maze_session() as s: await s.reset(...)`."""
        return AsyncMazeSession(self.maze, self.metadata, self.timeout)


# --------------------------------------------------------------------------------------- vectors and maze
POLICIES = {"model": maze_pb2.POLICY_MODEL, "random": maze_pb2.POLICY_RANDOM, "oracle": maze_pb2.POLICY_ORACLE}


def _chat_examples(chats) -> list:
    return [vec.ChatExample(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in chat])
            for chat in chats]


def extract_request(*, maze: dict | None = None, contrast: tuple | None = None, per_class: int | None = None,
                    heldout_fraction: float | None = None, permutations: int | None = None, seed: int | None = None,
                    name: str = "") -> vec.ExtractRequest:
    """An ExtractRequest: maze = MazeClasses fields (size, episode_steps, glyphs; {} for the
    paper's maze) or contrast = (positive chats, negative chats), each chat a list of
    {"role", "content"} messages. Unset numbers take the server's defaults."""
    request = vec.ExtractRequest(name=name)
    if (maze is None) == (contrast is None):
        raise ValueError("give exactly one of maze (a dict, {} for the defaults) or contrast (positive, negative)")
    if maze is not None:
        request.maze.CopyFrom(vec.MazeClasses(**maze))
    else:
        positive, negative = contrast
        request.contrast.positive.extend(_chat_examples(positive))
        request.contrast.negative.extend(_chat_examples(negative))
    for field, value in (("per_class", per_class), ("heldout_fraction", heldout_fraction),
                         ("permutations", permutations), ("seed", seed)):
        if value is not None:
            setattr(request, field, value)
    return request


def put_request(tensor, layers: Sequence[int], *, name: str = "", point: str = "block_input",
                method: str = "") -> vec.PutVectorRequest:
    """A PutVectorRequest: tensor is [len(layers), D] or [D] (the same row at each layer), a torch
    tensor (sent as fp32) or a prepared pb.Tensor (any wire dtype)."""
    message = tensor if isinstance(tensor, pb.Tensor) else wire.from_torch(torch.as_tensor(tensor))
    return vec.PutVectorRequest(tensor=message, layers=list(layers), name=name, point=wire.POINT_ENUMS[point],
                                method=method)


def rollout_request(*, num_mazes: int, group_size: int = 1, policy: str = "model", temperature: float | None = None,
                    seed: int = 0, rules: dict | None = None, steering: Iterable[pb.SteeringTerm] = (),
                    scope: str = "assistant_and_generated", include_tokens: bool = False) -> maze_pb2.RolloutRequest:
    """A RolloutRequest: rules = MazeRules fields (size, episode_steps, wind_prob, melting,
    step_reward, mold_reward, gold_reward, glyphs); policy "model", "random" or "oracle";
    temperature 0 is greedy; steering terms (client.term) apply to the model policy."""
    request = maze_pb2.RolloutRequest(rules=maze_pb2.MazeRules(**(rules or {})), num_mazes=num_mazes,
                                      group_size=group_size, policy=POLICIES[policy], seed=seed,
                                      include_tokens=include_tokens)
    if temperature is not None:
        request.temperature = temperature
    steering = list(steering)
    if steering:
        request.steering.terms.extend(steering)
        request.steering.scope = SCOPES[scope]
    return request


def session_reset(num_envs: int, *, seed: int = 0, rules: dict | None = None,
                  render_tokens: bool = False) -> maze_pb2.SessionRequest:
    return maze_pb2.SessionRequest(reset=maze_pb2.SessionReset(rules=maze_pb2.MazeRules(**(rules or {})),
                                                               num_envs=num_envs, seed=seed,
                                                               render_tokens=render_tokens))


def session_step(actions: Sequence[int]) -> maze_pb2.SessionRequest:
    return maze_pb2.SessionRequest(step=maze_pb2.SessionStep(actions=[int(a) for a in actions]))


class MazeSession:
    """A blocking maze Session: reset(...) and step(actions) each send one command and return the
    server's SessionResponse; close() (or leaving the with block) ends the stream. A refusal ends
    the session and raises grpc.RpcError."""

    _END = object()

    def __init__(self, stub, metadata, timeout):
        import queue

        self._requests = queue.Queue()
        self._responses = stub.Session(iter(self._requests.get, self._END), metadata=metadata, timeout=timeout)

    def _send(self, request) -> maze_pb2.SessionResponse:
        self._requests.put(request)
        return next(self._responses)

    def reset(self, num_envs: int, **kwargs) -> maze_pb2.SessionResponse:
        """kwargs: seed, rules (a dict of MazeRules fields), render_tokens."""
        return self._send(session_reset(num_envs, **kwargs))

    def step(self, actions: Sequence[int]) -> maze_pb2.SessionResponse:
        return self._send(session_step(actions))

    def close(self) -> None:
        self._requests.put(self._END)
        for _ in self._responses:  # the server ends the stream once the requests end
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._responses.cancel()


class AsyncMazeSession:
    """The asyncio maze Session: await reset(...) / step(actions); await close()."""

    def __init__(self, stub, metadata, timeout):
        self._call = stub.Session(metadata=metadata, timeout=timeout)

    async def _send(self, request) -> maze_pb2.SessionResponse:
        await self._call.write(request)
        response = await self._call.read()
        if response is grpc.aio.EOF:  # a refusal raises in read(); EOF is a stream the server ended cleanly
            raise RuntimeError("the maze session has ended")
        return response

    async def reset(self, num_envs: int, **kwargs) -> maze_pb2.SessionResponse:
        return await self._send(session_reset(num_envs, **kwargs))

    async def step(self, actions: Sequence[int]) -> maze_pb2.SessionResponse:
        return await self._send(session_step(actions))

    async def close(self) -> None:
        await self._call.done_writing()
        while await self._call.read() is not grpc.aio.EOF:  # the server ends the stream once the requests end
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        if exc[0] is None:
            await self.close()
        else:
            self._call.cancel()
