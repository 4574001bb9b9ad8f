"""Cross-cutting work for every RPC: request id, default-deny authentication, error translation."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from ..domain import errors
from ..domain.tokens import invalid_token
from ..request_context import (
    DeadlineExceeded,
    Principal,
    RequestAbandoned,
    caller,
    check_alive,
    current_caller,
    request_deadline,
    request_id,
    request_lifetime,
)
from .admission import Admission
from .errors import abort, code_for, internal_status
from .policy import Policy, policy_for

log = logging.getLogger("referral_grpc.rpc")

MAX_REQUEST_ID_LENGTH = 128
# grpc reports a call without a deadline as one with centuries left.
_NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600

RpcObserver = Callable[[str, str, float], None]
# One line per RPC: method, status code name, seconds, log level (INFO, or DEBUG for quiet RPCs).
AccessLogger = Callable[[str, str, float, int], None]


def current_principal() -> Principal:
    """The authenticated caller; only reachable from RPCs whose policy is not public."""
    principal = current_caller()
    if principal is None:
        raise invalid_token()
    return principal


def _bearer_token(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    raise invalid_token()


def _incoming_request_id(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    for key, value in metadata:
        if (
            key == "x-request-id"
            and isinstance(value, str)
            and 0 < len(value) <= MAX_REQUEST_ID_LENGTH
            and value.isprintable()
        ):
            return value
    return uuid.uuid4().hex


def _deadline_seconds(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_SECONDS:
        return None
    return float(remaining)


def translate(exc: Exception) -> errors.DomainError | None:
    """Infrastructure failures the caller should retry, as domain errors; None for real bugs."""
    if isinstance(exc, DeadlineExceeded):
        return errors.DeadlineExceeded(exc.reason, exc.message)
    if isinstance(exc, RequestAbandoned):
        return errors.Unavailable(exc.reason, exc.message)
    if isinstance(exc, MaxConnectionsExceeded):
        return errors.Unavailable("DATABASE_BUSY", "the service is overloaded; retry shortly")
    if isinstance(exc, pw.OperationalError | pw.InterfaceError):
        return errors.Unavailable("DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")
    return None


@dataclass(frozen=True)
class _Undecodable:
    """What a request that does not parse as its message becomes, so the call can answer INVALID_ARGUMENT."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc answers a failing deserializer with INTERNAL and a traceback: bad input is ours to judge."""
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and UnicodeDecodeError for invalid UTF-8 in a string field
            return _Undecodable(type(exc).__name__)

    return tolerant


def _undecodable() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        "REQUEST_UNDECODABLE",
        "the request could not be decoded: strings must be valid UTF-8 and the body a valid message",
    )


@dataclass
class _Outcome:
    """The status code an RPC ended with, for the metrics and the access log."""

    code: grpc.StatusCode = grpc.StatusCode.OK


