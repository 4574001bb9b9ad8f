"""Cross-cutting work for every RPC: request id, default-deny authentication, error translation."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from ..domain import errors
from ..domain.tokens import invalid_token
from ..request_context import (
    DeadlineExceeded,
    Principal,
    caller,
    check_deadline,
    current_caller,
    request_deadline,
    request_id,
)
from .errors import abort, code_for, internal_status

log = logging.getLogger("referral_grpc.rpc")
# One line per RPC; its own logger so operators can route or silence it.
access_log = logging.getLogger("referral_grpc.access")

# Only these methods may be called without an access token. Everything else, including any
# RPC added later, requires one: tests/test_auth_matrix.py enumerates the descriptors to prove it.
PUBLIC_METHODS = frozenset(
    {
        "/referral.v1.AuthService/Register",
        "/referral.v1.AuthService/Login",
        "/referral.v1.AuthService/RefreshToken",
        "/referral.v1.AuthService/RequestPasswordReset",
        "/referral.v1.AuthService/ResetPassword",
        "/referral.v1.ReferralService/GetReferralCodeByEmail",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

# RPCs that spend most of their time blocked without the GIL (bcrypt; Hunter on Register; the padded
# reset request): they run on the server's blocking pool, so they never hold the main pool's threads.
BLOCKING_METHODS = frozenset(
    {
        "/referral.v1.AuthService/Register",
        "/referral.v1.AuthService/Login",
        "/referral.v1.AuthService/ChangePassword",
        "/referral.v1.AuthService/ResetPassword",
        "/referral.v1.AuthService/RequestPasswordReset",
    }
)

# Balancers check health every second or so: an INFO line for each would drown the access log.
QUIET_METHODS = frozenset({"/grpc.health.v1.Health/Check"})

MAX_REQUEST_ID_LENGTH = 128
# grpc reports a call without a deadline as one with centuries left.
_NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600

RpcObserver = Callable[[str, str, float], None]


def current_principal() -> Principal:
    """The authenticated caller; only reachable from methods outside PUBLIC_METHODS."""
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
    if isinstance(exc, MaxConnectionsExceeded):
        return errors.Unavailable("DATABASE_BUSY", "the service is overloaded; retry shortly")
    if isinstance(exc, pw.OperationalError | pw.InterfaceError):
        return errors.Unavailable("DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")
    return None


class ApiInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Request id, deadline, authentication, error translation, access log and metrics for unary RPCs."""

    def __init__(
        self,
        authenticate: Callable[[str], Principal],
        release_connection: Callable[[], None],
        public_methods: frozenset[str] = PUBLIC_METHODS,
        observe: RpcObserver | None = None,
        access_log: bool = True,
        blocking_pool: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._access_log = access_log
        self._blocking_pool = blocking_pool
        self._authenticate = authenticate
        self._release_connection = release_connection
        self._public = public_methods
        self._observe = observe
        # Wrapped handlers by (method, original handler): built once, not on every call.
        self._wrapped: dict[tuple[str, int], Any] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            # Streaming methods are only health Watch and reflection: public by design.
            if handler is not None and details.method not in self._public:
                return _deny_handler()
            return handler
        key = (details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            behavior = self._wrap(details.method, handler.unary_unary)
            if self._blocking_pool is not None and details.method in BLOCKING_METHODS:
                # grpc runs a behavior carrying this attribute on that pool instead of the server's own.
                behavior.experimental_thread_pool = self._blocking_pool
            wrapped = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            # The original handler is kept alive by the server's registry, so its id stays unique.
            self._wrapped[key] = wrapped
        return wrapped

    def _wrap(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        public = method in self._public
        access_level = logging.DEBUG if method in QUIET_METHODS else logging.INFO

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            metadata = tuple(context.invocation_metadata() or ())
            rid = _incoming_request_id(metadata)
            rid_token = request_id.set(rid)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                # Sent before any work, so the caller sees the id on errors as well as on success.
                context.send_initial_metadata((("x-request-id", rid),))
                with request_deadline(_deadline_seconds(context)):
                    failure: errors.DomainError | None = None
                    try:
                        # Queued behind other RPCs until the caller gave up: do not start the work.
                        check_deadline()
                        if not public:
                            with caller(self._authenticate(_bearer_token(metadata))):
                                return behavior(request, context)
                        return behavior(request, context)
                    except errors.DomainError as exc:
                        failure = exc
                    except Exception as exc:
                        failure = translate(exc)
                        if failure is None:
                            code = grpc.StatusCode.INTERNAL
                            log.exception("unhandled error in %s", method)
                            context.abort_with_status(internal_status())
                        log.warning("%s failed: %s", method, type(exc).__name__)
                    finally:
                        self._release_connection()
                    assert failure is not None  # every path without one has returned or aborted
                    code = code_for(failure)
                    abort(context, failure)
            finally:
                elapsed = time.perf_counter() - started
                if self._observe is not None:
                    self._observe(method, code.name, elapsed)
                if self._access_log:
                    access_log.log(
                        access_level,
                        "%s %s %.1fms",
                        method,
                        code.name,
                        elapsed * 1000,
                        extra={
                            "rpc_method": method,
                            "grpc_code": code.name,
                            "duration_ms": round(elapsed * 1000, 2),
                        },
                    )
                request_id.reset(rid_token)

        return wrapper


def _deny_handler() -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, invalid_token())

    return grpc.unary_stream_rpc_method_handler(deny)
