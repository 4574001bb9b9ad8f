"""Cross-cutting work for every RPC: request id, default-deny authentication, idempotency, errors."""

from __future__ import annotations

import logging
import re
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
from ..domain.apikeys import invalid_api_key
from ..domain.tokens import invalid_token
from ..request_context import (
    ApiKeyPrincipal,
    Caller,
    DeadlineExceeded,
    Principal,
    RequestAbandoned,
    SignedPrincipal,
    caller,
    check_alive,
    current_caller,
    request_deadline,
    request_id,
    request_lifetime,
    trace_id,
)
from . import idempotency
from .admission import Admission, CountingExecutor
from .errors import abort, code_for, internal_status, send_headers
from .idempotency import IdempotencyStore
from .policy import Policy, policy_for

log = logging.getLogger("referral_grpc.rpc")
# Why a call is shed (RESOURCE_EXHAUSTED, SERVER_OVERLOADED).
_OVERLOADED = "the server is handling too many calls; retry shortly"
_TOO_MANY_STREAMS = "the server has as many open streams as it serves (GRPC_MAX_STREAMS); retry shortly"

# What a client's x-request-id may be, kept end to end (Envoy's Lua filter applies the same rule):
# 1 to 128 letters, digits and -_.: (a UUID always qualifies). Anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex.
TRACEPARENT = re.compile(r"00-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})-[0-9a-f]{2}")
# grpc reports a call without a deadline as one with centuries left.
_NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600

RpcObserver = Callable[[str, str, float], None]
# One line per RPC: method, status code name, seconds, log level (INFO, or DEBUG for quiet RPCs).
AccessLogger = Callable[[str, str, float, int], None]


def current_principal() -> Principal:
    """The authenticated user; only reachable from RPCs that take a user's access token."""
    principal = current_caller()
    if not isinstance(principal, Principal):
        raise invalid_token()
    return principal


def current_signed_principal() -> SignedPrincipal:
    """The caller of an RPC whose policy has `token_version_in_handler`: the handler's own read must
    compare `token_version` with the user's row (domain.tokens.require_token_version)."""
    principal = current_caller()
    if not isinstance(principal, SignedPrincipal):
        raise invalid_token()
    return principal


def _header(metadata: tuple[tuple[str, str | bytes], ...], name: str) -> str | None:
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return None


