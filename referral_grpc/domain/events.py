"""The event log: facts appended in the transaction of the change they describe, read by cursor."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import peewee as pw

from ..store.database import EVENT_LOG_LOCK, EVENTS_CHANNEL, Prepared, is_postgres, placeholder, run_sql
from ..store.models import Event, WebhookDelivery, WebhookEndpoint
from .errors import FieldViolation, InvalidArgument
from .ports import EventSignal

# Every event type, declared once: the contract's payload messages (event_service.proto) carry the
# same names, and tests/test_events.py checks that the two agree.
USER_REGISTERED = "user.registered"
USER_PASSWORD_CHANGED = "user.password_changed"  # noqa: S105 - an event name, not a secret
CODE_CREATED = "code.created"
CODE_DELETED = "code.deleted"
REFERRAL_CREATED = "referral.created"
REFERRAL_QUALIFIED = "referral.qualified"
REFERRAL_REVERSED = "referral.reversed"
# Written by the fraud checks at signup and by an administrator's rejection on review.
REFERRAL_REJECTED = "referral.rejected"
REWARD_CREDITED = "reward.credited"
REWARD_REVERSED = "reward.reversed"
REWARD_REDEEMED = "reward.redeemed"
# Administration and data rights (issue 13): decisions and admin actions are events too.
USER_BLOCKED = "user.blocked"
USER_UNBLOCKED = "user.unblocked"
BALANCE_ADJUSTED = "balance.adjusted"
PROGRAM_UPDATED = "program.updated"
REFERRAL_APPROVED = "referral.approved"
# The user id only: the erased address must not live on in the log or in webhooks.
USER_DELETED = "user.deleted"
EVENT_TYPES: tuple[str, ...] = (
    USER_REGISTERED,
    USER_PASSWORD_CHANGED,
    CODE_CREATED,
    CODE_DELETED,
    REFERRAL_CREATED,
    REFERRAL_QUALIFIED,
    REFERRAL_REVERSED,
    REFERRAL_REJECTED,
    REWARD_CREDITED,
    REWARD_REVERSED,
    REWARD_REDEEMED,
    USER_BLOCKED,
    USER_UNBLOCKED,
    BALANCE_ADJUSTED,
    PROGRAM_UPDATED,
    REFERRAL_APPROVED,
    USER_DELETED,
)
# The longest type name: the contract states it as the limit of each name a request lists.
MAX_TYPE_NAME_LENGTH = max(map(len, EVENT_TYPES))
EVENT_ID_PREFIX = "evt_"
# "evt_" and 32 hexadecimal digits (a UUID4's hex).
EVENT_ID_LENGTH = len(EVENT_ID_PREFIX) + 32
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_CURSOR = 2**63 - 1


@dataclass(frozen=True)
class NewEvent:
    type: str
    # The payload message's fields by their proto names: ids, amounts, RFC 3339 times; never a secret.
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class EventView:
    cursor: int
    event_id: str
    type: str
    occurred_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True)
class EventPage:
    events: list[EventView]
    # The cursor to ask after next: the last event's, or the request's when the page is empty.
    next_cursor: int


def timestamp(value: datetime) -> str:
    """An RFC 3339 UTC time, as Protobuf's JSON mapping of Timestamp reads and writes it."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def append_events(db: pw.Database, events: Sequence[NewEvent], now: datetime) -> None:
    """Append to the log inside the caller's write transaction, as its last statements.

    Last, because the log's lock is held from here to the commit: taken before a row lock it
    could wait on a transaction that waits on it (a deadlock), and held longer it delays others.
    On PostgreSQL the lock, the rows, their webhook deliveries and the notification are one
    statement, so the lock is held for that statement and the commit alone: every appending
    transaction (a reward, a new code, a registration) queues on it.
    """
    if not events:
        return
    if is_postgres(db):
        run_sql(db, _APPEND_SQL, (*append_values(events, now), EVENTS_CHANNEL))
        return
    # SQLite serialises writers already (BEGIN IMMEDIATE) and has no notifications.
    # The webhook outbox: a delivery row per subscribed endpoint, in this same transaction, so an
    # event is either committed with every delivery it owes or not at all.
    endpoints = [(e.id, set(e.event_types.split())) for e in WebhookEndpoint.select()]
    for event_id, type_, payload in event_rows(events):
        row = Event.create(event_id=event_id, type=type_, occurred_at=now, payload=payload)
        owed = [
            {"endpoint": endpoint, "event": row.id, "next_attempt_at": now, "created_at": now}
            for endpoint, subscribed in endpoints
            if not subscribed or type_ in subscribed
        ]
        if owed:
            WebhookDelivery.insert_many(owed).execute()


