"""The Idempotency-Key step of the edge: Stripe's semantics per caller and key, where the policy asks."""

# The first call with a key claims it (a row with no response yet, in a transaction of its own), runs,
# and stores its serialized response; a retry with the same request gets those bytes back, a different
# request with the key is ALREADY_EXISTS (IDEMPOTENCY_KEY_REUSED), and a retry while the first still
# runs is ABORTED (IDEMPOTENCY_KEY_IN_USE). A call that fails releases its claim: nothing it did
# committed, so running it again is safe. The domain never knows any of this happened.

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import peewee as pw

from ..domain.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument
from ..domain.ports import Clock
from ..store.database import write_transaction
from ..store.models import IdempotencyRecord

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255


def check_key(key: str) -> None:
    if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise InvalidArgument(
            "IDEMPOTENCY_KEY_INVALID",
            f"the Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            [FieldViolation(HEADER, f"must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")],
        )


def key_required() -> InvalidArgument:
    return InvalidArgument(
        "IDEMPOTENCY_KEY_REQUIRED",
        "this call requires an Idempotency-Key header",
        [FieldViolation(HEADER, "is required")],
    )


class IdempotencyStore:
    def __init__(self, db: pw.Database, clock: Clock, ttl_seconds: int, secret: str) -> None:
        self._db = db
        self._clock = clock
        self._ttl = timedelta(seconds=ttl_seconds)
        # Keyed: a request may carry a password (Register), and its fingerprint must not be a fast,
        # unkeyed hash of it sitting in the database.
        self._key = hmac.new(secret.encode(), b"idempotency-fingerprint-v1", hashlib.sha256).digest()

    def run(self, caller: str, key: str, method: str, request: bytes, call: Callable[[], Any]) -> Any:
        """The stored response's bytes for a retry, or the message `call` returns the first time."""
        fingerprint = hmac.new(self._key, method.encode() + b"\0" + request, hashlib.sha256).hexdigest()
        record_id, stored = self._claim(caller, key, method, fingerprint)
        if stored is not None:
            return stored
        try:
            response = call()
        except BaseException:
            self._release(record_id)
            raise
        # Outside the request's deadline: the call committed, its response must be kept.
        with self._db.atomic():
            IdempotencyRecord.update(response=response.SerializeToString()).where(
                IdempotencyRecord.id == record_id
            ).execute()
        return response

    def _claim(self, caller: str, key: str, method: str, fingerprint: str) -> tuple[int, bytes | None]:
        now = self._clock.now()
        for _attempt in range(3):
            with write_transaction(self._db):
                try:
                    # The unique (caller, key) decides between concurrent first calls.
                    with self._db.atomic():
                        row = IdempotencyRecord.create(
                            caller=caller,
                            key=key,
                            method=method,
                            fingerprint=fingerprint,
                            created_at=now,
                            expires_at=now + self._ttl,
                        )
                    return row.id, None
                except pw.IntegrityError:
                    pass
                existing = IdempotencyRecord.get_or_none(
                    (IdempotencyRecord.caller == caller) & (IdempotencyRecord.key == key)
                )
                if existing is None:
                    continue
                if existing.expires_at <= now:
                    IdempotencyRecord.delete().where(
                        (IdempotencyRecord.id == existing.id) & (IdempotencyRecord.expires_at <= now)
                    ).execute()
                    continue
                if existing.method != method or not hmac.compare_digest(existing.fingerprint, fingerprint):
                    raise AlreadyExists(
                        "IDEMPOTENCY_KEY_REUSED",
                        "this Idempotency-Key was already used for a different request",
                    )
                if existing.response is None:
                    raise Aborted(
                        "IDEMPOTENCY_KEY_IN_USE",
                        "a request with this Idempotency-Key is still running; retry later",
                    )
                return existing.id, bytes(existing.response)
        raise Aborted("IDEMPOTENCY_KEY_IN_USE", "this Idempotency-Key is changing hands; retry later")

    def _release(self, record_id: int) -> None:
        with self._db.atomic():
            IdempotencyRecord.delete().where(
                (IdempotencyRecord.id == record_id) & IdempotencyRecord.response.is_null()
            ).execute()
