"""Messages of welfare.v1 to the engine's types and back, with the checks that belong to the wire
(tensor bytes against dtype and shape, sizes against ServerConfig limits, enum values the proto
does not define, registry ids). Everything else is the engine's to check: requests.prepare
validates every field and names it, and errors.translate carries that name to the client."""

from __future__ import annotations

import math

import numpy as np
import torch

from welfare_server.kernels import SteerMode
from welfare_server.model.engine import MonitorSpec, Request, SamplingParams, Scope, SteeringSpec, SteeringTerm
from welfare_server.server.errors import invalid
from welfare_server.server.proto import common_pb2 as pb
from welfare_server.server.proto import generation_pb2 as gen
from welfare_server.vectors.registry import RecordNotFound, RegistryError, check_compatible, layer_rows

DTYPES = {pb.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4")), pb.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<u2")),
          pb.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2"))}
STEER_MODES = {pb.STEER_MODE_UNSPECIFIED: SteerMode.ADD, pb.STEER_MODE_ADD: SteerMode.ADD,
               pb.STEER_MODE_ADD_RENORM: SteerMode.ADD_RENORM, pb.STEER_MODE_ABLATE: SteerMode.ABLATE,
               pb.STEER_MODE_CLAMP: SteerMode.CLAMP}
POINTS = {pb.POINT_UNSPECIFIED: "block_input", pb.POINT_BLOCK_INPUT: "block_input",
          pb.POINT_BLOCK_OUTPUT: "block_output"}
POINT_ENUMS = {"block_input": pb.POINT_BLOCK_INPUT, "block_output": pb.POINT_BLOCK_OUTPUT}
SCOPES = {pb.SCOPE_UNSPECIFIED: Scope.ASSISTANT_AND_GENERATED, pb.SCOPE_GENERATED: Scope.GENERATED,
          pb.SCOPE_ASSISTANT_AND_GENERATED: Scope.ASSISTANT_AND_GENERATED, pb.SCOPE_ALL: Scope.ALL}


def enum_value(table: dict, value: int, field: str, enum_name: str):
    """An enum member the proto defines; an unknown number (proto3 keeps them) is refused."""
    if value not in table:
        raise invalid(field, f"{value} is not a {enum_name} value (known: {sorted(table)})")
    return table[value]


def to_torch(message: pb.Tensor, field: str, max_elements: int) -> torch.Tensor:
    """fp32 tensor of a Tensor message; its bytes must be exactly prod(shape) elements of dtype."""
    dtype = enum_value(DTYPES, message.dtype, f"{field}.dtype", "DType") if message.dtype else None
    if dtype is None:
        raise invalid(f"{field}.dtype", "unset (DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16)")
    shape = list(message.shape)
    if not shape or any(n < 0 for n in shape):
        raise invalid(f"{field}.shape", f"{shape} is not a tensor shape (non-negative sizes, at least one axis)")
    count = math.prod(shape)
    if count > max_elements:
        raise invalid(f"{field}.shape", f"{count} elements, more than max_tensor_elements={max_elements}")
    torch_dtype, np_dtype = dtype
    if len(message.data) != count * np_dtype.itemsize:
        raise invalid(f"{field}.data", f"{len(message.data)} bytes, but shape {shape} of {torch_dtype} needs "
                                       f"{count * np_dtype.itemsize}")
    array = np.frombuffer(message.data, dtype=np_dtype).reshape(shape)
    tensor = torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16).view(torch.bfloat16)
    return tensor.to(torch.float32)