def event_rows(events: Sequence[NewEvent]) -> list[tuple[str, str, str]]:
    """(event_id, type, payload JSON) of each event, in order; an unknown type is a bug of ours."""
    for event in events:
        if event.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event.type!r}")
    return [
        (
            f"{EVENT_ID_PREFIX}{uuid.uuid4().hex}",
            event.type,
            json.dumps(dict(event.payload), sort_keys=True, separators=(",", ":")),
        )
        for event in events
    ]


# Stands for the value a statement fills in (see event_template); json.dumps writes it as "\u0000",
# which no other value of a payload can contain (PostgreSQL text holds no NUL).
_SLOT = "\x00"


def event_template(event: NewEvent, slot: str) -> tuple[str, str, str, str]:
    """(event_id, type, payload before, payload after) of an event whose payload field `slot` is a
    number only the appending statement knows (the id of a row it inserts): the statement appends
    `before || value || after`, the same text event_rows would give for that value."""
    ((event_id, type_, text),) = event_rows([NewEvent(event.type, {**event.payload, slot: _SLOT})])
    before, after = text.split(json.dumps(_SLOT))
    return event_id, type_, before, after


def append_values(events: Sequence[NewEvent], now: datetime) -> tuple[object, ...]:
    """The values of `appending_ctes`' placeholders, in order, for `events` (at least one)."""
    event_ids, types, payloads = (list(column) for column in zip(*event_rows(events), strict=True))
    return (EVENT_LOG_LOCK, now, event_ids, types, payloads, now, now)


def appending_ctes(after: str = "", source: str = "") -> str:
    """PostgreSQL: the CTEs that append events (the log's lock, the rows in the order given, a
    delivery per subscribed endpoint, whose types are space-separated, empty for all), named
    log_lock, appended and owed. A statement using them selects NOTIFY_APPENDED (the last cursor,
    sent at commit) and binds `append_values` where the CTEs stand.

    `after` names a CTE of the caller's statement that writes first: the lock is taken only once
    that CTE has produced its rows, so after every row lock it took (the order append_events keeps
    by running last), and nothing is appended when it produces none.

    `source` names a CTE of the caller's that gives the events instead of bound arrays: columns
    event_id, type, payload (as event_rows makes them) and position (their order); then
    `source_append_values` is what is bound.
    """
    # CTE names of ours; every value is bound.
    lock_source = f" FROM {after}" if after else ""
    bound = "unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY"
    rows = f"{source} AS new" if source else f"{bound} AS new(event_id, type, payload, position)"
    return f"""log_lock AS (SELECT pg_advisory_xact_lock(%s){lock_source}),
appended AS (
    INSERT INTO events (event_id, type, occurred_at, payload)
    SELECT new.event_id, new.type, %s, new.payload
    FROM log_lock, {rows}
    ORDER BY new.position
    RETURNING id, type
),
owed AS (
    INSERT INTO webhook_deliveries (endpoint_id, event_id, status, attempts, next_attempt_at, created_at)
    SELECT endpoint.id, appended.id, 'pending', 0, %s, %s
    FROM appended JOIN webhook_endpoints AS endpoint
        ON btrim(endpoint.event_types) = ''
        OR appended.type = ANY(regexp_split_to_array(btrim(endpoint.event_types), '\\s+'))
)"""  # noqa: S608


def source_append_values(now: datetime) -> tuple[object, ...]:
    """The values of `appending_ctes(source=...)`' placeholders, in order."""
    return (EVENT_LOG_LOCK, now, now, now)


NOTIFY_APPENDED = "SELECT pg_notify(%s, max(id)::text) FROM appended"
# One statement: the lock (store.database.EVENT_LOG_LOCK) before any id is drawn (ids are drawn in
# the order given), the rows, their deliveries, and the notification.
_APPEND_SQL = f"WITH {appending_ctes()}\n{NOTIFY_APPENDED}"


