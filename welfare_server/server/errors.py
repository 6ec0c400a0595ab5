"""Refusals on the wire: every invalid field answers INVALID_ARGUMENT with a google.rpc.BadRequest
naming it; a full queue or too many calls RESOURCE_EXHAUSTED; an unknown record NOT_FOUND only
where the record is the call's subject (a steering term naming an unknown vector is an invalid
field). The engine's and the registry's own errors already name their fields; this module only
translates them."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from welfare_server.model.engine import QueueFull
from welfare_server.model.fields import InvalidRequest
from welfare_server.vectors.registry import CorruptRecord, RecordNotFound, RegistryError


class WireError(Exception):
    """A refusal on its way to the client: status code, message and (for invalid fields) the
    field violations."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []


def invalid(field: str, description: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", [(field, description)])


def exhausted(message: str) -> WireError:
    return WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def translate(error: BaseException, *, field_prefix: str = "", subject_is_record: bool = False,
              field_map: dict[str, str] | None = None) -> WireError:
    """The wire form of an engine, steering, registry or config refusal (others: INTERNAL).
    field_map renames the engine's field paths to the message's (longest prefix first)."""
    if isinstance(error, WireError):
        return error
    if isinstance(error, QueueFull):
        return exhausted(str(error))
    if isinstance(error, RecordNotFound) and subject_is_record:
        return WireError(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, CorruptRecord):
        return WireError(grpc.StatusCode.DATA_LOSS, str(error))
    if isinstance(error, (InvalidRequest, RegistryError)):
        field = getattr(error, "field", "") or ""
        message = str(error)
        description = message[len(field) + 2:] if field and message.startswith(field + ": ") else message
        field = field_prefix + field if field else field_prefix.rstrip(".") or "request"
        for engine_name, wire_name in sorted((field_map or {}).items(), key=lambda kv: -len(kv[0])):
            if field == engine_name or field.startswith(engine_name + ".") or field.startswith(engine_name + "["):
                field = wire_name + field[len(engine_name):]
                break
        return WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", [(field, description)])
    if isinstance(error, ValueError):
        return WireError(grpc.StatusCode.INVALID_ARGUMENT, str(error), [("request", str(error))])
    return WireError(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def to_status(error: WireError) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status details (BadRequest for field violations)."""
    status = status_pb2.Status(code=_CODES.get(error.code, code_pb2.UNKNOWN), message=error.message)
    if error.violations:
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations])
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


async def abort(context, error: BaseException, **translate_args):
    """Abort the call with the wire form of `error` (never returns)."""
    await context.abort_with_status(to_status(translate(error, **translate_args)))


def field_violations(call_error) -> list[tuple[str, str]]:
    """(field, description) pairs of a failed call's BadRequest details (client side)."""
    status = rpc_status.from_call(call_error)
    if status is None:
        return []
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
}