def from_torch(tensor: torch.Tensor) -> pb.Tensor:
    """A Tensor message (fp32, little-endian) of a tensor."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(array.shape), data=array.tobytes())


def sampling(message: gen.SamplingParams, default_max_new_tokens: int) -> SamplingParams:
    """Unset optional numbers take the engine's defaults (and the server's max_new_tokens)."""
    params = SamplingParams(max_new_tokens=default_max_new_tokens)
    for name in ("temperature", "top_p", "top_k", "seed", "max_new_tokens"):
        if message.HasField(name):
            setattr(params, name, getattr(message, name))
    params.stop_strings = list(message.stop)
    params.stop_token_ids = list(message.stop_token_ids)
    params.ignore_eos = message.ignore_eos
    params.logprobs = message.logprobs
    if message.allowed_token_ids:
        params.allowed_token_ids = list(message.allowed_token_ids)
    if message.score_token_ids:
        params.score_token_ids = list(message.score_token_ids)
    return params


def steering(message: pb.Steering, *, num_layers: int, registry, identity, max_elements: int) -> SteeringSpec | None:
    """A SteeringSpec; a term naming a registry record gets the record's row for each of its layers
    (inline: the request's own bank slots), a term with an inline [len(layers), D] tensor one row
    per layer."""
    if not message.terms:
        return None
    terms = []
    for i, term in enumerate(message.terms):
        where = f"steering.terms[{i}]"
        mode = enum_value(STEER_MODES, term.mode, f"{where}.mode", "SteerMode")
        point = enum_value(POINTS, term.point, f"{where}.point", "Point")
        coefficient = term.coefficient if term.HasField("coefficient") else 1.0
        layers = list(term.layers)
        if not layers:
            raise invalid(f"{where}.layers", "empty; at least one layer is required")
        bad = [l for l in layers if not -num_layers <= l < num_layers]
        if bad:
            raise invalid(f"{where}.layers", f"{bad[0]} is out of range [-{num_layers}, {num_layers})")
        kind = term.WhichOneof("vector")
        if kind is None:
            raise invalid(f"{where}.vector", "unset: give vector_id or inline")
        if kind == "vector_id":
            record = _record(registry, term.vector_id, identity, f"{where}.vector_id")
            try:
                rows = layer_rows(record, [l % num_layers for l in layers], point, f"{where}.layers")
            except RegistryError as error:
                raise invalid(error.field or f"{where}.layers", str(error).split(": ", 1)[-1]) from None
            terms += [SteeringTerm(row, [layer], coefficient, mode, point) for layer, row in rows]
            continue
        vector = to_torch(term.inline, f"{where}.inline", max_elements)
        if vector.dim() == 1:
            terms.append(SteeringTerm(vector, layers, coefficient, mode, point))
        elif vector.dim() == 2 and vector.shape[0] == len(layers):
            terms += [SteeringTerm(vector[j], [layer], coefficient, mode, point) for j, layer in enumerate(layers)]
        else:
            raise invalid(f"{where}.inline.shape", f"{list(vector.shape)}: expected [D] or [{len(layers)}, D] "
                                                   "(one row per layer)")
    scope = enum_value(SCOPES, message.scope, "steering.scope", "Scope")
    return SteeringSpec(terms, scope)


def _record(registry, record_id: str, identity, field: str):
    if registry is None:
        raise invalid(field, "this server has no vector registry")
    try:
        record = registry.get(record_id)
        check_compatible(record, identity)
    except RecordNotFound:
        raise invalid(field, f"no vector record {record_id!r} in the registry") from None
    except RegistryError as error:
        raise invalid(field, str(error)) from None
    return record


def monitor(message: pb.Monitor, max_elements: int) -> MonitorSpec | None:
    if not message.HasField("vectors"):
        if message.layers:
            raise invalid("monitor.vectors", "unset, but monitor.layers are given")
        return None
    vectors = to_torch(message.vectors, "monitor.vectors", max_elements)
    point = enum_value(POINTS, message.point, "monitor.point", "Point")
    return MonitorSpec(vectors, list(message.layers), point)


def generate_request(message: gen.GenerateRequest, request_id: str, *, tokenizer, num_layers: int, registry,
                     identity, config) -> Request:
    """The engine Request of a GenerateRequest (streamed: the server always reads events)."""
    kind = message.WhichOneof("input")
    if kind is None:
        raise invalid("input", "unset: give chat, text or tokens")
    request = Request(request_id=request_id, stream=True,
                      sampling=sampling(message.sampling, config.default_max_new_tokens),
                      steering=steering(message.steering, num_layers=num_layers, registry=registry, identity=identity,
                                        max_elements=config.max_tensor_elements),
                      monitor=monitor(message.monitor, config.max_tensor_elements))
    if kind == "chat":
        request.messages = [{"role": m.role, "content": m.content} for m in message.chat.messages]
        if not request.messages:
            raise invalid("chat.messages", "empty; at least one message is required")
    elif kind == "text":
        if tokenizer is None:
            raise invalid("text", "this model has no tokenizer; send tokens")
        if not message.text:
            raise invalid("text", "empty")
        request.prompt = list(tokenizer(message.text)["input_ids"])
    else:
        request.prompt = list(message.tokens.ids)
    enum_value({v: v for v in gen.OutputMode.values()}, message.output, "output", "OutputMode")
    return request
