"""What the domain needs from the outside world: clock, cache, throttle, outbox, email verifier, dispatch.

Adapters in referral_grpc.infra implement these; referral_grpc.app wires them in.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds since an arbitrary point, never going back: for measuring how long something took."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for `seconds`."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class CachedCode:
    """The public data of an active code, as cached for lookups by email.

    `owner_verified` travels with the code so that a cached entry can be refused when email
    verification is required and the owner has not verified (VerifyEmail invalidates the entry).
    """

    code: str
    expires_at: datetime
    owner_verified: bool


@dataclass(frozen=True)
class CacheRead:
    """The result of a cache read.

    `value` is the cached code, or None on a miss. `generation` is an opaque token to hand
    back to `fill` so that a slow reader cannot write back a value older than the latest
    invalidation; it is None when the cache is unavailable (then `fill` is skipped).
    """

    value: CachedCode | None
    generation: str | None


class CodeCache(Protocol):
    """Cache-aside store of active codes, keyed by the canonical (lower-cased) email."""

    def get(self, email_key: str, now: datetime) -> CacheRead:
        """Read the entry; an entry whose code has expired by `now` is a miss."""
        ...

    def fill(self, email_key: str, generation: str | None, value: CachedCode, now: datetime) -> None:
        """Store `value` unless the key was invalidated since the read that returned `generation`.

        The entry's TTL never exceeds the time left until `value.expires_at`.
        """
        ...

    def invalidate(self, email_key: str) -> None:
        """Drop the entry and move the key's generation on; called after the change commits."""
        ...


@dataclass(frozen=True)
class EmailVerification:
    """What the email verifier said about an address.

    `status` is Hunter's verdict (valid, invalid, accept_all, webmail, disposable, unknown),
    "unchecked" when verification is off, or "error" when the verifier could not answer.
    `accepted` says whether the signup may proceed; `checked` is False when the verifier
    could not answer, so the address is re-checked later.
    """

    status: str
    accepted: bool
    checked: bool


class EmailVerifier(Protocol):
    def verify(self, email: str) -> EmailVerification: ...


class NoEmailVerification:
    """Verification switched off (no HUNTER_API_KEY): every syntactically valid email passes."""

    def verify(self, email: str) -> EmailVerification:
        return EmailVerification(status="unchecked", accepted=True, checked=False)


class EmailDispatcher(Protocol):
    """Hands committed outbox rows to the delivery queue; must never raise."""

    def dispatch(self, outbox_ids: Sequence[int]) -> None: ...

    def flush(self, timeout: float) -> bool:
        """Hand over, within `timeout` seconds, whatever `dispatch` was given and has not handed over
        yet (the server calls it as it stops); whether everything went."""
        ...


class NoDispatch:
    """Leaves committed outbox rows for the relay to pick up."""

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        return None

    def flush(self, timeout: float) -> bool:
        return True


@dataclass(frozen=True)
class Rule:
    """At most `limit` attempts per account key in a window of `window` seconds."""

    name: str
    limit: int
    window: int


class Throttle(Protocol):
    """Counts attempts per rule and account key; never fails because its store is down."""

    def hit(self, rule: Rule, key: str) -> None:
        """Count one attempt for `key`; raise ResourceExhausted when it is over the rule's limit."""
        ...

    def clear(self, rule: Rule, key: str) -> None:
        """Forget `key`'s attempts (a successful login)."""
        ...


@dataclass(frozen=True)
class PendingEmail:
    """A pending email's row, validated, its fields named and ordered as the outbox table's columns."""

    kind: str
    recipient: str
    payload: str
    status: str
    attempts: int
    created_at: object  # as the store binds a time
    # The hand-off's claim, taken by the insert: the inserting process's dispatcher enqueues the row.
    enqueued_at: object

    @staticmethod
    def columns() -> tuple[str, ...]:
        """The outbox table's columns a pending email sets, in order."""
        return tuple(column.name for column in fields(PendingEmail))

    def values(self) -> tuple[object, ...]:
        """The values in the columns' order (dataclasses.astuple would deep-copy each)."""
        return tuple(getattr(self, column) for column in self.columns())


class Outbox(Protocol):
    """Emails written in the same transaction as the change that causes them."""

    def queue_email(self, kind: str, recipient: str, context: Mapping[str, object], now: datetime) -> int:
        """Insert a pending email inside the caller's transaction; return its id for the dispatcher."""
        ...

    def pending_email(
        self, kind: str, recipient: str, context: Mapping[str, object], now: datetime
    ) -> PendingEmail:
        """The row `queue_email` would insert, for a caller that inserts it with its own statement
        (in the same transaction, returning the id for the dispatcher). Raises as `queue_email` does."""
        ...


class EventSignal(Protocol):
    """Wakes event stream readers when the log may have grown (LISTEN/NOTIFY, or polling)."""

    def wait(self, after_cursor: int, timeout: float) -> None:
        """Return once an event after `after_cursor` may have committed, or after `timeout` seconds."""
        ...

    def committed_cursor(self) -> int | None:
        """A cursor up to which every event has committed, as of the last signal: what a reader
        would otherwise ask the log for. None when the signal cannot tell (a reader asks the log)."""
        ...

    def close(self) -> None: ...