def _bearer_token(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    raise invalid_token()


def _incoming_request_id(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    """The caller's x-request-id when well formed (the gateway's rule too), else a new one."""
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _incoming_trace_id(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    """The trace id of a W3C `traceparent` (version 00), or None when absent or malformed."""
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            match = TRACEPARENT.fullmatch(value.strip())
            if match and set(match["trace_id"]) != {"0"} and set(match["parent_id"]) != {"0"}:
                return match["trace_id"]
    return None


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
    3. authentication: default deny, unless the RPC's policy says public; an API key with the
       policy's scopes where it names some (or a user's token where it also allows one);
    4. idempotency: for RPCs whose policy takes an Idempotency-Key, a retry gets the first response
       (referral_grpc.api.idempotency);
    5. errors: domain errors and retryable infrastructure failures mapped through the one table;
       the pooled database connection is returned whatever happened;
    6. record: metrics and the access log line.
    The RPC's policy (public, blocking, quiet, scopes, idempotency) comes from its proto option
    (referral_grpc.api.policy).
    """

    def __init__(
        self,
        authenticate: Callable[[str], Principal],
        authenticate_signed: Callable[[str], SignedPrincipal],
        release_connection: Callable[[], None],
        observe: RpcObserver | None = None,
        access_log: AccessLogger | None = None,
        blocking_pool: futures.ThreadPoolExecutor | None = None,
        admission: Admission | None = None,
        stream_pool: CountingExecutor | None = None,
        authenticate_key: Callable[[str], ApiKeyPrincipal] | None = None,
        idempotency_store: IdempotencyStore | None = None,
        abandoned: Callable[[str], None] | None = None,
    ) -> None:
        self._abandoned = abandoned
        self._admission = admission
        self._access_log = access_log
        self._blocking_pool = blocking_pool
        self._stream_pool = stream_pool
        self._authenticate = authenticate
        self._authenticate_key = authenticate_key
        self._authenticate_signed = authenticate_signed
        self._idempotency = idempotency_store
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
            return self._shed(details.method, handler, _OVERLOADED)
        ours = handler is not None and handler.unary_stream is not None and not policy.public
        # Reflection: a client may keep its stream open, holding a thread meanwhile, so it goes on the
        # streams' pool too. (Health's Watch holds none: grpc runs it non-blocking.)
        reflection = handler is not None and handler.stream_stream is not None and policy.public
        if ours or reflection:
            # Checked and submitted by grpc's one serving thread: no other stream gets in between.
            if self._stream_pool is not None and self._stream_pool.full():
                return self._shed(details.method, handler, _TOO_MANY_STREAMS)
            if ours:
                return self._stream_handler(details.method, policy, handler)
            return self._public_stream_handler(details.method, handler)
        if handler is None or handler.unary_unary is None:
            # Health's Watch passes; any other stream shape is ours to refuse.
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
            serializer = handler.response_serializer
            if policy.idempotency:
                # A replayed response is already serialized.
                serializer = _bytes_or(serializer)
            wrapped = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=serializer,
            )
            # The original handler is kept alive by the server's registry, so its id stays unique.
            self._wrapped[key] = wrapped
        return wrapped

    def _stream_handler(self, method: str, policy: Policy, handler: Any) -> Any:
        key = (method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            behavior = self._wrap_stream(method, policy, handler.unary_stream)
            if self._stream_pool is not None:
                # A stream holds its thread while its caller stays: never one of the unary RPCs'.
                behavior.experimental_thread_pool = self._stream_pool  # type: ignore[attr-defined]
            wrapped = grpc.unary_stream_rpc_method_handler(
                behavior,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
            self._wrapped[key] = wrapped
        return wrapped

    def _public_stream_handler(self, method: str, handler: Any) -> Any:
        """A public bidirectional stream (reflection) as it is, but on the streams' pool."""
        if self._stream_pool is None:
            return handler
        key = (method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            inner = handler.stream_stream

            def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner(requests, context)

            behavior.experimental_thread_pool = self._stream_pool  # type: ignore[attr-defined]
            wrapped = grpc.stream_stream_rpc_method_handler(
                behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            self._wrapped[key] = wrapped
        return wrapped

    def _wrap_stream(
        self, method: str, policy: Policy, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        """A server stream: steps 1, 3 and 5 as for unary calls before the first message, then 6 at its end.

        The servicer validates before returning its iterator, so bad input is a status. The stream
        has no deadline of its own (it lasts until the caller leaves) and no idempotency.
        """

        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            failure: errors.DomainError | None = None
            with _request_scope(context):
                try:
                    principal = self._caller(policy, context)
                    if isinstance(request, _Undecodable):
                        raise _undecodable()
                    with caller(principal):
                        messages = behavior(request, context)
                except errors.DomainError as exc:
                    failure = exc
                except Exception as exc:
                    failure = translate(exc)
                    if failure is None:
                        self._record(method, grpc.StatusCode.INTERNAL, time.perf_counter() - started)
                        log.exception("unhandled error in %s", method)
                        context.abort_with_status(internal_status())
                finally:
                    self._release_connection()
                if failure is not None:
                    self._record(method, code_for(failure), time.perf_counter() - started)
                    abort(context, failure)
            return self._observed(method, messages, context, started)

        return wrapper

    def _observed(
        self, method: str, messages: Iterator[Any], context: grpc.ServicerContext, started: float
    ) -> Iterator[Any]:
        code = grpc.StatusCode.OK
        try:
            yield from messages
            if not context.is_active():
                code = grpc.StatusCode.CANCELLED
        except Exception as exc:
            failure = translate(exc) if not isinstance(exc, errors.DomainError) else exc
            if failure is None:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method)
                context.abort_with_status(internal_status())
            else:
                code = code_for(failure)
                log.warning("%s failed: %s", method, type(exc).__name__)
                abort(context, failure)
        finally:
            self._release_connection()
            self._record(method, code, time.perf_counter() - started)

    def _shed(self, method: str, handler: Any, message: str) -> Any:
        """A handler that refuses the call at once (RESOURCE_EXHAUSTED, SERVER_OVERLOADED, retry in 1 s),
        on the admission's pool of its own: a busy server still answers it."""
        overloaded = errors.ResourceExhausted("SERVER_OVERLOADED", message, retry_after=1)

        def shed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            with _request_scope(context) as headers:
                try:
                    abort(context, overloaded, headers)
                finally:
                    self._record(method, grpc.StatusCode.RESOURCE_EXHAUSTED, time.perf_counter() - started)

        if self._admission is not None:
            shed.experimental_thread_pool = self._admission.shed_pool  # type: ignore[attr-defined]
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(shed)
        if handler.unary_unary is None:
            return grpc.unary_stream_rpc_method_handler(shed)
        return grpc.unary_unary_rpc_method_handler(shed)

    def _wrap(self, method: str, policy: Policy, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        access_level = logging.DEBUG if policy.quiet else logging.INFO

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            outcome = _Outcome()
            with _request_scope(context) as headers:
                try:
                    return self._call(method, policy, behavior, request, context, outcome, headers)
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
        headers: tuple[tuple[str, str], ...],
    ) -> Any:
        abandoned = threading.Event()
        running = True
        counted = self._abandoned

        def ended() -> None:
            abandoned.set()
            if running and counted is not None:
                counted(method)

        # Fires when the call ends for any reason; while the handler runs only if the client
        # cancelled or the server's shutdown grace ran out (counted: referral_rpc_abandoned_total).
        if not context.add_callback(ended):
            ended()  # the call ended between its request arriving and this handler starting
        with request_deadline(_deadline_seconds(context)), request_lifetime(abandoned):
            try:
                # Queued behind other RPCs until the caller gave up: do not start the work.
                check_alive()
                principal = self._caller(policy, context)
                with caller(principal):
                    if isinstance(request, _Undecodable):
                        raise _undecodable()
                    if policy.idempotency:
                        response = self._idempotent(method, policy, principal, behavior, request, context)
                    else:
                        response = behavior(request, context)
                send_headers(context, headers)
                return response
            except errors.DomainError as exc:
                failure: errors.DomainError | None = exc
            except Exception as exc:
                failure = translate(exc)
                if failure is None:
                    outcome.code = grpc.StatusCode.INTERNAL
                    log.exception("unhandled error in %s", method)
                    send_headers(context, headers)
                    context.abort_with_status(internal_status())
                log.warning("%s failed: %s", method, type(exc).__name__)
            finally:
                running = False
                self._release_connection()
            assert failure is not None  # every path without one has returned or aborted
            outcome.code = code_for(failure)
            abort(context, failure, headers)

    def _caller(self, policy: Policy, context: grpc.ServicerContext) -> Caller | None:
        if policy.public:
            return None
        metadata = tuple(context.invocation_metadata() or ())
        if policy.takes_api_key:
            key = _header(metadata, "x-api-key")
            # A key, when sent, is what the call is judged by; a user's token only where allowed.
            if key is not None or not policy.user_token_allowed:
                return self._api_key(policy, key or "")
        if policy.token_version_in_handler:
            return self._authenticate_signed(_bearer_token(metadata))
        return self._authenticate(_bearer_token(metadata))

    def _api_key(self, policy: Policy, key: str) -> ApiKeyPrincipal:
        if self._authenticate_key is None:
            raise invalid_api_key()
        principal = self._authenticate_key(key.strip())
        missing = sorted(policy.api_key_scopes - principal.scopes)
        if missing:
            raise errors.PermissionDenied(
                "API_KEY_SCOPE_MISSING",
                f"this API key lacks the scope {missing[0]}",
                {"scope": missing[0]},
            )
        return principal

    def _idempotent(
        self,
        method: str,
        policy: Policy,
        principal: Caller | None,
        behavior: Callable[[Any, grpc.ServicerContext], Any],
        request: Any,
        context: grpc.ServicerContext,
    ) -> Any:
        key = _header(tuple(context.invocation_metadata() or ()), idempotency.HEADER)
        if key is None or self._idempotency is None:
            if policy.idempotency == "required":
                raise idempotency.key_required()
            return behavior(request, context)
        idempotency.check_key(key)
        if isinstance(principal, ApiKeyPrincipal):
            owner = f"key:{principal.key_id}"
        elif isinstance(principal, Principal | SignedPrincipal):
            owner = f"user:{principal.user_id}"
        else:
            owner = "anonymous"
        return self._idempotency.run(
            owner,
            key,
            method,
            request.SerializeToString(deterministic=True),
            lambda: behavior(request, context),
        )

    def _record(
        self, method: str, code: grpc.StatusCode, elapsed: float, access_level: int = logging.INFO
    ) -> None:
        if self._observe is not None:
            self._observe(method, code.name, elapsed)
        if self._access_log is not None:
            self._access_log(method, code.name, elapsed, access_level)


@contextmanager
def _request_scope(context: grpc.ServicerContext) -> Iterator[tuple[tuple[str, str], ...]]:
    """The call's request id (and trace id) for the logs; yields the headers every answer carries.

    They are sent with the answer, success or error, not before the work: an error adds headers of
    its own (retry-after), and gRPC allows one set of initial metadata per call.
    """
    metadata = tuple(context.invocation_metadata() or ())
    rid = _incoming_request_id(metadata)
    token = request_id.set(rid)
    trace_token = trace_id.set(_incoming_trace_id(metadata))
    try:
        yield (("x-request-id", rid),)
    finally:
        trace_id.reset(trace_token)
        request_id.reset(token)


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def serialize_or_pass(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        assert serialize is not None
        return serialize(response)

    return serialize_or_pass


def _deny_handler() -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, invalid_token())

    return grpc.unary_stream_rpc_method_handler(deny)


def current_api_key() -> ApiKeyPrincipal:
    """The calling backend's key; only reachable from RPCs whose policy takes an API key."""
    principal = current_caller()
    if not isinstance(principal, ApiKeyPrincipal):
        raise invalid_api_key()
    return principal
