"""Interfaces of the collaborators the domain is given: clock, cache, email verifier, email dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True)
class CachedCode:
    """The public data of an active code, as cached for lookups by email."""

    code: str
    expires_at: datetime


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


class NullCodeCache:
    """No caching at all: every lookup goes to the database."""

    def get(self, email_key: str, now: datetime) -> CacheRead:
        return CacheRead(value=None, generation=None)

    def fill(self, email_key: str, generation: str | None, value: CachedCode, now: datetime) -> None:
        return None

    def invalidate(self, email_key: str) -> None:
        return None


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


class NoDispatch:
    """Leaves committed outbox rows for the relay to pick up."""

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        return None