def _violations(after_cursor: int, types: Sequence[str]) -> list[FieldViolation]:
    """What is wrong with a cursor and a type filter."""
    found: list[FieldViolation] = []
    if not 0 <= after_cursor <= MAX_CURSOR:
        found.append(FieldViolation("after_cursor", "must be 0 or the cursor of an event", "CURSOR_INVALID"))
    for i, name in enumerate(types):
        if name not in EVENT_TYPES:
            found.append(
                FieldViolation(f"types[{i}]", f"{name!r} is not an event type", "EVENT_TYPE_UNKNOWN")
            )
    return found


def _raise_for(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument.of(violations)


class EventLog:
    """Reads of the log: pages for pull-based consumers, batches for the stream."""

    def __init__(self, db: pw.Database) -> None:
        self._db = db
        p = placeholder(db)
        # The stream's read of every type (see Prepared): after a cursor, up to the high-water mark.
        self._range = Prepared(
            db, Event.select().where((Event.id > p) & (Event.id <= p)).order_by(Event.id).limit(p)
        )

    def list_events(self, after_cursor: int, types: Sequence[str], page_size: int) -> EventPage:
        violations = _violations(after_cursor, types)
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE"))
        elif page_size > MAX_PAGE_SIZE:
            violations.append(
                FieldViolation("page_size", f"must be at most {MAX_PAGE_SIZE}", "PAGE_SIZE_TOO_LARGE")
            )
        _raise_for(violations)
        events = self.read(after_cursor, types, page_size or DEFAULT_PAGE_SIZE)
        return EventPage(events, events[-1].cursor if events else after_cursor)

    def read(
        self, after_cursor: int, types: Sequence[str], limit: int, up_to: int | None = None
    ) -> list[EventView]:
        """Committed events after the cursor, in cursor order (which is commit order)."""
        rows: list[Event]
        if up_to is not None and not types:
            rows = self._range.rows(after_cursor, up_to, limit)
        else:
            query = Event.select().where(Event.id > after_cursor)
            if up_to is not None:
                query = query.where(Event.id <= up_to)
            if types:
                query = query.where(Event.type.in_(sorted(set(types))))
            rows = list(query.order_by(Event.id).limit(limit))
        return [
            EventView(row.id, row.event_id, row.type, row.occurred_at, json.loads(row.payload))
            for row in rows
        ]

    def last_cursor(self) -> int:
        return int(Event.select(pw.fn.COALESCE(pw.fn.MAX(Event.id), 0)).scalar())


# Rows read per query while catching up; a stream then waits for the signal.
WATCH_BATCH = 500
# A waiting stream checks this often whether its caller is still there.
WATCH_SLICE = 1.0


class EventStream:
    """WatchEvents: the log after a cursor, then new events as they commit, until the caller leaves.

    Reads run up to a high-water mark read first: every event up to it is committed (cursor order
    is commit order), so the next read can start right after it without missing a late commit.
    """

    def __init__(self, log: EventLog, signal: EventSignal, release: Callable[[], None]) -> None:
        self._log = log
        self._signal = signal
        # Returns the pooled connection between reads: a stream must not hold one while it waits.
        self._release = release

    def watch(
        self, after_cursor: int, types: Sequence[str], alive: Callable[[], bool]
    ) -> Iterator[EventView]:
        _raise_for(_violations(after_cursor, types))
        return self._follow(after_cursor, tuple(types), alive)

    def _follow(self, cursor: int, types: tuple[str, ...], alive: Callable[[], bool]) -> Iterator[EventView]:
        while alive():
            try:
                high = self._signal.committed_cursor()
                if high is None:
                    high = self._log.last_cursor()
                batch = self._log.read(cursor, types, WATCH_BATCH, up_to=high) if high > cursor else []
            finally:
                self._release()
            yield from batch
            if len(batch) == WATCH_BATCH:
                cursor = batch[-1].cursor
                continue
            # A cursor from the future stays where it is: the stream waits for the log to reach it.
            cursor = max(cursor, high)
            self._signal.wait(cursor, WATCH_SLICE)
