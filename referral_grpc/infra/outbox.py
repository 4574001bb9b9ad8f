"""The email outbox: rows written with the change that causes them, handed to the queue, delivered once.

The life of a row:

1. `queue_email` inserts it (pending) inside the caller's transaction, so the email exists if and only
   if the change that causes it commits. The insert also claims it for the hand-off (`enqueued_at` =
   `created_at`): no other write is needed before it is enqueued.
2. After the commit, the server's dispatcher hands the ids to a background thread (`BackgroundDispatcher`),
   which collects them for `HANDOFF_DELAY` and enqueues one `deliver_email` task per `TASK_BATCH` of them
   (`HueyDispatcher`); the task sends its rows in turn. If the queue is down or slow, the
   claim is taken back (`enqueued_at` NULL) and the relay enqueues the row on its next pass: the hand-off
   is best-effort and never makes the RPC that committed wait or fail.
3. The relay (in the worker) enqueues rows never enqueued, rows still under their insert's claim
   `HANDOFF_GRACE` after it (the process that wrote them died before its hand-off), and rows enqueued
   longer ago than the lease: a Redis outage, a crashed server or worker, or a lost task only delays the
   email.
4. `deliver` claims the row, sends it, and marks it sent with the secrets scrubbed from its payload.
   A failure counts an attempt and is retried with exponential backoff, up to a maximum.
   An email whose link expires (the password reset's `expires_minutes` after `created_at`) is never sent
   late: once it is due past that time, or a retry would be, it is marked failed as expired instead.

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
from typing import Any, Literal, Protocol

import peewee as pw

from ..domain.ports import Clock, EmailDispatcher, PendingEmail
from ..settings import Settings
from ..store.database import is_postgres, run_sql, stored_time
from ..store.models import EmailOutbox, database
from .batches import DelayedDrain
from .breaker import CircuitBreaker
from .mailer import KINDS, Mailer, build_message, message_id_for, render, validate_context

log = logging.getLogger(__name__)

PENDING = "pending"
SENT = "sent"
FAILED = "failed"

# Processes on one machine (or NTP-synced ones) agree on the time to well within this.
_CLOCK_TOLERANCE = timedelta(seconds=1)
_MAX_ERROR_LENGTH = 500
# How long the relay leaves a row with its insert's claim to the dispatcher of the process that wrote
# it: the hand-off normally takes milliseconds; a row still unsent after this lost its hand-off.
HANDOFF_GRACE = timedelta(seconds=30)
# Ids waiting for the background thread, and how long it lets them gather before it enqueues them: one
# queue round trip and one wake-up of the thread per batch instead of per email.
_HANDOFF_CAPACITY = 10_000
HANDOFF_DELAY = 0.05
# Most rows one delivery task sends, one after another: a batch stays short next to HANDOFF_GRACE and the
# lease even when each send waits out SMTP_TIMEOUT (a row the relay enqueues again meanwhile is still
# sent once: `deliver` claims it).
TASK_BATCH = 10
# The reset email tells its reader how many minutes its link works, counted from the `now` that
# created both the token and the row: after that it is a dead link, not worth sending.
_EXPIRES_MINUTES = "expires_minutes"


def pending_email(kind: str, recipient: str, context: Mapping[str, object], now: datetime) -> PendingEmail:
    """A pending email's row, its context checked against the kind's template."""
    validate_context(kind, context)
    if "@" not in recipient:
        raise ValueError("recipient must be an email address")
    at = stored_time(now)
    # Claimed for the hand-off as it is written (enqueued_at = created_at): the dispatcher of the process
    # that commits it enqueues it without another write, and the relay leaves it alone for HANDOFF_GRACE.
    return PendingEmail(kind, recipient, json.dumps(context, sort_keys=True), PENDING, 0, at, at)


def queue_email(kind: str, recipient: str, context: Mapping[str, object], now: datetime) -> int:
    """Insert a pending email; call it inside the transaction of the change that causes the email.

    Returns the outbox id to hand to the dispatcher once that transaction has committed.
    """
    row = pending_email(kind, recipient, context, now)
    db = database.obj
    # Hand-written (one per signup): a peewee INSERT costs more to build than to run.
    columns = PendingEmail.columns()
    sql = (
        f'INSERT INTO "{EmailOutbox._meta.table_name}" ({", ".join(columns)})'  # noqa: S608
        f" VALUES ({', '.join([db.param] * len(columns))}) RETURNING id"
    )
    return int(run_sql(db, sql, row.values()).fetchone()[0])


class SqlOutbox:
    """The domain's Outbox port: rows in the email_outbox table of the shared database."""

    def queue_email(self, kind: str, recipient: str, context: Mapping[str, object], now: datetime) -> int:
        return queue_email(kind, recipient, context, now)

    def pending_email(
        self, kind: str, recipient: str, context: Mapping[str, object], now: datetime
    ) -> PendingEmail:
        return pending_email(kind, recipient, context, now)


