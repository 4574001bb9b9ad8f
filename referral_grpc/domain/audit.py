"""The audit log: hash-chained rows appended in the transaction of the change they record, and their check."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import peewee as pw

from ..request_context import ApiKeyPrincipal, Principal, SignedPrincipal, current_caller, request_id
from ..store.database import is_postgres
from ..store.models import AuditEvent

GENESIS_HASH = "0" * 64
# Any constant, distinct from the migration lock: taken per transaction, released by its commit.
_APPEND_LOCK_KEY = 0x5EF3_A0D1
# A CLI command run by whoever operates the deployment, and the service's own decisions.
OPERATOR = "operator"
SYSTEM = "system"


def actor_of_caller(default: str = OPERATOR) -> str:
    """Who acts in the current request: `key:<name>`, `user:<id>`, or `default` outside RPCs."""
    caller = current_caller()
    if isinstance(caller, ApiKeyPrincipal):
        return f"key:{caller.name}"
    if isinstance(caller, Principal | SignedPrincipal):
        return f"user:{caller.user_id}"
    return default


def _canonical(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(row: AuditEvent) -> str:
    """SHA-256 over the previous hash and the row's content, in one fixed serialisation."""
    content = {
        "seq": row.seq,
        "created_at": row.created_at.astimezone(UTC).isoformat(),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "before": row.before,
        "after": row.after,
        "request_id": row.request_id,
    }
    digest = hashlib.sha256(row.prev_hash.encode())
    digest.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def append(
    db: pw.Database,
    now: datetime,
    action: str,
    target: str,
    *,
    actor: str | None = None,
    before: Any = None,
    after: Any = None,
) -> AuditEvent:
    """Append one row; call inside the write transaction of the change, so both commit or neither does."""
    if is_postgres(db):
        # Serialises appenders until commit: two transactions can never chain onto the same row.
        # SQLite's write transactions (BEGIN IMMEDIATE) are serial already.
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_APPEND_LOCK_KEY,))  # type: ignore[no-untyped-call]
    last = AuditEvent.select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).first()
    row = AuditEvent(
        seq=1 if last is None else last.seq + 1,
        created_at=now,
        actor=actor if actor is not None else actor_of_caller(),
        action=action,
        target=target,
        before=_canonical(before),
        after=_canonical(after),
        request_id=request_id.get(),
        prev_hash=GENESIS_HASH if last is None else last.hash,
    )
    # Stored as it reads back (microseconds, UTC): the hash is checked against what the database returns.
    row.hash = row_hash(row)
    row.save(force_insert=True)
    return row


@dataclass(frozen=True)
class ChainBreak:
    """The first row where the chain does not hold, and what happened to it."""

    seq: int
    problem: str  # "changed", "deleted" or "reordered"

    def describe(self) -> str:
        if self.problem == "deleted":
            return f"row {self.seq} was deleted: the next row has a later number"
        if self.problem == "reordered":
            return f"row {self.seq} was reordered or inserted: it does not chain onto the row before it"
        return f"row {self.seq} was changed: its content no longer matches its hash"


@dataclass(frozen=True)
class VerifyResult:
    rows: int
    head_hash: str
    broken: ChainBreak | None


def _rows(batch: int = 1000) -> Iterator[AuditEvent]:
    after = 0
    while True:
        page = list(AuditEvent.select().where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(batch))
        yield from page
        if len(page) < batch:
            return
        after = page[-1].seq


def verify_chain() -> VerifyResult:
    """Walk the chain in order; stop at the first row deleted, reordered or changed."""
    expected_seq, expected_prev, count = 1, GENESIS_HASH, 0
    for row in _rows():
        if row.seq != expected_seq:
            return VerifyResult(count, expected_prev, ChainBreak(expected_seq, "deleted"))
        if row.prev_hash != expected_prev:
            return VerifyResult(count, expected_prev, ChainBreak(row.seq, "reordered"))
        if row_hash(row) != row.hash:
            return VerifyResult(count, expected_prev, ChainBreak(row.seq, "changed"))
        expected_seq, expected_prev, count = expected_seq + 1, row.hash, count + 1
    return VerifyResult(count, expected_prev, None)


@dataclass(frozen=True)
class AuditView:
    seq: int
    created_at: datetime
    actor: str
    action: str
    target: str
    before: str
    after: str
    request_id: str


def list_events(actor: str, target: str, after_seq: int, limit: int) -> list[AuditView]:
    """Newest first, `limit` rows with seq below `after_seq` (0: from the newest)."""
    query = AuditEvent.select().order_by(AuditEvent.seq.desc()).limit(limit)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if target:
        query = query.where(AuditEvent.target == target)
    if after_seq:
        query = query.where(AuditEvent.seq < after_seq)
    return [
        AuditView(
            seq=row.seq,
            created_at=row.created_at,
            actor=row.actor,
            action=row.action,
            target=row.target,
            before=row.before or "",
            after=row.after or "",
            request_id=row.request_id,
        )
        for row in query
    ]
