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
            return _view(ApiKey.get_by_id(row.id))

    def authenticate(self, key: str) -> ApiKeyPrincipal:
        """The key's principal; a missing, malformed, unknown or revoked key is one and the same error."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
            raise invalid_api_key()
        row: ApiKey | None = self._by_digest.first(key_digest(key))
        if row is None or row.revoked_at is not None:
            raise invalid_api_key()
        now = self._clock.now()
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            # A plain autocommit UPDATE: usage is a hint for operators, not worth a transaction.
            ApiKey.update(last_used_at=now).where(ApiKey.id == row.id).execute()
        return ApiKeyPrincipal(key_id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))
