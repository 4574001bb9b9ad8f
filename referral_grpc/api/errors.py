"""The one table from domain errors to gRPC status codes and google.rpc.Status details."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status  # type: ignore[import-untyped]  # ships no type information

from ..domain import errors

ERROR_DOMAIN = "referral.v1"

CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_for(error: errors.DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.DomainError) -> grpc.Status:
    """google.rpc.Status with ErrorInfo, plus BadRequest or RetryInfo where they apply."""
    code = code_for(error)
    violations = error.field_violations if isinstance(error, errors.InvalidArgument) else ()
    if not violations and not isinstance(error, errors.ResourceExhausted):
        return _plain_status(code, error.reason, error.message, tuple(error.metadata.items()))
    details: list[Message] = [_error_info(error.reason, error.metadata)]
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason or error.reason
                    )
                    for v in violations
                ]
            )
        )
    if isinstance(error, errors.ResourceExhausted):
        seconds = max(0.0, error.retry_after)
        details.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(seconds), nanos=int((seconds - int(seconds)) * 1e9)
                )
            )
        )
    return _packed(code, error.message, details)


# Most errors are one of a few (a lookup's NOT_FOUND, an expired token's UNAUTHENTICATED): their status,
# details serialized, is built once. Keyed by all it is made of; bounded, as a message may carry a value.
@lru_cache(maxsize=1024)
def _plain_status(
    code: grpc.StatusCode, reason: str, message: str, metadata: tuple[tuple[str, str], ...]
) -> grpc.Status:
    return _packed(code, message, [_error_info(reason, dict(metadata))])


def _error_info(reason: str, metadata: Mapping[str, str]) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


def _packed(code: grpc.StatusCode, message: str, details: Sequence[Message]) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return _to_grpc(status_pb2.Status(code=code.value[0], message=message, details=packed))


def internal_status(message: str = "internal error") -> grpc.Status:
    return _to_grpc(status_pb2.Status(code=code_pb2.INTERNAL, message=message))


def _to_grpc(status: status_pb2.Status) -> grpc.Status:
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def response_headers(error: errors.DomainError) -> tuple[tuple[str, str], ...]:
    """Initial metadata an error adds: `retry-after` in whole seconds, rounded up, when throttled.

    Initial, not trailing: Envoy's transcoder turns the initial metadata into HTTP headers (trailers are
    dropped), so REST clients get the same Retry-After header as from Envoy's own rate limits.
    """
    if isinstance(error, errors.ResourceExhausted):
        return (("retry-after", str(max(1, math.ceil(error.retry_after)))),)
    return ()


def send_headers(context: grpc.ServicerContext, headers: Sequence[tuple[str, str]]) -> None:
    """The call's initial metadata; nothing when the client has already gone (it would raise).

    With `send_headers_with_the_answer()` in force they go out in the batch that carries the answer
    (the message and the status); otherwise in a batch of their own, at once.
    """
    state = getattr(context, "_state", None) if _headers_with_the_answer else None
    if state is not None and getattr(state, "initial_metadata_allowed", False):
        setattr(state, _HEADERS_ATTRIBUTE, tuple(headers))
        return
    if context.is_active():
        context.send_initial_metadata(tuple(headers))


# grpc's synchronous server sends what `send_initial_metadata` is given in a batch of its own: one
# more completion for its poller thread to hand back per RPC (A/B, one server process, cached
# lookup: direct gRPC over 16 connections 2,180-2,400 -> 2,800-2,870 req/s, server CPU 0.48-0.53 ->
# 0.41 ms; through Envoy's one multiplexed connection +4%). Initial metadata nobody sent goes out
# with the answer, in one batch, built by grpc._server._get_initial_metadata(state, metadata); for
# the grpcio version pinned in pyproject, the call's headers are kept on its state and added there.
# Should that function be missing, the headers are sent as before. tests/test_api.py checks the
# headers and that the single batch is on.
_HEADERS_ATTRIBUTE = "_referral_initial_metadata"
_headers_with_the_answer = False


def send_headers_with_the_answer() -> bool:
    """Send the calls' headers with their answers from now on (process-wide); whether that is in force."""
    global _headers_with_the_answer
    from grpc import _server  # the synchronous server's internals, for the pinned version

    original = getattr(_server, "_get_initial_metadata", None)
    if original is None:
        return False
    if not getattr(original, "with_call_headers", False):

        def with_call_headers(state: object, metadata: Sequence[tuple[str, str]] | None) -> object:
            headers = getattr(state, _HEADERS_ATTRIBUTE, None)
            if headers:
                metadata = headers if metadata is None else (*headers, *metadata)
            return original(state, metadata)

        with_call_headers.with_call_headers = True  # type: ignore[attr-defined]
        _server._get_initial_metadata = with_call_headers
    _headers_with_the_answer = True
    return True


def abort(
    context: grpc.ServicerContext, error: errors.DomainError, headers: Sequence[tuple[str, str]] = ()
) -> NoReturn:
    """End the call with `error`; `headers` (the request id) go out with the error's own initial metadata."""
    send_headers(context, (*headers, *response_headers(error)))
    context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returns only by raising")
