"""Rewards: events recorded exactly once, referrals judged under the program, the append-only ledger.

Exactly once by construction, not by check-then-insert: the unique event_id decides between retries
of one event, a conditional update (pending -> qualified) between different events of one newcomer,
the partial unique index on the ledger between rewards of one referral, and the unique `reverses`
column between refunds. Redemptions are serialised per user by a row lock (SQLite: by its write lock)
and checked against the balance inside the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import peewee as pw

from ..request_context import check_alive, time_remaining
from ..store.database import (
    EVENTS_CHANNEL,
    Prepared,
    instance,
    is_postgres,
    joined_instances,
    placeholder,
    row_reader,
    run_sql,
    single_statement_write,
    statement_aborted,
    stored_time,
    whole_row,
    write_transaction,
)
from ..store.models import (
    PENDING,
    QUALIFIED,
    REJECTED,
    REVERSED,
    REWARD_KINDS,
    EmailOutbox,
    LedgerEntry,
    Program,
    Referral,
    RewardEvent,
    User,
)
from . import audit
from .auth import mask_email
from .currencies import format_amount, is_currency
from .errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from .events import (
    BALANCE_ADJUSTED,
    REFERRAL_APPROVED,
    REFERRAL_QUALIFIED,
    REFERRAL_REJECTED,
    REFERRAL_REVERSED,
    REWARD_CREDITED,
    REWARD_REDEEMED,
    REWARD_REVERSED,
    NewEvent,
    append_events,
    appending_ctes,
    event_rows,
    event_template,
    source_append_values,
    timestamp,
)
from .ports import Clock, EmailDispatcher, Outbox, PendingEmail
from .programs import EVENT_TYPE, MAX_AMOUNT_MINOR, REFUND, ProgramRules, current_program, rules_of
from .tokens import PageTokens
from .validation import (
    MAX_PAGE_TOKEN_LENGTH,
    check_length,
    check_no_nul,
    has_control_characters,
    normalize_email,
)

REFERRER_REWARD, REFEREE_REWARD = REWARD_KINDS
REVERSAL = "reversal"
REDEMPTION = "redemption"
ADJUSTMENT = "adjustment"
REFERRER, REFEREE = "referrer", "referee"
MAX_EVENT_ID_LENGTH = 128
# Services' clocks disagree: an event a little ahead of ours is accepted, and one stamped a little
# before the newcomer's registration counts as at registration.
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# An administrator's reason or note, kept in the audit log.
MAX_NOTE_LENGTH = 500
# The fraud decision that holds rewards, and an administrator's approval of it.
REVIEW, APPROVED = "review", "approved"
# The kinds that make up "lifetime earned": rewards net of their reversals.
EARNING_KINDS = (*REWARD_KINDS, REVERSAL)


def always_eligible(referee: User) -> bool:
    """The default eligibility rule: every newcomer with a referrer can earn.

    The hook where deployment rules plug in (for example: an unverified email earns nothing when
    email verification is required); RewardService takes any function of this shape.
    """
    return True


Eligibility = Callable[[User], bool]


@dataclass(frozen=True)
class EventInput:
    event_id: str
    type: str
    currency: str
    amount_minor: int = 0
    user_id: int = 0
    email: str = ""
    occurred_at: datetime | None = None
    refunds_event_id: str = ""


@dataclass(frozen=True)
class EntryView:
    id: int
    kind: str
    amount_minor: int
    currency: str
    user_id: int
    referral_user_id: int | None
    event_id: str
    available_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class Skipped:
    beneficiary: str
    # A SkipReason name of the contract, e.g. "no_program".
    reason: str


@dataclass(frozen=True)
class EventResult:
    event_id: str
    duplicate: bool
    referral_state: str | None
    rewards: list[EntryView] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class BalanceView:
    currency: str
    available_minor: int
    pending_minor: int
    lifetime_earned_minor: int


@dataclass(frozen=True)
class LedgerPage:
    entries: list[EntryView]
    next_page_token: str


@dataclass(frozen=True)
class Redemption:
    entry: EntryView
    available_minor: int


@dataclass(frozen=True)
class Decided:
    state: str
    outcome: str
    rewards: list[EntryView]


@dataclass(frozen=True)
class ReferralStatsView:
    by_state: dict[str, int]
    earned: dict[str, int]


def _entry_view(row: LedgerEntry, event_ids: dict[int, str]) -> EntryView:
    return EntryView(
        id=row.id,
        kind=row.kind,
        amount_minor=row.amount_minor,
        currency=row.currency,
        user_id=row.user_id,
        referral_user_id=row.referral_user_id,
        event_id=event_ids.get(row.event_id, "") if row.event_id is not None else "",
        available_at=row.available_at,
        created_at=row.created_at,
    )


def _views(rows: Sequence[LedgerEntry]) -> list[EntryView]:
    ids = {row.event_id for row in rows if row.event_id is not None}
    query = RewardEvent.select(RewardEvent.id, RewardEvent.event_id).where(RewardEvent.id.in_(ids))
    names: dict[int, str] = dict(_tuples(query))
    return [_entry_view(row, names) for row in rows]


def _content_hash(user_id: int, e: EventInput, occurred_at: datetime) -> str:
    """The event as the service understands it: the same event named by user_id or by email is the same."""
    canonical = json.dumps(
        {
            "user_id": user_id,
            "type": e.type,
            "amount_minor": e.amount_minor,
            "currency": e.currency,
            "occurred_at": occurred_at.isoformat() if e.occurred_at is not None else None,
            "refunds_event_id": e.refunds_event_id,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _user_key(e: EventInput) -> tuple[str, str | int]:
    """How the event names its user: ("email", the normalised address) or ("user_id", the id)."""
    if e.email:
        return "email", normalize_email(e.email)[1]
    return "user_id", e.user_id


def _tuples(query: Any) -> list[tuple[Any, ...]]:
    """Rows of a query as plain tuples (aggregates included)."""
    return list(query.tuples())


def _credited(row: LedgerEntry) -> dict[str, Any]:
    return {
        "user_id": row.user_id,
        "ledger_entry_id": row.id,
        "kind": row.kind,
        "amount_minor": row.amount_minor,
        "currency": row.currency,
        "referee_user_id": row.referral_user_id,
        "available_at": timestamp(row.available_at),
    }


def _reversed(row: LedgerEntry) -> dict[str, Any]:
    return {
        "user_id": row.user_id,
        "ledger_entry_id": row.id,
        "reversed_ledger_entry_id": row.reverses_id,
        "amount_minor": row.amount_minor,
        "currency": row.currency,
    }


def _sum(expression: Any) -> Any:
    return pw.fn.COALESCE(pw.fn.SUM(expression), 0)


class _Reads:
    """RecordEvent's reads by key, compiled once (see store.database.Prepared)."""

    def __init__(self, db: pw.Database) -> None:
        p = placeholder(db)
        # The event's user, its referrer (what `parties` reads of it), the program in force, whether
        # its referral's row lets a first qualifying event qualify it (none yet, or pending with the
        # user's referrer and not held for review: what _Writes.qualify_at_once's upsert checks)
        # and, when a retry, the event already recorded and its ledger entries: one read for all
        # six (a row per entry, the rest repeated).
        users, events = User._meta.table_name, RewardEvent._meta.table_name
        programs, ledger = Program._meta.table_name, LedgerEntry._meta.table_name
        referrals = Referral._meta.table_name
        party_fields = (User.id, User.email, User.blocked_at)
        both = (
            f"SELECT {whole_row(User, 'u')}, {whole_row(RewardEvent, 'ev')},"  # noqa: S608
            f" {', '.join(f'r.{f.column_name}' for f in party_fields)}, {whole_row(Program, 'pr')},"
            f" (rf.referee_id IS NULL OR (rf.state = {db.param} AND rf.referrer_id = u.referrer_id"
            f" AND (COALESCE(rf.fraud_decision, '') <> {db.param} OR rf.review_outcome IS NOT NULL))),"
            f" {whole_row(LedgerEntry, 'le')}"
            f' FROM "{users}" u LEFT JOIN "{events}" ev ON ev.event_id = {db.param}'
            f' LEFT JOIN "{ledger}" le ON le.event_id = ev.id'
            f' LEFT JOIN "{users}" r ON r.id = u.referrer_id'
            f' LEFT JOIN "{referrals}" rf ON rf.referee_id = u.id'
            f' LEFT JOIN "{programs}" pr ON pr.id = (SELECT max(id) FROM "{programs}") WHERE u.'
        )
        self.user_and_event = {
            "user_id": f"{both}id = {db.param} ORDER BY le.id",
            "email": f"{both}email_key = {db.param} ORDER BY le.id",
        }
        self.user_and_event_parts = (
            (User, row_reader(User._meta.sorted_fields)),
            (RewardEvent, row_reader(RewardEvent._meta.sorted_fields)),
            (User, row_reader(party_fields)),
            (Program, row_reader(Program._meta.sorted_fields)),
        )
        self.entry_columns = row_reader(LedgerEntry._meta.sorted_fields)
        self.may_qualify_at = sum(len(reader) for _, reader in self.user_and_event_parts)
        self.entries_at = self.may_qualify_at + 1
        # An event by its name, with its ledger entries (a row per entry).
        self.event_and_entries = (
            f"SELECT {whole_row(RewardEvent, 'ev')}, {whole_row(LedgerEntry, 'le')}"  # noqa: S608
            f' FROM "{events}" ev LEFT JOIN "{ledger}" le ON le.event_id = ev.id'
            f" WHERE ev.event_id = {db.param} ORDER BY le.id"
        )
        self.event_columns = row_reader(RewardEvent._meta.sorted_fields)
        self.referral = Prepared(db, Referral.select().where(Referral.referee == p))
        # The referee, the referral's referrer and the user's referrer (the same one, normally).
        self.parties = Prepared(
            db, User.select(User.id, User.email, User.blocked_at).where(User.id.in_([p, p, p]))
        )