class DeliveryQueue(Protocol):
    """Where delivery tasks go: the Huey tasks of referral_grpc.infra.tasks."""

    def enqueue_delivery(self, outbox_id: int, delay: float | None = None) -> None: ...

    def enqueue_deliveries(self, outbox_ids: Sequence[int]) -> None:
        """One task that delivers these rows in turn."""


class HueyDispatcher:
    """Hands committed outbox rows to the task queue; when the queue is down, leaves them to the relay.

    With a breaker, a queue that just failed is not tried again until the breaker lets a probe
    through: the rows' claims are taken back and the relay sends them.
    """

    def __init__(self, queue: DeliveryQueue, breaker: CircuitBreaker | None = None) -> None:
        self._queue = queue
        self._breaker = breaker

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        if not outbox_ids:
            return
        # Claimed by their insert (see pending_email): nothing to write before enqueueing them.
        claimed = sorted(outbox_ids)
        try:
            # Asked only with rows in hand: a half-open breaker's probe must end in a success or a failure.
            if self._breaker is not None and not self._breaker.allow():
                _release(claimed, None)
                return
            enqueued = _enqueue_claimed(self._queue, claimed, None)
            if self._breaker is not None:
                if enqueued == len(claimed):
                    self._breaker.record_success()
                else:
                    self._breaker.record_failure()
        except Exception as exc:
            # Never raise: the change that queued these emails has committed; the relay sends them.
            log.warning("Could not dispatch emails %s, the outbox relay will: %s", list(outbox_ids), exc)

    def flush(self, timeout: float) -> bool:
        return True  # `dispatch` hands over before it returns


class BackgroundDispatcher:
    """Runs another dispatcher on a background thread, so `dispatch` returns at once whatever the queue does.

    Ids wait in a bounded in-memory queue (an append, no lock) and the thread hands over what gathered
    in `HANDOFF_DELAY` at once. Ids refused because it is full, or lost with the process before their
    turn, belong to rows under their insert's claim: the relay sends them once `HANDOFF_GRACE` has passed.
    """

    def __init__(
        self, inner: EmailDispatcher, capacity: int = _HANDOFF_CAPACITY, delay: float = HANDOFF_DELAY
    ) -> None:
        self._inner = inner
        self._pending: DelayedDrain[int] = DelayedDrain(
            self._hand_over, delay=delay, name="email-handoff", limit=capacity
        )

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        try:
            refused = [outbox_id for outbox_id in outbox_ids if not self._pending.put(outbox_id)]
            if refused:
                log.warning("Email hand-off queue full, emails %s left for the outbox relay", refused)
        except Exception as exc:
            log.warning("Could not hand off emails %s, the outbox relay will: %s", list(outbox_ids), exc)

    def flush(self, timeout: float) -> bool:
        """Hand over what is gathering now, on this thread, and wait for a hand-off under way: ids
        dispatched by a stopping server's last RPCs would otherwise die with the process and wait
        `HANDOFF_GRACE` for the relay."""
        self._hand_over()
        return self._pending.settle(timeout)

    def _hand_over(self) -> None:
        batch = self._pending.take()
        if not batch:
            return
        try:
            # This thread's connection goes back to the pool between batches.
            with database.connection_context():
                self._inner.dispatch(batch)
        except Exception as exc:
            log.warning("Could not dispatch emails %s, the outbox relay will: %s", batch, exc)


def relay_pending(queue: DeliveryQueue, now: datetime, lease: timedelta, limit: int = 100) -> int:
    """Enqueue up to `limit` pending rows never enqueued, enqueued before `now - lease`, or left with their
    insert's claim for longer than HANDOFF_GRACE (their process died before its hand-off); return how many."""
    handoff_lost = (EmailOutbox.enqueued_at == EmailOutbox.created_at) & (
        EmailOutbox.created_at < now - HANDOFF_GRACE
    )
    stale = EmailOutbox.enqueued_at.is_null() | (EmailOutbox.enqueued_at < now - lease) | handoff_lost
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


