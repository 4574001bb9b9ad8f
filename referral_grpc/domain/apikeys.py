"""API keys for backends: the known scopes, creation (shown once), listing, revocation and authentication."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee as pw

from ..request_context import ApiKeyPrincipal
from ..store.database import Prepared, placeholder, write_transaction
from ..store.models import ApiKey
from . import audit
from .errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from .ports import Clock
from .validation import check_length

# Every scope the service knows, declared once: the policy options of the RPCs name these, and
# `apikey create` refuses any other. Later features use the ones no RPC needs yet.
SCOPES: tuple[str, ...] = (
    "events:write",
    "rewards:read",
    "rewards:redeem",
    "events:read",
    "webhooks:manage",
    "admin:read",
    "admin:write",
)

# Recognisable in logs and by secret scanners; 32 random bytes (256 bits) follow.
KEY_PREFIX = "rk_"
# What `apikey list` shows of a key: the prefix and the first 8 random characters.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 8
MAX_NAME_LENGTH = 64
MAX_KEY_LENGTH = 128
# last_used_at is written at most this often per key, not on every call.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# A process trusts a key it read as valid for this long before it reads the key's row again, so a
# backend's calls cost no read of their own. Revocation stays exact: `revoke` returns only after
# REVOKE_WAIT_SECONDS, by when every entry read before its commit has expired in every process
# (each entry's life is counted from before its read; the margin covers clocks that tick at
# slightly different rates). Only valid keys are held: an unknown or revoked key is read every time.
KEY_CACHE_SECONDS = 1.0
REVOKE_WAIT_SECONDS = KEY_CACHE_SECONDS * 1.1
# Keys a process holds at most (there are only as many as operators created); beyond, it starts over.
MAX_CACHED_KEYS = 10_000
INVALID_KEY_MESSAGE = "a valid API key is required in the x-api-key header"


@dataclass(frozen=True)
class ApiKeyView:
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `key` exists only here, the database keeps its hash."""

    key: str
    view: ApiKeyView


@dataclass(frozen=True)
class _Known:
    """A key read as valid: trusted until `until` (the clock's monotonic seconds)."""

    principal: ApiKeyPrincipal
    until: float
    last_used_at: datetime | None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def invalid_api_key() -> Unauthenticated:
    return Unauthenticated("API_KEY_INVALID", INVALID_KEY_MESSAGE)


def _view(row: ApiKey) -> ApiKeyView:
    return ApiKeyView(
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(row.scopes.split()),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes in SCOPES order, without repeats; an unknown scope is refused."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise InvalidArgument.for_field(
            "scope", f"unknown scope {', '.join(unknown)}; known scopes: {', '.join(SCOPES)}", "SCOPE_UNKNOWN"
        )
    if not wanted:
        raise InvalidArgument.for_field("scope", "at least one scope is required", "FIELD_REQUIRED")
    return tuple(scope for scope in SCOPES if scope in wanted)


class ApiKeyService:
    def __init__(self, db: pw.Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        # Read on every call made with a key: compiled once.
        self._by_digest = Prepared(db, ApiKey.select().where(ApiKey.key_hash == placeholder(db)))
        # Key digest -> what this process last read of it (see KEY_CACHE_SECONDS).
        self._known: dict[str, _Known] = {}

    def create(self, name: str, scopes: Iterable[str]) -> CreatedKey:
        name = name.strip()
        if not name:
            raise InvalidArgument.for_field("name", "is required", "FIELD_REQUIRED")
        check_length(name, "name", MAX_NAME_LENGTH)
        if not name.isprintable():
            raise InvalidArgument.for_field("name", "must be printable", "FIELD_INVALID")
        granted = check_scopes(scopes)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self._clock.now()
        try:
            with write_transaction(self._db):
                row = ApiKey.create(
                    name=name,
                    prefix=key[:DISPLAY_PREFIX_LENGTH],
                    key_hash=key_digest(key),
                    scopes=" ".join(granted),
                    created_at=now,
                )
                audit.append(self._db, now, "apikey.create", f"key:{name}", after={"scopes": list(granted)})
        except pw.IntegrityError:
            raise AlreadyExists("API_KEY_NAME_TAKEN", f"an API key named {name!r} already exists") from None
        return CreatedKey(key=key, view=_view(row))

    def list(self) -> list[ApiKeyView]:
        return [_view(row) for row in ApiKey.select().order_by(ApiKey.created_at, ApiKey.id)]

    def revoke(self, name: str) -> ApiKeyView:
        now = self._clock.now()
        with write_transaction(self._db):
            row = ApiKey.get_or_none(ApiKey.name == name.strip())
            if row is None:
                raise NotFound("API_KEY_NOT_FOUND", f"no API key is named {name!r}")
            # Revoking twice keeps the first revocation time.
            revoked = (
                ApiKey.update(revoked_at=now)
                .where((ApiKey.id == row.id) & ApiKey.revoked_at.is_null())
                .execute()
            )
            if revoked:
                audit.append(self._db, now, "apikey.revoke", f"key:{row.name}")
            view = _view(ApiKey.get_by_id(row.id))
        self._known.pop(row.key_hash, None)
        # Every process (this one included, for a read that raced the commit) may trust the key
        # until what it read before the commit expires: once this returns, no server accepts it.
        # A repeated revocation waits too, so it confirms the same.
        self._clock.sleep(REVOKE_WAIT_SECONDS)
        return view

    def authenticate(self, key: str) -> ApiKeyPrincipal:
        """The key's principal; a missing, malformed, unknown or revoked key is one and the same error."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
            raise invalid_api_key()
        digest = key_digest(key)
        started = self._clock.monotonic()
        known = self._known.get(digest)
        if known is None or known.until <= started:
            row: ApiKey | None = self._by_digest.first(digest)
            if row is None or row.revoked_at is not None:
                self._known.pop(digest, None)
                raise invalid_api_key()
            principal = ApiKeyPrincipal(key_id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))
            known = _Known(principal, started + KEY_CACHE_SECONDS, row.last_used_at)
            if len(self._known) >= MAX_CACHED_KEYS:
                self._known.clear()
            self._known[digest] = known
        now = self._clock.now()
        if known.last_used_at is None or now - known.last_used_at >= LAST_USED_RESOLUTION:
            # A plain autocommit UPDATE: usage is a hint for operators, not worth a transaction.
            ApiKey.update(last_used_at=now).where(ApiKey.id == known.principal.key_id).execute()
            self._known[digest] = _Known(known.principal, known.until, now)
        return known.principal
