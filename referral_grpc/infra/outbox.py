"""The email outbox: rows written with the change that causes them, handed to the queue, delivered once.

The life of a row:

1. `queue_email` inserts it (pending) inside the caller's transaction, so the email exists if and only
   if the change that causes it commits.
2. After the commit, `HueyDispatcher.dispatch` stamps `enqueued_at` and enqueues a `deliver_email` task.
   If the queue is down the stamp is taken back and the relay enqueues the row later.
3. The relay (in the worker) enqueues rows never enqueued, or enqueued longer ago than the lease:
   a Redis outage, a crashed worker or a lost task only delays the email.
4. `deliver` claims the row, sends it, and marks it sent with the secrets scrubbed from its payload.
   A failure counts an attempt and is retried with exponential backoff, up to a maximum.

`enqueued_at` is also the row's lease: while it lies in the future (a scheduled retry, or a send in
progress on SQLite) deliveries that arrive early leave the row alone and the relay does not touch it.

Exactly once, except in one window: if the process dies after the SMTP server accepted the message
but before the "sent" mark commits, the row is still pending and is sent again after the lease.
Every attempt at a row carries the same Message-ID, so receivers can drop such a duplicate.
(On SQLite the claim is the lease itself, so OUTBOX_LEASE must also outlast one send; SMTP_TIMEOUT
bounds each step of it.)

Scrubbing rewrites the row; the old row version can survive on disk until PostgreSQL's vacuum or
SQLite's page reuse overwrites it.
"""

from __future__ import annotations

import json
import logging
import smtplib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import peewee as pw

from ..domain.ports import Clock
from ..settings import Settings
from ..store.database import is_postgres
from ..store.models import EmailOutbox, database
from .mailer import KINDS, Mailer, build_message, message_id_for, render, validate_context

if TYPE_CHECKING:
    from ..domain.ports import EmailDispatcher

log = logging.getLogger(__name__)

PENDING = "pending"
SENT = "sent"
FAILED = "failed"

# Processes on one machine (or NTP-synced ones) agree on the time to well within this.
_CLOCK_TOLERANCE = timedelta(seconds=1)
_MAX_ERROR_LENGTH = 500


def queue_email(kind: str, recipient: str, context: dict[str, object], now: datetime) -> int:
    """Insert a pending email; call it inside the transaction of the change that causes the email.

    Returns the outbox id to hand to the dispatcher once that transaction has committed.
    """
    validate_context(kind, context)
    if "@" not in recipient:
        raise ValueError("recipient must be an email address")
    row = EmailOutbox.create(
        kind=kind,
        recipient=recipient,
        payload=json.dumps(context, sort_keys=True),
        status=PENDING,
        attempts=0,
        created_at=now,
    )
    return int(row.id)


class SqlOutbox:
    """The domain's Outbox port: rows in the email_outbox table of the shared database."""

    def queue_email(self, kind: str, recipient: str, context: Mapping[str, object], now: datetime) -> int:
        return queue_email(kind, recipient, dict(context), now)


class DeliveryQueue(Protocol):
    """Where delivery tasks go: the Huey instance of referral_grpc.infra.tasks."""

    def enqueue_delivery(self, outbox_id: int, delay: float | None = None) -> None: ...


class HueyDispatcher:
    """Hands committed outbox rows to the task queue; when the queue is down, leaves them to the relay."""

    def __init__(self, huey: DeliveryQueue, clock: Clock) -> None:
        self._queue = huey
        self._clock = clock

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        if not outbox_ids:
            return
        now = self._clock.now()
        try:
            claimed = _claim_for_enqueue(
                EmailOutbox.id.in_(list(outbox_ids)) & EmailOutbox.enqueued_at.is_null(), now, len(outbox_ids)
            )
            _enqueue_claimed(self._queue, claimed, now)
        except Exception as exc:
            # Never raise: the change that queued these emails has committed; the relay sends them.
            log.warning("Could not dispatch emails %s, the outbox relay will: %s", list(outbox_ids), exc)


def make_dispatcher(settings: Settings, clock: Clock) -> EmailDispatcher:
    """The dispatcher of the gRPC server: a queue like the worker's, built from the same settings."""
    from .tasks import create_huey  # tasks imports this module

    return HueyDispatcher(create_huey(settings), clock)


