"""What one request carries through every layer: its ids, its deadline and its authenticated caller.

A bottom module: the store honours the deadline, the logs print the id, the api sets all three,
and none of them has to import the others to share them.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# "-" outside requests (worker tasks, start-up): every log line has a request id column.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The W3C trace id of the caller's `traceparent`, when it sent one: the logs carry it so a request can be
# found from the caller's own tracing.
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

# time.monotonic() by which the current request must be done, or None: set from the caller's gRPC
# deadline, read by the store's transactions so they never commit after the caller gave up.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


# Set when the call ends before its handler does: the client cancelled, or the server's shutdown grace
# ran out and grpc told the client UNAVAILABLE. Work after that must not commit: the client was told
# the call failed, and may retry it.
_abandoned: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("abandoned", default=None)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of an RPC: a user (by id)."""

    user_id: int


@dataclass(frozen=True)
class SignedPrincipal:
    """A user whose access token's signature and times are checked, but not yet its version.

    Only for the RPCs whose policy says their handler compares `token_version` with the user's row in
    its own first read (one round trip fewer). Not a Principal, on purpose: `current_principal()`
    refuses it, so a handler that forgot the comparison would answer UNAUTHENTICATED, never data.
    """

    user_id: int
    token_version: int


@dataclass(frozen=True)
class ApiKeyPrincipal:
    """The authenticated caller of an RPC: a backend, by its API key (id, name and scopes)."""

    key_id: int
    name: str
    scopes: frozenset[str]


Caller = Principal | SignedPrincipal | ApiKeyPrincipal

_principal: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("principal", default=None)


class DeadlineExceeded(Exception):
    """The caller's deadline passed: work done now is wasted and must not commit."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self, message: str = "the request deadline passed before it could finish") -> None:
        super().__init__(message)
        self.message = message


class RequestAbandoned(Exception):
    """The call ended (cancelled by the client, or by a server shutdown) before its work committed."""

    reason = "REQUEST_CANCELLED"

    def __init__(
        self, message: str = "the call was cancelled before it could finish; nothing changed"
    ) -> None:
        super().__init__(message)
        self.message = message


@contextmanager
def request_lifetime(abandoned: threading.Event) -> Iterator[None]:
    """Within the block, `abandoned` being set means the caller is gone (see check_alive)."""
    token = _abandoned.set(abandoned)
    try:
        yield
    finally:
        _abandoned.reset(token)


def is_abandoned() -> bool:
    abandoned = _abandoned.get()
    return abandoned is not None and abandoned.is_set()


def check_alive() -> None:
    """Raise DeadlineExceeded or RequestAbandoned when the caller has stopped waiting."""
    check_deadline()
    if is_abandoned():
        raise RequestAbandoned()


@contextmanager
def request_deadline(seconds: float | None) -> Iterator[None]:
    """Within the block, transactions must commit within `seconds` from now (None: no deadline)."""
    token = _deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_remaining() -> float | None:
    """Seconds left before the current request's deadline, or None without one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def check_deadline() -> None:
    """Raise DeadlineExceeded when the caller has stopped waiting."""
    remaining = time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded()


@contextmanager
def caller(principal: Caller | None) -> Iterator[None]:
    """Within the block, `current_caller()` is `principal` (None: an anonymous, public RPC)."""
    token = _principal.set(principal)
    try:
        yield
    finally:
        _principal.reset(token)


def current_caller() -> Caller | None:
    return _principal.get()