def _outcome(referral_state: str | None, skipped: Sequence[Skipped]) -> str:
    """What a retry of the event is told again (see RewardService._duplicate), as stored."""
    kept = {
        "referral_state": referral_state,
        "skipped": [{"beneficiary": s.beneficiary, "reason": s.reason} for s in skipped],
    }
    return json.dumps(kept)


def _values(db: pw.Database, count: int) -> str:
    return ", ".join([db.param] * count)


class _Writes:
    """RecordEvent's writes, written once per database: building a peewee INSERT or UPDATE costs more
    Python per call than PostgreSQL spends running it. Table and column names come from the models;
    every value is a bound parameter (S608), times go in as `_stamp` makes them."""

    def __init__(self, db: pw.Database) -> None:
        p = db.param
        events, referrals = RewardEvent._meta.table_name, Referral._meta.table_name
        ledger = LedgerEntry._meta.table_name
        # ON CONFLICT DO NOTHING: on PostgreSQL a concurrent insert of the same event_id waits for the
        # other transaction and then inserts nothing (no error, so no savepoint is needed), and the
        # rest of ours can still read the winner's row.
        insert_event = (
            f'INSERT INTO "{events}" (event_id, content_hash, user_id, type, amount_minor, currency,'  # noqa: S608
            f" occurred_at, refunds_event_id, outcome, recorded_at) VALUES ({_values(db, 10)})"
            f" ON CONFLICT DO NOTHING RETURNING {whole_row(RewardEvent)}"
        )
        self.insert_event = Prepared.statement(db, RewardEvent, insert_event)
        self.record_outcome = f'UPDATE "{events}" SET outcome = {p} WHERE id = {p}'  # noqa: S608
        self.open_referral = (
            f'INSERT INTO "{referrals}" (referee_id, referrer_id, state, rewarded, fraud_partial,'  # noqa: S608
            f" created_at) VALUES ({_values(db, 6)}) ON CONFLICT DO NOTHING"
        )
        # PostgreSQL: opened and read in one statement. Its SELECT sees the rows committed before it
        # began, so it finds nothing when a concurrent first event opened the row meanwhile (the
        # INSERT waited for that one): then the row is read again, as on SQLite.
        self.open_and_read_referral = (
            f"WITH opened AS ({self.open_referral} RETURNING {whole_row(Referral)})"  # noqa: S608
            f' SELECT * FROM opened UNION ALL SELECT {whole_row(Referral)} FROM "{referrals}"'
            f" WHERE referee_id = {p}"
            if is_postgres(db)
            else None
        )
        self.referral_columns = row_reader(Referral._meta.sorted_fields)
        # Pending -> qualified: the WHERE decides between concurrent events of one newcomer.
        self.qualify = (
            f'UPDATE "{referrals}" SET state = {p}, qualified_at = {p}, program_id = {p},'  # noqa: S608
            f" qualifying_event_id = {p}, rewarded = {p} WHERE referee_id = {p} AND state = {p}"
        )
        entry = f"({_values(db, 8)})"
        # One statement for one or both rewards; ids are drawn in the order given (referrer first).
        credit = {
            count: f'INSERT INTO "{ledger}" (user_id, kind, amount_minor, currency, referral_user_id,'  # noqa: S608
            f" event_id, available_at, created_at) VALUES {', '.join([entry] * count)}"
            f" RETURNING {whole_row(LedgerEntry)}"
            for count in (1, 2)
        }
        self.credit = {count: Prepared.statement(db, LedgerEntry, sql) for count, sql in credit.items()}
        # PostgreSQL: the same, keeping the event's outcome first (`record_outcome` in a CTE).
        self.credit_and_keep = (
            {
                count: Prepared.statement(db, LedgerEntry, f"WITH outcome AS ({self.record_outcome}) {sql}")
                for count, sql in credit.items()
            }
            if is_postgres(db)
            else None
        )
        # PostgreSQL: a first event that qualifies its newcomer, as one statement (see
        # RewardService._qualify_alone). Each CTE runs when the next one reads it: the event is
        # inserted (nothing when its event_id is taken), then the referral opened already qualified
        # or moved pending -> qualified (its row locked; nothing when it is not pending, names
        # another referrer, or waits for review), then the rewards credited, and only then the event
        # log's lock taken and the events appended, the reward.credited payloads completed with the
        # ids of the entries just inserted.
        mail_columns = PendingEmail.columns()
        self.qualify_at_once = (
            f"WITH ev AS ({insert_event}),"  # noqa: S608
            f' judged AS (INSERT INTO "{referrals}" (referee_id, referrer_id, state, rewarded,'
            f" fraud_partial, created_at, qualified_at, program_id, qualifying_event_id)"
            f" SELECT {_values(db, 8)}, ev.id FROM ev"
            f" ON CONFLICT (referee_id) DO UPDATE SET state = EXCLUDED.state, qualified_at ="
            f" EXCLUDED.qualified_at, program_id = EXCLUDED.program_id, qualifying_event_id ="
            f' EXCLUDED.qualifying_event_id, rewarded = EXCLUDED.rewarded WHERE "{referrals}".state = {p}'
            f' AND "{referrals}".referrer_id = EXCLUDED.referrer_id AND ("{referrals}".fraud_decision'
            f' IS DISTINCT FROM {p} OR "{referrals}".review_outcome IS NOT NULL) RETURNING referee_id),'
            f' credited AS (INSERT INTO "{ledger}" (user_id, kind, amount_minor, currency,'
            f" referral_user_id, event_id, available_at, created_at)"
            f" SELECT reward.user_id, reward.kind, reward.amount_minor, {p}, {p}, ev.id, {p}, {p}"
            f" FROM judged, ev, unnest({p}::bigint[], {p}::text[], {p}::bigint[]) WITH ORDINALITY"
            f" AS reward(user_id, kind, amount_minor, position) ORDER BY reward.position"
            f" RETURNING {whole_row(LedgerEntry)}),"
            f" news AS (SELECT {p}::text AS event_id, {p}::text AS type, {p}::text AS payload,"
            f" 0::bigint AS position FROM judged UNION ALL SELECT t.event_id, t.type,"
            f" t.before || credited.id::text || t.after, credited.id FROM credited JOIN"
            f" unnest({p}::text[], {p}::text[], {p}::text[], {p}::text[], {p}::text[])"
            f" AS t(kind, event_id, type, before, after) ON t.kind = credited.kind),"
            f" {appending_ctes(after='judged', source='news')},"
            # The referrer's email (when bound as true), in the same statement: the transaction
            # holds the log's lock until its commit, and this saves it a round trip meanwhile.
            f' mail AS (INSERT INTO "{EmailOutbox._meta.table_name}" ({", ".join(mail_columns)})'
            f" SELECT {_values(db, len(mail_columns))} FROM judged WHERE {p}::boolean"
            f" RETURNING id)"
            f" SELECT {whole_row(RewardEvent, 'ev')}, judged.referee_id,"
            f" (SELECT pg_notify({p}, max(id)::text) FROM appended HAVING count(*) > 0),"
            f" (SELECT id FROM mail), {whole_row(LedgerEntry, 'credited')}"
            f" FROM ev LEFT JOIN judged ON TRUE LEFT JOIN credited ON TRUE"
            # The event recorded but its referral's row did not let it qualify (qualified or held
            # meanwhile): nothing this statement wrote may stay, so it fails (and the caller goes
            # step by step).
            f" WHERE CASE WHEN judged.referee_id IS NULL THEN abort_statement('referral_not_qualifiable')"
            f" ELSE TRUE END ORDER BY credited.id"
            if is_postgres(db)
            else None
        )