class ApiInterceptor(grpc.ServerInterceptor):
    """Runs every unary RPC of ours through the steps below, in this order:

    1. request scope: the caller's x-request-id kept (or one generated), echoed before any work;
    2. deadline: the caller's gRPC deadline bounds every transaction of the call;
    3. authentication: default deny, unless the RPC's policy says public;
    4. errors: domain errors and retryable infrastructure failures mapped through the one table;
       the pooled database connection is returned whatever happened;
    5. record: metrics and the access log line.
    The RPC's policy (public, blocking, quiet) comes from its proto option (referral_grpc.api.policy).
    """

    def __init__(
        self,
        authenticate: Callable[[str], Principal],
        release_connection: Callable[[], None],
        observe: RpcObserver | None = None,
        access_log: AccessLogger | None = None,
        blocking_pool: futures.ThreadPoolExecutor | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._admission = admission
        self._access_log = access_log
        self._blocking_pool = blocking_pool
        self._authenticate = authenticate
        self._release_connection = release_connection
        self._observe = observe
        # Wrapped handlers by (method, original handler): built once, not on every call.
        self._wrapped: dict[tuple[str, int], Any] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        policy = policy_for(details.method)
        if handler is not None and self._admission is not None and self._admission.full():
            return self._shed(details.method, handler, self._admission)
        if handler is None or handler.unary_unary is None:
            # Streaming methods are only health Watch and reflection: public by design.
            if handler is not None and not policy.public:
                return _deny_handler()
            return handler
        key = (details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            behavior = self._wrap(details.method, policy, handler.unary_unary)
            if self._blocking_pool is not None and policy.blocking:
                # grpc runs a behavior carrying this attribute on that pool instead of the server's own.
                behavior.experimental_thread_pool = self._blocking_pool
            wrapped = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
            # The original handler is kept alive by the server's registry, so its id stays unique.
            self._wrapped[key] = wrapped
        return wrapped

    def _shed(self, method: str, handler: Any, admission: Admission) -> Any:
        """A handler that refuses the call at once: RESOURCE_EXHAUSTED, SERVER_OVERLOADED, retry in 1 s."""
        overloaded = errors.ResourceExhausted(
            "SERVER_OVERLOADED", "the server is handling too many calls; retry shortly", retry_after=1
        )

        def shed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            with _request_scope(context):
                try:
                    abort(context, overloaded)
                finally:
                    self._record(method, grpc.StatusCode.RESOURCE_EXHAUSTED, time.perf_counter() - started)

        shed.experimental_thread_pool = admission.shed_pool  # type: ignore[attr-defined]
        if handler.unary_unary is None:
            return grpc.unary_stream_rpc_method_handler(shed)
        return grpc.unary_unary_rpc_method_handler(shed)

    def _wrap(self, method: str, policy: Policy, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        access_level = logging.DEBUG if policy.quiet else logging.INFO

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            outcome = _Outcome()
            with _request_scope(context):
                try:
                    return self._call(method, policy, behavior, request, context, outcome)
                finally:
                    self._record(method, outcome.code, time.perf_counter() - started, access_level)

        return wrapper

    def _call(
        self,
        method: str,
        policy: Policy,
        behavior: Callable[[Any, grpc.ServicerContext], Any],
        request: Any,
        context: grpc.ServicerContext,
        outcome: _Outcome,
    ) -> Any:
        abandoned = threading.Event()
        # Fires when the call ends for any reason; before the handler returns only if the client
        # cancelled or the server's shutdown grace ran out.
        context.add_callback(abandoned.set)
        with request_deadline(_deadline_seconds(context)), request_lifetime(abandoned):
            try:
                # Queued behind other RPCs until the caller gave up: do not start the work.
                check_alive()
                with caller(self._caller(policy, context)):
                    if isinstance(request, _Undecodable):
                        raise _undecodable()
                    return behavior(request, context)
            except errors.DomainError as exc:
                failure: errors.DomainError | None = exc
            except Exception as exc:
                failure = translate(exc)
                if failure is None:
                    outcome.code = grpc.StatusCode.INTERNAL
                    log.exception("unhandled error in %s", method)
                    context.abort_with_status(internal_status())
                log.warning("%s failed: %s", method, type(exc).__name__)
            finally:
                self._release_connection()
            assert failure is not None  # every path without one has returned or aborted
            outcome.code = code_for(failure)
            abort(context, failure)

    def _caller(self, policy: Policy, context: grpc.ServicerContext) -> Principal | None:
        if policy.public:
            return None
        return self._authenticate(_bearer_token(tuple(context.invocation_metadata() or ())))

    def _record(
        self, method: str, code: grpc.StatusCode, elapsed: float, access_level: int = logging.INFO
    ) -> None:
        if self._observe is not None:
            self._observe(method, code.name, elapsed)
        if self._access_log is not None:
            self._access_log(method, code.name, elapsed, access_level)


@contextmanager
def _request_scope(context: grpc.ServicerContext) -> Iterator[None]:
    """The call's request id, sent first so the caller sees it on errors as well as on success."""
    rid = _incoming_request_id(tuple(context.invocation_metadata() or ()))
    token = request_id.set(rid)
    try:
        context.send_initial_metadata((("x-request-id", rid),))
        yield
    finally:
        request_id.reset(token)


def _deny_handler() -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, invalid_token())

    return grpc.unary_stream_rpc_method_handler(deny)
