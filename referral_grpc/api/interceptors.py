"""Cross-cutting work for every RPC: request id, default-deny authentication, error translation."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from ..domain import errors
from ..domain.auth import Principal
from ..domain.tokens import invalid_token
from .errors import abort, internal_status

log = logging.getLogger("referral_grpc.rpc")

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

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

MAX_REQUEST_ID_LENGTH = 128


def current_principal() -> Principal:
    """The authenticated caller; only reachable from methods outside PUBLIC_METHODS."""
    principal = _principal.get()
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
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_LENGTH:
            if value.isprintable():
                return value
    return uuid.uuid4().hex


def translate(exc: Exception) -> errors.DomainError | None:
    """Infrastructure failures the caller should retry, as domain errors; None for real bugs."""
    if isinstance(exc, MaxConnectionsExceeded):
        return errors.Unavailable("DATABASE_BUSY", "the service is overloaded; retry shortly")
    if isinstance(exc, pw.OperationalError | pw.InterfaceError):
        return errors.Unavailable("DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")
    return None


class ApiInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        authenticate: Callable[[str], Principal],
        release_connection: Callable[[], None],
        public_methods: frozenset[str] = PUBLIC_METHODS,
    ) -> None:
        self._authenticate = authenticate
        self._release_connection = release_connection
        self._public = public_methods

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            # Streaming methods are only health Watch and reflection: public by design.
            if handler is not None and details.method not in self._public:
                return _deny_handler()
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(details.method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        public = method in self._public

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            metadata = tuple(context.invocation_metadata() or ())
            rid = _incoming_request_id(metadata)
            rid_token = request_id.set(rid)
            principal_token = _principal.set(None)
            started = time.perf_counter()
            context.send_initial_metadata((("x-request-id", rid),))
            failure: errors.DomainError | None = None
            try:
                if not public:
                    _principal.set(self._authenticate(_bearer_token(metadata)))
                return behavior(request, context)
            except errors.DomainError as exc:
                failure = exc
            except Exception as exc:
                failure = translate(exc)
                if failure is None:
                    log.exception("unhandled error in %s", method)
                    context.abort_with_status(internal_status())
                else:
                    log.warning("%s failed: %s", method, type(exc).__name__)
            finally:
                self._release_connection()
                _principal.reset(principal_token)
                request_id.reset(rid_token)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %.1fms", method, (time.perf_counter() - started) * 1000)
            assert failure is not None
            abort(context, failure)

        return wrapper


def _deny_handler() -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, invalid_token())

    return grpc.unary_stream_rpc_method_handler(deny)