@dataclass
class _Recording:
    """One RecordEvent of an event_id in this process, as its concurrent sends see it: what it recorded
    (set before `done`), or nothing when it raised."""

    done: threading.Event = field(default_factory=threading.Event)
    # How the first send named its user (see _user_key), and the user and content hash it found.
    named: tuple[str, str | int] = ("", "")
    user_id: int | None = None
    content_hash: str = ""
    result: EventResult | None = None


class _Recordings:
    """The event_ids this process is recording now.

    A client's retry often reaches the service while its first send is still being recorded (the
    retry of a timed-out call, or a sender that fires twice). Both would miss the read of recorded
    events, and the retry would then build the whole qualifying statement only to wait in
    PostgreSQL on the first one's unique event_id and read its result afterwards: three statements
    for an answer the first send is about to have. Here a send that finds its event_id in flight
    waits for the first and is answered from its result, as a retry (duplicate, the same rewards).
    Only an optimisation within one process: the unique event_id still decides between processes,
    and a send whose first failed, or that names its user another way, goes the usual way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recordings: dict[str, _Recording] = {}

    @contextmanager
    def recording(self, event_id: str) -> Iterator[tuple[_Recording, bool]]:
        """(the event_id's recording, whether this send is the one recording it)."""
        with self._lock:
            current = self._recordings.get(event_id)
            first = current is None
            if current is None:
                current = self._recordings[event_id] = _Recording()
        if not first:
            yield current, False
            return
        try:
            yield current, True
        finally:
            with self._lock:
                del self._recordings[event_id]
            current.done.set()


class RewardService:
    def __init__(
        self,
        db: pw.Database,
        clock: Clock,
        outbox: Outbox,
        dispatcher: EmailDispatcher,
        page_tokens: PageTokens,
        eligible: Eligibility = always_eligible,
    ) -> None:
        self._db = db
        self._clock = clock
        self._outbox = outbox
        self._dispatcher = dispatcher
        self._pages = page_tokens
        self._eligible = eligible
        self._reads = _Reads(db)
        self._writes = _Writes(db)
        self._recordings = _Recordings()

    # --- events --------------------------------------------------------------------------

    def record_event(self, e: EventInput) -> EventResult:
        now = self._clock.now()
        occurred_at = self._validate(e, now)
        named = _user_key(e)
        with self._recordings.recording(e.event_id) as (recording, first):
            if first:
                recording.named = named
                recording.result = self._record(e, named, occurred_at, now, recording)
                return recording.result
            answer = self._as_retry_of(recording, e, named, occurred_at)
            return answer if answer is not None else self._record(e, named, occurred_at, now, None)

    def _as_retry_of(
        self, first: _Recording, e: EventInput, named: tuple[str, str | int], occurred_at: datetime
    ) -> EventResult | None:
        """The answer to a send of an event_id that another thread is recording: that one's result, as a
        retry's, once it has one; None when it failed, or when this send does not name its user as the
        first did (another id or address, or one by id and one by address): then the database answers,
        as it would have without the first in flight."""
        if not first.done.wait(time_remaining()):
            check_alive()
            return None
        if first.result is None or first.user_id is None or named != first.named:
            return None
        if _content_hash(first.user_id, e, occurred_at) != first.content_hash:
            raise AlreadyExists(
                "EVENT_ID_CONFLICT", "an event with this event_id was recorded with different content"
            )
        return replace(first.result, duplicate=True)

    def _record(
        self,
        e: EventInput,
        named: tuple[str, str | int],
        occurred_at: datetime,
        now: datetime,
        recording: _Recording | None,
    ) -> EventResult:
        # `seen`: a shortcut for retries, not what makes them safe: a read, so a duplicate costs no
        # commit. Concurrent first sends all miss here, and the unique event_id decides between them below.
        user, seen, seen_entries, referrer, program, may_qualify = self._user_and_seen(e.event_id, named)
        refunded = self._refunded_event(e, user) if e.type == REFUND else None
        content_hash = _content_hash(user.id, e, occurred_at)
        if recording is not None:
            recording.user_id, recording.content_hash = user.id, content_hash
        if seen is not None:
            return self._duplicate(seen, seen_entries, content_hash)
        if may_qualify and refunded is None:
            done = self._qualify_alone(e, user, referrer, program, occurred_at, content_hash, now)
            if done is not None:
                return done
        outbox_ids: list[int] = []
        events: list[NewEvent] = []
        with write_transaction(self._db):
            row = self._insert_event(e, user, occurred_at, content_hash, now, refunded)
            if row is not None:
                if refunded is not None:
                    result = self._refund(row, refunded, now, events)
                else:
                    result = self._judge(row, user, referrer, program, now, outbox_ids, events)
                append_events(self._db, events, now)
        if row is None:
            return self._recorded_first(e.event_id, content_hash)
        self._dispatcher.dispatch(outbox_ids)
        return result

    def _validate(self, e: EventInput, now: datetime) -> datetime:
        """Every bad field at once; nothing is written before this passes."""
        violations: list[FieldViolation] = []

        def bad(reason: str, name: str, description: str) -> None:
            violations.append(FieldViolation(name, description, reason))

        if not e.event_id:
            bad("FIELD_REQUIRED", "event_id", "is required")
        elif len(e.event_id) > MAX_EVENT_ID_LENGTH:
            bad("FIELD_TOO_LONG", "event_id", f"must be at most {MAX_EVENT_ID_LENGTH} characters")
        elif has_control_characters(e.event_id):
            # The rule of every identifier the contract documents with "no control characters".
            bad("FIELD_INVALID", "event_id", "must not contain control characters")
        if not e.type:
            bad("FIELD_REQUIRED", "type", "is required")
        elif not EVENT_TYPE.match(e.type):
            bad("FIELD_INVALID", "type", "must be lower-case letters, digits, _ . - (at most 64)")
        if not 0 <= e.amount_minor <= MAX_AMOUNT_MINOR:
            bad("AMOUNT_INVALID", "amount_minor", f"must be between 0 and {MAX_AMOUNT_MINOR}")
        if not is_currency(e.currency):
            bad("CURRENCY_INVALID", "currency", "must be an ISO 4217 code such as USD")
        if bool(e.user_id) == bool(e.email):
            for name in ("user_id", "email"):
                bad("INVALID_ARGUMENT", name, "exactly one of user_id and email is required")
        elif e.user_id < 0:
            bad("INVALID_ARGUMENT", "user_id", "must be positive")
        occurred_at = e.occurred_at or now
        if occurred_at > now + CLOCK_SKEW:
            bad("OCCURRED_AT_IN_FUTURE", "occurred_at", "must not be more than 5 minutes in the future")
        if e.type == REFUND and not e.refunds_event_id:
            bad("FIELD_REQUIRED", "refunds_event_id", "is required for a refund")
        elif e.type != REFUND and e.refunds_event_id:
            bad("INVALID_ARGUMENT", "refunds_event_id", "is only for events of type refund")
        elif len(e.refunds_event_id) > MAX_EVENT_ID_LENGTH:
            bad("FIELD_TOO_LONG", "refunds_event_id", f"must be at most {MAX_EVENT_ID_LENGTH} characters")
        if violations:
            raise InvalidArgument.of(violations)
        return occurred_at

    def _user_and_seen(
        self, event_id: str, named: tuple[str, str | int]
    ) -> tuple[User, RewardEvent | None, list[LedgerEntry], User | None, ProgramRules | None, bool]:
        """The event's user (`named` as _user_key gives it), the event if its event_id was recorded
        already and its ledger entries, the user's referrer (id, email, blocked_at) if it has one, the
        program in force if any, and whether the user's referral row lets a first qualifying event
        qualify it (_qualify_alone)."""
        name, key = named
        params = (PENDING, REVIEW, event_id, key)
        rows = run_sql(self._db, self._reads.user_and_event[name], params).fetchall()
        if not rows:
            raise NotFound("USER_NOT_FOUND", "no user matches the event's user", {"field": name})
        reads = self._reads
        user, recorded, referrer, program = joined_instances(rows[0], reads.user_and_event_parts)
        entries = self._entries(rows, reads.entries_at)
        return user, recorded, entries, referrer, rules_of(program), bool(rows[0][reads.may_qualify_at])

    def _recorded_first(self, event_id: str, content_hash: str) -> EventResult:
        """A retry's answer for an event whose event_id a concurrent send took first (its insert
        waited for that one's commit, then inserted nothing): read it with its ledger entries."""
        rows = run_sql(self._db, self._reads.event_and_entries, (event_id,)).fetchall()
        width = len(self._reads.event_columns)
        event: RewardEvent = instance(RewardEvent, self._reads.event_columns, rows[0][:width])
        return self._duplicate(event, self._entries(rows, width), content_hash)

    def _entries(self, rows: Sequence[Sequence[Any]], start: int) -> list[LedgerEntry]:
        """The ledger entries of a joined read, whose columns begin at `start` (none: NULL)."""
        columns = self._reads.entry_columns
        return [instance(LedgerEntry, columns, row[start:]) for row in rows if row[start] is not None]

    def _refunded_event(self, e: EventInput, user: User) -> RewardEvent:
        refunded = RewardEvent.get_or_none(RewardEvent.event_id == e.refunds_event_id)
        if refunded is None:
            raise NotFound(
                "EVENT_NOT_FOUND",
                "the event the refund names was never recorded",
                {"field": "refunds_event_id"},
            )
        if refunded.user_id != user.id:
            raise InvalidArgument.for_field("refunds_event_id", "names an event of another user")
        if refunded.type == REFUND:
            raise InvalidArgument.for_field("refunds_event_id", "names a refund; refunds cannot be refunded")
        return refunded

    def _insert_event(
        self,
        e: EventInput,
        user: User,
        occurred_at: datetime,
        content_hash: str,
        now: datetime,
        refunded: RewardEvent | None,
    ) -> RewardEvent | None:
        """The event's row, or None when its event_id is already taken (by a retry that won)."""
        row: RewardEvent | None = self._writes.insert_event.first(
            e.event_id,
            content_hash,
            user.id,
            e.type,
            e.amount_minor,
            e.currency,
            stored_time(occurred_at),
            refunded.id if refunded is not None else None,
            "{}",
            stored_time(now),
        )
        return row

    def _qualify_alone(
        self,
        e: EventInput,
        user: User,
        referrer: User | None,
        program: ProgramRules | None,
        occurred_at: datetime,
        content_hash: str,
        now: datetime,
    ) -> EventResult | None:
        """PostgreSQL: the common first event, one that qualifies its newcomer's referral, recorded,
        judged and credited by one statement instead of six, as a transaction of its own: no COMMIT
        round trip, and the event log's lock is held only while PostgreSQL runs the statement.

        None when the rows already read show it is not that case (no referrer or program, a program
        with a cap, a blocked party, an event the program does not count, a referral's row that does
        not let it qualify), or when the statement found the referral's row changed meanwhile (a
        concurrent event qualified it): then it aborted itself (abort_statement), nothing it wrote
        stays, and the caller goes step by step. Else the event's result, or when a concurrent send of
        the same event_id recorded it first, that one's (as a retry's).
        """
        sql = self._writes.qualify_at_once
        if sql is None or referrer is None or program is None:
            return None
        # `referrer` is the user row's referrer (read with it).
        if program.max_rewarded_referrals or user.blocked_at is not None or referrer.blocked_at is not None:
            return None
        if self._not_qualifying(e.type, e.currency, e.amount_minor, occurred_at, user, program):
            return None
        if not self._eligible(user):
            return None
        amounts = {
            REFERRER: program.referrer.amount_for(e.amount_minor),
            REFEREE: program.referee.amount_for(e.amount_minor),
        }
        owners = {REFERRER: referrer.id, REFEREE: user.id}
        kinds = {REFERRER: REFERRER_REWARD, REFEREE: REFEREE_REWARD}
        paid = [who for who in (REFERRER, REFEREE) if amounts[who]]
        skipped = [Skipped(who, "no_reward_configured") for who in (REFERRER, REFEREE) if not amounts[who]]
        available_at = now + timedelta(days=program.hold_days)
        qualified = NewEvent(
            REFERRAL_QUALIFIED,
            {
                "referee_user_id": user.id,
                "referrer_user_id": referrer.id,
                "qualifying_event_id": e.event_id,
                "program_version": program.version,
            },
        )
        # Each reward.credited payload but for the entry's id, which the statement fills in.
        templates = [
            event_template(
                NewEvent(
                    REWARD_CREDITED,
                    {
                        "user_id": owners[who],
                        "kind": kinds[who],
                        "amount_minor": amounts[who],
                        "currency": e.currency,
                        "referee_user_id": user.id,
                        "available_at": timestamp(available_at),
                    },
                ),
                "ledger_entry_id",
            )
            for who in paid
        ]
        # The referrer's email, inserted by the statement when the referral qualifies.
        mail = (
            self._outbox.pending_email(
                "reward_credited",
                referrer.email,
                {
                    "amount": format_amount(amounts[REFERRER], e.currency),
                    "referee_email_masked": mask_email(user.email),
                    "available_on": available_at.date().isoformat(),
                },
                now,
            )
            if amounts[REFERRER]
            else None
        )
        at = stored_time(now)
        values = (
            *(e.event_id, content_hash, user.id, e.type, e.amount_minor, e.currency),
            *(stored_time(occurred_at), None, _outcome(QUALIFIED, skipped), at),
            *(user.id, referrer.id, QUALIFIED, bool(paid), False, at, at, program.version, PENDING, REVIEW),
            *(e.currency, user.id, stored_time(available_at), at),
            *([owners[who] for who in paid], [kinds[who] for who in paid], [amounts[who] for who in paid]),
            *event_rows([qualified])[0],
            [kinds[who] for who in paid],
            *([template[i] for template in templates] for i in range(4)),
            *source_append_values(now),
            *(mail.values() if mail is not None else [None] * len(PendingEmail.columns())),
            mail is not None,
            EVENTS_CHANNEL,
        )
        try:
            if single_statement_write(self._db):
                # Committed even if the caller leaves meanwhile, unlike write_transaction: the event
                # is named by the caller's event_id, so its retry is told this same result.
                rows = run_sql(self._db, sql, values).fetchall()
            else:
                # A deadline shorter than the connection's statement cap: write_transaction bounds it.
                with write_transaction(self._db):
                    rows = run_sql(self._db, sql, values).fetchall()
        except pw.DatabaseError as exc:
            if statement_aborted(exc):
                return None
            raise
        if not rows:
            return self._recorded_first(e.event_id, content_hash)
        width = len(self._reads.event_columns)
        event: RewardEvent = instance(RewardEvent, self._reads.event_columns, rows[0][:width])
        credited = self._entries(rows, width + 3)
        if rows[0][width + 2] is not None:
            self._dispatcher.dispatch([int(rows[0][width + 2])])
        names = {event.id: event.event_id}
        return EventResult(
            e.event_id, False, QUALIFIED, [_entry_view(row, names) for row in credited], skipped
        )

    def _duplicate(self, first: RewardEvent, entries: list[LedgerEntry], content_hash: str) -> EventResult:
        if first.content_hash != content_hash:
            raise AlreadyExists(
                "EVENT_ID_CONFLICT", "an event with this event_id was recorded with different content"
            )
        outcome = json.loads(first.outcome)
        # Every entry is of this event: its name is known without another query.
        names = {first.id: first.event_id}
        return EventResult(
            event_id=first.event_id,
            duplicate=True,
            referral_state=outcome.get("referral_state"),
            rewards=[_entry_view(row, names) for row in entries],
            skipped=[Skipped(s["beneficiary"], s["reason"]) for s in outcome.get("skipped", [])],
        )

    def _finish(self, event: RewardEvent, result: EventResult) -> EventResult:
        """Keep the result, so that a retry of the event gets it again."""
        run_sql(
            self._db, self._writes.record_outcome, (_outcome(result.referral_state, result.skipped), event.id)
        )
        return result

    def _judge(
        self,
        event: RewardEvent,
        user: User,
        referrer: User | None,
        program: ProgramRules | None,
        now: datetime,
        outbox_ids: list[int],
        events: list[NewEvent],
    ) -> EventResult:
        def skip(reason: str, state: str | None) -> EventResult:
            both = [Skipped(REFERRER, reason), Skipped(REFEREE, reason)]
            return self._finish(event, EventResult(event.event_id, False, state, [], both))

        if user.referrer_id is None:
            return skip("no_referrer", None)
        referral = self._referral(user, now)
        state = referral.state
        if program is None:
            return skip("no_program", state)
        if state == REJECTED:
            return skip("referral_rejected", state)
        if state == REVERSED:
            return skip("referral_reversed", state)
        not_qualifying = self._not_qualifying(
            event.type, event.currency, event.amount_minor, event.occurred_at, user, program
        )
        if not_qualifying:
            return skip(not_qualifying, state)
        if state == QUALIFIED:
            return skip("already_qualified", state)
        if not self._eligible(user):
            return skip("referee_not_eligible", state)
        # The parties: whether either is blocked, and where the referrer's email goes. Read with the
        # user already (`referrer` is the user row's referrer), unless the referral names another.
        if referrer is not None and referral.referrer_id == referrer.id:
            parties = {user.id: user, referrer.id: referrer}
        else:
            parties = {
                row.id: row
                for row in self._reads.parties.rows(user.id, referral.referrer_id, user.referrer_id)
            }
        if any(parties[i].blocked_at is not None for i in (user.id, referral.referrer_id) if i in parties):
            return skip("referee_not_eligible", state)
        if referral.fraud_decision == REVIEW and referral.review_outcome is None:
            # Held: the first qualifying event waits for an administrator (DecideReferral).
            Referral.update(qualifying_event=event.id).where(
                (Referral.referee == user.id) & Referral.qualifying_event.is_null()
            ).execute()
            return skip("referral_in_review", state)
        capped = self._referrer_capped(user.referrer_id, program)
        amounts = {
            REFERRER: 0 if capped else program.referrer.amount_for(event.amount_minor),
            REFEREE: 0 if capped else program.referee.amount_for(event.amount_minor),
        }
        # Pending -> qualified exactly once, whatever runs concurrently: the row decides.
        moved = run_sql(
            self._db,
            self._writes.qualify,
            (QUALIFIED, stored_time(now), program.version, event.id, any(amounts.values()), user.id, PENDING),
        ).rowcount
        if moved != 1:
            return skip("already_qualified", Referral.get_by_id(user.id).state)
        available_at = now + timedelta(days=program.hold_days)
        credited: list[LedgerEntry] = []
        skipped: list[Skipped] = []
        beneficiaries = ((REFERRER, user.referrer_id, REFERRER_REWARD), (REFEREE, user.id, REFEREE_REWARD))
        rewards: list[tuple[Any, ...]] = []
        for who, owner, kind in beneficiaries:
            if capped:
                skipped.append(Skipped(who, "referrer_cap_reached"))
            elif amounts[who] == 0:
                skipped.append(Skipped(who, "no_reward_configured"))
            else:
                rewards.append(
                    (
                        owner,
                        kind,
                        amounts[who],
                        event.currency,
                        user.id,
                        event.id,
                        stored_time(available_at),
                        stored_time(now),
                    )
                )
        kept = False
        if rewards:
            values = [value for row in rewards for value in row]
            credit_and_keep = self._writes.credit_and_keep
            if credit_and_keep is not None:
                # The outcome is known before the rewards are: kept by the same statement.
                values[:0] = (_outcome(QUALIFIED, skipped), event.id)
                kept = True
            inserted = (credit_and_keep or self._writes.credit)[len(rewards)].rows(*values)
            credited = sorted(inserted, key=lambda row: int(row.id))
        if amounts[REFERRER]:
            outbox_ids.append(
                self._outbox.queue_email(
                    "reward_credited",
                    parties[user.referrer_id].email,
                    {
                        "amount": format_amount(amounts[REFERRER], event.currency),
                        "referee_email_masked": mask_email(user.email),
                        "available_on": available_at.date().isoformat(),
                    },
                    now,
                )
            )
        qualified = {
            "referee_user_id": user.id,
            "referrer_user_id": user.referrer_id,
            "qualifying_event_id": event.event_id,
            "program_version": program.version,
        }
        events.append(NewEvent(REFERRAL_QUALIFIED, qualified))
        events.extend(NewEvent(REWARD_CREDITED, _credited(row)) for row in credited)
        names = {event.id: event.event_id}
        result = EventResult(
            event.event_id, False, QUALIFIED, [_entry_view(row, names) for row in credited], skipped
        )
        return result if kept else self._finish(event, result)

    def _not_qualifying(
        self,
        type_: str,
        currency: str,
        amount_minor: int,
        occurred_at: datetime,
        user: User,
        program: ProgramRules,
    ) -> str:
        if type_ not in program.event_types:
            return "event_type_not_qualifying"
        if currency != program.currency:
            return "currency_not_qualifying"
        if amount_minor < program.min_amount_minor:
            return "amount_below_minimum"
        registered = user.created_at
        # Stamped a little before registration (clock skew): counted as at registration.
        if occurred_at < registered - CLOCK_SKEW:
            return "outside_attribution_window"
        if max(occurred_at, registered) > registered + timedelta(days=program.attribution_days):
            return "outside_attribution_window"
        return ""

    def _referral(self, user: User, now: datetime) -> Referral:
        """The newcomer's referral row, created pending the first time an event concerns it."""
        assert user.referrer_id is not None
        values = (user.id, user.referrer_id, PENDING, False, False, stored_time(now))
        both = self._writes.open_and_read_referral
        if both is not None:
            row = run_sql(self._db, both, (*values, user.id)).fetchone()
            if row is not None:
                opened: Referral = instance(Referral, self._writes.referral_columns, row)
                return opened
        else:
            run_sql(self._db, self._writes.open_referral, values)
        referral: Referral = self._reads.referral.first(user.id)
        return referral

    def _referrer_capped(self, referrer_id: int, program: ProgramRules) -> bool:
        if not program.max_rewarded_referrals:
            return False
        # Two newcomers of one referrer qualifying at once must not both slip under the cap.
        self._lock_user(referrer_id)
        rewarded = (
            Referral.select()
            .where(
                (Referral.referrer == referrer_id)
                & (Referral.state == QUALIFIED)
                & (Referral.rewarded == True)  # noqa: E712
            )
            .count()
        )
        return bool(rewarded >= program.max_rewarded_referrals)

    def _refund(
        self, event: RewardEvent, refunded: RewardEvent, now: datetime, events: list[NewEvent]
    ) -> EventResult:
        earlier = (
            RewardEvent.select()
            .where((RewardEvent.refunds_event == refunded.id) & (RewardEvent.id != event.id))
            .exists()
        )
        rewards = list(
            LedgerEntry.select()
            .where((LedgerEntry.event == refunded.id) & LedgerEntry.kind.in_(REWARD_KINDS))
            .order_by(LedgerEntry.id)
        )
        reversals: list[LedgerEntry] = []
        for reward in rewards:
            try:
                with self._db.atomic():
                    reversals.append(
                        LedgerEntry.create(
                            user=reward.user_id,
                            kind=REVERSAL,
                            amount_minor=-reward.amount_minor,
                            currency=reward.currency,
                            referral_user=reward.referral_user_id,
                            event=event.id,
                            reverses=reward.id,
                            # A pending reward is cancelled while still pending (it never becomes
                            # available); an available one is taken back now.
                            available_at=max(reward.available_at, now),
                            created_at=now,
                        )
                    )
            except pw.IntegrityError:
                # `reverses` is unique: another refund of this event reversed it first.
                continue
        reversed_referrals = (
            Referral.update(state=REVERSED, reversed_at=now)
            .where(
                (Referral.referee == refunded.user_id)
                & (Referral.state == QUALIFIED)
                & (Referral.qualifying_event == refunded.id)
            )
            .execute()
        )
        referral = Referral.get_or_none(Referral.referee == refunded.user_id)
        if reversed_referrals == 1 and referral is not None:
            payload = {
                "referee_user_id": referral.referee_id,
                "referrer_user_id": referral.referrer_id,
                "refund_event_id": event.event_id,
            }
            events.append(NewEvent(REFERRAL_REVERSED, payload))
        events.extend(NewEvent(REWARD_REVERSED, _reversed(row)) for row in reversals)
        duplicate = earlier or (bool(rewards) and not reversals)
        names = {event.id: event.event_id}
        result = EventResult(
            event.event_id,
            duplicate,
            referral.state if referral is not None else None,
            [_entry_view(row, names) for row in reversals],
            [],
        )
        return self._finish(event, result)

    # --- balances and ledger -------------------------------------------------------------

    def balances(self, user_id: int) -> list[BalanceView]:
        self._existing_user(user_id)
        now = self._clock.now()
        amount = LedgerEntry.amount_minor
        rows = (
            LedgerEntry.select(
                LedgerEntry.currency,
                _sum(pw.Case(None, [(LedgerEntry.available_at <= now, amount)], 0)),
                _sum(pw.Case(None, [(LedgerEntry.available_at > now, amount)], 0)),
                _sum(pw.Case(None, [(LedgerEntry.kind.in_(EARNING_KINDS), amount)], 0)),
            )
            .where(LedgerEntry.user == user_id)
            .group_by(LedgerEntry.currency)
            .order_by(LedgerEntry.currency)
        )
        return [BalanceView(c, int(a), int(p), int(e)) for c, a, p, e in _tuples(rows)]

    def available(self, user_id: int, currency: str) -> int:
        now = self._clock.now()
        total = (
            LedgerEntry.select(_sum(LedgerEntry.amount_minor))
            .where(
                (LedgerEntry.user == user_id)
                & (LedgerEntry.currency == currency)
                & (LedgerEntry.available_at <= now)
            )
            .scalar()
        )
        return int(total or 0)

    def list_entries(self, user_id: int, page_size: int, page_token: str) -> LedgerPage:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        check_length(page_token, "page_token", MAX_PAGE_TOKEN_LENGTH)
        self._existing_user(user_id)
        query = LedgerEntry.select().where(LedgerEntry.user == user_id)
        if page_token:
            _, after_id = self._pages.decode(page_token, user_id)
            query = query.where(LedgerEntry.id < after_id)
        # Ids grow with every insert: newest first by id, constant cost per page.
        rows = list(query.order_by(LedgerEntry.id.desc()).limit(size + 1))
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            next_token = self._pages.encode(user_id, rows[-1].created_at, rows[-1].id)
        return LedgerPage(entries=_views(rows), next_page_token=next_token)

    # --- redemption ----------------------------------------------------------------------

    def redeem(self, user_id: int, amount_minor: int, currency: str) -> Redemption:
        violations = []
        if user_id <= 0:
            violations.append(FieldViolation("user_id", "is required", "FIELD_REQUIRED"))
        if not 0 < amount_minor <= MAX_AMOUNT_MINOR:
            violations.append(FieldViolation("amount_minor", "must be more than 0", "AMOUNT_INVALID"))
        if not is_currency(currency):
            violations.append(FieldViolation("currency", "must be an ISO 4217 code", "CURRENCY_INVALID"))
        if violations:
            raise InvalidArgument.of(violations)
        now = self._clock.now()
        with write_transaction(self._db):
            self._lock_user(user_id)
            available = self.available(user_id, currency)
            if amount_minor > available:
                raise FailedPrecondition(
                    "INSUFFICIENT_BALANCE",
                    "the available balance is smaller than the amount",
                    {"available_minor": str(max(available, 0))},
                )
            row = LedgerEntry.create(
                user=user_id,
                kind=REDEMPTION,
                amount_minor=-amount_minor,
                currency=currency,
                available_at=now,
                created_at=now,
            )
            redeemed = {
                "user_id": user_id,
                "ledger_entry_id": row.id,
                "amount_minor": amount_minor,
                "currency": currency,
            }
            append_events(self._db, [NewEvent(REWARD_REDEEMED, redeemed)], now)
        return Redemption(entry=_entry_view(row, {}), available_minor=available - amount_minor)

    def adjust(self, user_id: int, amount_minor: int, currency: str, reason: str) -> EntryView:
        """An operator's signed correction, available at once; the reason goes to the audit log."""
        violations = []
        # The documented bound is on the reason as sent; a reason of spaces alone is no reason.
        if len(reason) > MAX_NOTE_LENGTH:
            violations.append(
                FieldViolation("reason", f"at most {MAX_NOTE_LENGTH} characters", "FIELD_TOO_LONG")
            )
        if "\x00" in reason:
            violations.append(FieldViolation("reason", "must not contain NUL characters", "FIELD_INVALID"))
        reason = reason.strip()
        if user_id <= 0:
            violations.append(FieldViolation("user_id", "is required", "FIELD_REQUIRED"))
        if amount_minor == 0 or abs(amount_minor) > MAX_AMOUNT_MINOR:
            violations.append(
                FieldViolation(
                    "amount_minor", f"must be non-zero, at most {MAX_AMOUNT_MINOR}", "AMOUNT_INVALID"
                )
            )
        if not is_currency(currency):
            violations.append(FieldViolation("currency", "must be an ISO 4217 code", "CURRENCY_INVALID"))
        if not reason:
            violations.append(FieldViolation("reason", "is required", "FIELD_REQUIRED"))
        if violations:
            raise InvalidArgument.of(violations)
        now = self._clock.now()
        with write_transaction(self._db):
            self._lock_user(user_id)
            row = LedgerEntry.create(
                user=user_id,
                kind=ADJUSTMENT,
                amount_minor=amount_minor,
                currency=currency,
                available_at=now,
                created_at=now,
            )
            audit.append(
                self._db,
                now,
                "balance.adjust",
                f"user:{user_id}",
                after={
                    "entry_id": row.id,
                    "amount_minor": amount_minor,
                    "currency": currency,
                    "reason": reason,
                },
            )
            adjusted = {
                "user_id": user_id,
                "ledger_entry_id": row.id,
                "amount_minor": amount_minor,
                "currency": currency,
            }
            # After the audit row: every transaction takes the two locks in one order.
            append_events(self._db, [NewEvent(BALANCE_ADJUSTED, adjusted)], now)
        return _entry_view(row, {})

    # --- review ----------------------------------------------------------------------------

    def decide(self, referee_id: int, approve: bool, note: str) -> Decided:
        """An administrator's decision on a referral held for review; approving credits the held event."""
        check_length(note, "note", MAX_NOTE_LENGTH)
        check_no_nul(note, "note")
        note = note.strip()
        if referee_id <= 0:
            raise InvalidArgument.for_field("user_id", "is required", "FIELD_REQUIRED")
        now = self._clock.now()
        outbox_ids: list[int] = []
        released: EventResult | None = None
        with write_transaction(self._db):
            self._lock_user(referee_id)
            referral = Referral.get_or_none(Referral.referee == referee_id)
            if referral is None or referral.fraud_decision != REVIEW:
                raise FailedPrecondition("REFERRAL_NOT_IN_REVIEW", "this referral was not held for review")
            if referral.review_outcome is not None:
                raise FailedPrecondition(
                    "REFERRAL_ALREADY_DECIDED", f"this referral was already {referral.review_outcome}"
                )
            outcome = APPROVED if approve else REJECTED
            changes: dict[str, Any] = {"review_outcome": outcome, "review_note": note, "reviewed_at": now}
            if not approve:
                changes["state"] = REJECTED
            Referral.update(**changes).where(Referral.referee == referee_id).execute()
            events: list[NewEvent] = []
            if approve:
                approved = {"referee_user_id": referee_id, "referrer_user_id": referral.referrer_id}
                events.append(NewEvent(REFERRAL_APPROVED, approved))
            if approve and referral.qualifying_event_id is not None:
                released = self._judge(
                    RewardEvent.get_by_id(referral.qualifying_event_id),
                    User.get_by_id(referee_id),
                    None,  # the parties are read afresh
                    current_program(),
                    now,
                    outbox_ids,
                    events,
                )
            if not approve:
                rejected = {
                    "referee_user_id": referee_id,
                    "referrer_user_id": referral.referrer_id,
                    "reason": "rejected_on_review",
                }
                events.append(NewEvent(REFERRAL_REJECTED, rejected))
            audit.append(
                self._db,
                now,
                "referral.decide",
                f"user:{referee_id}",
                before={"state": referral.state, "decision": REVIEW},
                after={
                    "outcome": outcome,
                    "note": note,
                    "credited": len(released.rewards) if released else 0,
                },
            )
            # The audit row before the events: every transaction takes the two locks in one order.
            append_events(self._db, events, now)
        self._dispatcher.dispatch(outbox_ids)
        return Decided(
            state=Referral.get_by_id(referee_id).state,
            outcome=outcome,
            rewards=released.rewards if released else [],
        )

    # --- statistics ----------------------------------------------------------------------

    def referral_stats(self, user_id: int) -> ReferralStatsView:
        state = pw.fn.COALESCE(Referral.state, PENDING)
        rows = (
            User.select(state, pw.fn.COUNT(User.id))
            .join(Referral, pw.JOIN.LEFT_OUTER, on=(Referral.referee == User.id))
            .where(User.referrer == user_id)
            .group_by(state)
        )
        by_state = {PENDING: 0, QUALIFIED: 0, REVERSED: 0, REJECTED: 0}
        by_state.update({name: int(count) for name, count in _tuples(rows)})
        earned = (
            LedgerEntry.select(LedgerEntry.currency, _sum(LedgerEntry.amount_minor))
            .where((LedgerEntry.user == user_id) & LedgerEntry.kind.in_(EARNING_KINDS))
            .group_by(LedgerEntry.currency)
            .order_by(LedgerEntry.currency)
        )
        return ReferralStatsView(by_state=by_state, earned={c: int(total) for c, total in _tuples(earned)})

    # --- helpers -------------------------------------------------------------------------

    def _existing_user(self, user_id: int) -> None:
        if user_id <= 0:
            raise InvalidArgument.for_field("user_id", "is required", "FIELD_REQUIRED")
        if not User.select().where(User.id == user_id).exists():
            raise NotFound("USER_NOT_FOUND", "no user has this id", {"field": "user_id"})

    def _lock_user(self, user_id: int) -> None:
        """Serialise money movements per user (SQLite's write lock already does)."""
        query = User.select(User.id).where(User.id == user_id)
        if is_postgres(self._db):
            query = query.for_update()
        if query.first() is None:
            raise NotFound("USER_NOT_FOUND", "no user has this id", {"field": "user_id"})