def relay_pending(queue: DeliveryQueue, now: datetime, lease: timedelta, limit: int = 100) -> int:
    """Enqueue up to `limit` pending rows never enqueued or enqueued before `now - lease`; return how many."""
    stale = EmailOutbox.enqueued_at.is_null() | (EmailOutbox.enqueued_at < now - lease)
    claimed = _claim_for_enqueue(stale, now, limit)
    return _enqueue_claimed(queue, claimed, now)


def _write_transaction(db: pw.Database) -> Any:
    # SQLite: take the write lock up front; a read-then-write deferred transaction can fail with
    # SQLITE_BUSY instead of waiting its turn.
    if isinstance(db, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def _claim_for_enqueue(condition: Any, now: datetime, limit: int) -> list[int]:
    """Stamp `enqueued_at = now` on the pending rows matching `condition`; return their ids."""
    db = database.obj
    query = (
        EmailOutbox.select(EmailOutbox.id)
        .where((EmailOutbox.status == PENDING) & condition)
        .order_by(EmailOutbox.id)
        .limit(limit)
    )
    if is_postgres(db):
        # A row being sent is locked by its delivery: skip it rather than wait for the SMTP server.
        query = query.for_update(skip_locked=True)
    with _write_transaction(db):
        ids = [int(row.id) for row in query]
        if ids:
            EmailOutbox.update(enqueued_at=now).where(EmailOutbox.id.in_(ids)).execute()
    return ids


def _enqueue_claimed(queue: DeliveryQueue, ids: list[int], claimed_at: datetime) -> int:
    for index, outbox_id in enumerate(ids):
        try:
            queue.enqueue_delivery(outbox_id)
        except Exception as exc:
            rest = ids[index:]
            log.warning("Task queue unavailable, %d email(s) left for the outbox relay: %s", len(rest), exc)
            _release(rest, claimed_at)
            return index
    return len(ids)


def _release(ids: list[int], claimed_at: datetime) -> None:
    # Back to "never enqueued": the relay retries them as soon as the queue answers, not after the lease.
    try:
        (
            EmailOutbox.update(enqueued_at=None)
            .where(
                EmailOutbox.id.in_(ids)
                & (EmailOutbox.status == PENDING)
                & (EmailOutbox.enqueued_at == claimed_at)
            )
            .execute()
        )
    except Exception as exc:
        log.warning("Could not release emails %s; the relay takes them after the lease: %s", ids, exc)


@dataclass(frozen=True)
class DeliveryConfig:
    """How deliveries are made and retried."""

    sender: str
    public_base_url: str
    max_attempts: int
    retry_base: float
    retry_max_delay: float
    lease: timedelta
    # Values that must never reach `last_error` or the log (besides each payload's own secrets).
    redact: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryConfig:
        return cls(
            sender=settings.mail_from,
            public_base_url=settings.public_base_url,
            max_attempts=settings.email_max_attempts,
            retry_base=settings.email_retry_base,
            retry_max_delay=settings.email_retry_max_delay,
            lease=timedelta(seconds=settings.outbox_lease),
            redact=tuple(secret for secret in (settings.smtp_password,) if secret),
        )

    def retry_delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the n-th failed attempt: base, 2 x base, 4 x base, ... capped."""
        return float(min(self.retry_max_delay, self.retry_base * 2 ** max(failed_attempts - 1, 0)))


@dataclass(frozen=True)
class Delivery:
    """What one `deliver` call did; `retry_in` is set when the caller must schedule a retry."""

    outcome: Literal["sent", "retry", "failed", "skipped"]
    retry_in: float | None = None


def deliver(outbox_id: int, *, mailer: Mailer, config: DeliveryConfig, clock: Clock) -> Delivery:
    """Send one outbox row if it is still pending and due; idempotent, safe to call concurrently."""
    db = database.obj
    now = clock.now()
    if is_postgres(db):
        # The row stays locked until the "sent" mark commits: a second worker skips it (SKIP LOCKED)
        # instead of sending it too, and a crashed worker's lock goes with its connection.
        with db.atomic():
            row = (
                EmailOutbox.select()
                .where((EmailOutbox.id == outbox_id) & (EmailOutbox.status == PENDING))
                .for_update(skip_locked=True)
                .get_or_none()
            )
            if row is None or _owned_elsewhere(row, now):
                return Delivery("skipped")
            return _attempt(row, mailer, config, clock)
    # SQLite has no row locks, and holding its one write lock during SMTP would stall every signup:
    # claim the row with a lease instead, then send outside the transaction.
    with _write_transaction(db):
        row = EmailOutbox.get_or_none((EmailOutbox.id == outbox_id) & (EmailOutbox.status == PENDING))
        if row is None or _owned_elsewhere(row, now):
            return Delivery("skipped")
        EmailOutbox.update(enqueued_at=now + config.lease).where(EmailOutbox.id == outbox_id).execute()
    return _attempt(row, mailer, config, clock)


def _owned_elsewhere(row: EmailOutbox, now: datetime) -> bool:
    # A retry is scheduled for later, or another worker holds the send lease: this task is a duplicate.
    return row.enqueued_at is not None and row.enqueued_at > now + _CLOCK_TOLERANCE


def _attempt(row: EmailOutbox, mailer: Mailer, config: DeliveryConfig, clock: Clock) -> Delivery:
    context: dict[str, object] = json.loads(row.payload)
    try:
        rendered = render(row.kind, context, public_base_url=config.public_base_url)
        message = build_message(
            rendered,
            sender=config.sender,
            recipient=row.recipient,
            message_id=message_id_for(row.id, row.created_at, config.sender),
        )
        mailer.send(message)
    except Exception as exc:
        return _record_failure(row, context, exc, config, clock.now())
    (
        EmailOutbox.update(
            status=SENT,
            sent_at=clock.now(),
            attempts=EmailOutbox.attempts + 1,
            payload=_scrubbed(row.kind, context),
        )
        .where(EmailOutbox.id == row.id)
        .execute()
    )
    log.info("Email %d (%s) sent", row.id, row.kind)
    return Delivery("sent")


def _record_failure(
    row: EmailOutbox, context: Mapping[str, object], exc: Exception, config: DeliveryConfig, now: datetime
) -> Delivery:
    attempts = row.attempts + 1
    error = _describe(exc, [*_secret_values(row.kind, context), *config.redact])
    if _is_permanent(exc) or attempts >= config.max_attempts:
        (
            EmailOutbox.update(
                status=FAILED, attempts=attempts, last_error=error, payload=_scrubbed(row.kind, context)
            )
            .where(EmailOutbox.id == row.id)
            .execute()
        )
        log.error("Email %d (%s) failed for good after %d attempt(s): %s", row.id, row.kind, attempts, error)
        return Delivery("failed")
    delay = config.retry_delay(attempts)
    (
        EmailOutbox.update(attempts=attempts, last_error=error, enqueued_at=now + timedelta(seconds=delay))
        .where(EmailOutbox.id == row.id)
        .execute()
    )
    log.warning(
        "Email %d (%s) attempt %d failed, retry in %.3gs: %s", row.id, row.kind, attempts, delay, error
    )
    return Delivery("retry", retry_in=delay)


def _is_permanent(exc: Exception) -> bool:
    # A 5xx refusal of the recipient or of the message itself will not change on retry;
    # anything else (connection refused, 4xx, timeouts, a refused login) may.
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPDataError):
        return exc.smtp_code >= 500
    return False


def _secret_values(kind: str, context: Mapping[str, object]) -> list[str]:
    return [str(context[key]) for key in KINDS[kind].secrets if key in context]


def _scrubbed(kind: str, context: Mapping[str, object]) -> str:
    secrets = KINDS[kind].secrets
    return json.dumps({key: value for key, value in context.items() if key not in secrets}, sort_keys=True)


def _describe(exc: Exception, secrets: Iterable[str]) -> str:
    text = f"{type(exc).__name__}: {exc}"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text[:_MAX_ERROR_LENGTH]


@dataclass(frozen=True)
class OutboxStats:
    """Queue depth (pending rows) and lag (age of the oldest pending row), for metrics."""

    depth: int
    lag_seconds: float


def outbox_stats(now: datetime) -> OutboxStats:
    pending = EmailOutbox.status == PENDING
    depth = EmailOutbox.select().where(pending).count()
    oldest = (
        EmailOutbox.select(EmailOutbox.created_at).where(pending).order_by(EmailOutbox.created_at).first()
    )
    lag = max((now - oldest.created_at).total_seconds(), 0.0) if oldest is not None else 0.0
    return OutboxStats(depth=depth, lag_seconds=lag)