def _enqueue_claimed(queue: DeliveryQueue, ids: list[int], claimed_at: datetime | None) -> int:
    """Enqueue claimed rows, `TASK_BATCH` to a task; release those the queue refused. `claimed_at` None:
    claimed by their insert."""
    for index in range(0, len(ids), TASK_BATCH):
        try:
            queue.enqueue_deliveries(ids[index : index + TASK_BATCH])
        except Exception as exc:
            rest = ids[index:]
            log.warning("Task queue unavailable, %d email(s) left for the outbox relay: %s", len(rest), exc)
            _release(rest, claimed_at)
            return index
    return len(ids)


def _release(ids: list[int], claimed_at: datetime | None) -> None:
    # Back to "never enqueued": the relay retries them as soon as the queue answers, not after the lease.
    # Only rows still under this claim: a delivery or the relay may have taken one meanwhile.
    claim = EmailOutbox.created_at if claimed_at is None else claimed_at
    try:
        (
            EmailOutbox.update(enqueued_at=None)
            .where(
                EmailOutbox.id.in_(ids) & (EmailOutbox.status == PENDING) & (EmailOutbox.enqueued_at == claim)
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
    expires_at = _link_expires_at(row, context)
    if expires_at is not None and clock.now() >= expires_at:
        return _fail(
            row, context, row.attempts, f"Expired: its link expired at {expires_at:%Y-%m-%dT%H:%M:%SZ}"
        )
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
        return _fail(row, context, attempts, error)
    delay = config.retry_delay(attempts)
    expires_at = _link_expires_at(row, context)
    if expires_at is not None and now + timedelta(seconds=delay) >= expires_at:
        return _fail(row, context, attempts, f"Expired before the next attempt: {error}")
    (
        EmailOutbox.update(attempts=attempts, last_error=error, enqueued_at=now + timedelta(seconds=delay))
        .where(EmailOutbox.id == row.id)
        .execute()
    )
    log.warning(
        "Email %d (%s) attempt %d failed, retry in %.3gs: %s", row.id, row.kind, attempts, delay, error
    )
    return Delivery("retry", retry_in=delay)


def _fail(row: EmailOutbox, context: Mapping[str, object], attempts: int, error: str) -> Delivery:
    error = error[:_MAX_ERROR_LENGTH]
    (
        EmailOutbox.update(
            status=FAILED, attempts=attempts, last_error=error, payload=_scrubbed(row.kind, context)
        )
        .where(EmailOutbox.id == row.id)
        .execute()
    )
    log.error("Email %d (%s) failed for good after %d attempt(s): %s", row.id, row.kind, attempts, error)
    return Delivery("failed")


def _link_expires_at(row: EmailOutbox, context: Mapping[str, object]) -> datetime | None:
    minutes = context.get(_EXPIRES_MINUTES)
    if isinstance(minutes, int) and not isinstance(minutes, bool):
        expires_at: datetime = row.created_at + timedelta(minutes=minutes)
        return expires_at
    return None


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
    """For metrics: queue depth (pending rows), lag (age of the oldest pending row), failed rows by kind.

    `failed` has every kind, with 0 for kinds that never failed.
    """

    depth: int
    lag_seconds: float
    failed: Mapping[str, int]


def outbox_stats(now: datetime) -> OutboxStats:
    pending = EmailOutbox.status == PENDING
    depth = EmailOutbox.select().where(pending).count()
    oldest = (
        EmailOutbox.select(EmailOutbox.created_at).where(pending).order_by(EmailOutbox.created_at).first()
    )
    lag = max((now - oldest.created_at).total_seconds(), 0.0) if oldest is not None else 0.0
    failed = dict.fromkeys(KINDS, 0)
    query = (
        EmailOutbox.select(EmailOutbox.kind, pw.fn.COUNT(EmailOutbox.id))
        .where(EmailOutbox.status == FAILED)
        .group_by(EmailOutbox.kind)
    )
    for kind, count in query.tuples().iterator():
        failed[str(kind)] = int(count)
    return OutboxStats(depth=depth, lag_seconds=lag, failed=failed)
